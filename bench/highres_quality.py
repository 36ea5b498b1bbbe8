"""High resolution on the reference models (issue 12): at 2x and 4x their training side, how many outputs the digit
oracle reads as one clean digit of the prompted class, for direct sampling, ScaleCrafter and FreCaS.

    python -m bench.highres_quality --out docs/bench/highres_quality.json --grid-dir docs/quality --write-docs

Every method samples the same prompts (``quality.prompt_set``) with the same seeds through ComfyUI's engine
(``SamplerCustomAdvanced`` with a ``CFGGuider``, Euler, 20 steps in all) at the target size; FreCaS's first stage
draws its noise as the subsampled target-size noise of the same seed. The outputs are downscaled (area) to the
training side, 128 px, and judged there: the oracle's digit, the foreground colour, and the 8-connected components
of the ink mask (``metrics.ink_map`` above INK_THRESHOLD) of at least MIN_COMPONENT pixels. ``one_clean_digit``: the
prompted digit read AND exactly one such component (a repeated or broken digit fails).
Writes the raw JSON (--out), one grid per model and size (--grid-dir: a row per method (the first seed), a column per
prompt, every tile at 128 px), prints the markdown tables, and with --write-docs replaces the generated part of
docs/quality.md's "High resolution (issue 12)" section.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from harness import collect, comfy_host, run_workflows
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "highres")
DOCS = os.path.join(comfy_host.PACK_DIR, "docs", "quality.md")
HarnessCollectImages, _collected = collect.collector("images", "IMAGE")
HarnessCollectModel, _ = collect.collector("model", "MODEL", take=lambda model: torch.zeros(()))  # for refusals

STEPS, SAMPLER, BASE = 20, "euler", digits.SIZE
SIDE_FACTORS = (1, 2, 4)  # 1: direct sampling at the training side only, the rule's reference on the model itself
MODELS = {"sd15": {"cfg": 7.5, "scheduler": "normal", "latent": "EmptyLatentImage", "ca_fusion": 0.6},
          "flux": {"cfg": 5.0, "scheduler": "simple", "latent": "EmptySD3LatentImage", "ca_fusion": 0.0}}
METHODS = ("direct", "scalecrafter", "frecas", "frecas_no_fa_cfg")
# frecas_no_fa_cfg: FreCaS with FA-CFG off (plain CFG in every stage), to tell the cascade from its high-band weight
# The component rule: the loosest (of ink 0.3 / 0.4 / 0.5, 16 / 32 / 64 px) under which held-out real digits and both
# models' own outputs at 128 px are one component (95% or more); 64 px at 128 px is 0.4% of the image, a digit drawn
# at a quarter of the side still has about 150.
INK_THRESHOLD = 0.4
MIN_COMPONENT = 64

# FreCaS: the paper's SDXL patterns scaled to 20 steps (2x: 1024 -> 2048, "40, 10" / "200, 0", gamma 1.5; 4x:
# 1024 -> 2048 -> 4096, "30, 5, 15" / "400, 200, 0", gamma 2.0, here split 12 / 4 / 4, as 30 : 5 : 15 of 20 would
# leave the middle stage 2 steps), FA-CFG high-band weight 35 (its low band keeps the guider's cfg), cross-attention
# fusion 0.6 on the UNet (joint attention on the DiT: off, as the node requires), the VAE transition. Flux-class:
# gamma is not used (flow models take the SD3 resolution shift), the node keeps it at its default.
FRECAS = {2: {"stage_steps": "16, 4", "stage_end_timesteps": "200, 0", "gamma": 1.5},
          4: {"stage_steps": "12, 4, 4", "stage_end_timesteps": "400, 200, 0", "gamma": 2.0}}
FA_CFG_HIGH = 35.0


# --- ScaleCrafter: the one place that names its node and settings ------------------------------------------------
SCALECRAFTER_NODE = "TrainFreeScaleCrafter"
SCALECRAFTER_PRESETS = {2: "generic 4x pixels", 4: "generic 16x pixels"}  # side factor -> pixel-ratio preset


def scalecrafter_inputs(side_factor):
    """TrainFreeScaleCrafter's inputs (besides ``model``) for a target side ``side_factor`` times the training
    side: the generic preset of that pixel ratio with everything at the preset's own values (re-dilated share of
    the steps, progressive dilation and noise-damped CFG as the official 4x / 16x settings, no dispersion)."""
    return {"preset": SCALECRAFTER_PRESETS[side_factor], "dilate_percent": -1.0, "progressive": "preset default",
            "noise_damped": "preset default", "disperse_percent": 0.0}
# ------------------------------------------------------------------------------------------------------------------


def side(factor):
    return BASE * factor


def cell_prompt(model, method, factor, captions, per_prompt, seed):
    """API prompt: the reference model (patched for ScaleCrafter) -> one SamplerCustomAdvanced per caption."""
    s, size = MODELS[model], side(factor)
    p = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": quality.MODELS[model]}},
         "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["model", 1]}},
         "ksampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": SAMPLER}}}
    unet = ["model", 0]
    if method == "scalecrafter":
        p["scalecrafter"] = {"class_type": SCALECRAFTER_NODE,
                             "inputs": {"model": unet, **scalecrafter_inputs(factor)}}
        unet = ["scalecrafter", 0]
    if method.startswith("frecas"):
        p["frecas"] = {"class_type": "TrainFreeFreCaS", "inputs": {
            "model": unet, "sampler": ["ksampler", 0], "width": size, "height": size, "batch_size": per_prompt,
            "base_width": BASE, "base_height": BASE, **frecas_settings(model, factor, method), "vae": ["model", 2]}}
        sampler, sigmas, latent = ["frecas", 0], ["frecas", 1], ["frecas", 2]
    else:
        p["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": unet, "scheduler": s["scheduler"],
                                                                  "steps": STEPS, "denoise": 1.0}}
        p["latent"] = {"class_type": s["latent"], "inputs": {"width": size, "height": size, "batch_size": per_prompt}}
        sampler, sigmas, latent = ["ksampler", 0], ["sigmas", 0], ["latent", 0]
    for i, (d, c, b) in enumerate(captions):
        p[f"pos{i}"] = {"class_type": "CLIPTextEncode",
                        "inputs": {"text": digits.caption(d, c, b), "clip": ["model", 1]}}
        p[f"guider{i}"] = {"class_type": "CFGGuider", "inputs": {"model": unet, "positive": [f"pos{i}", 0],
                                                                 "negative": ["neg", 0], "cfg": s["cfg"]}}
        p[f"noise{i}"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed + i}}
        p[f"sample{i}"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [f"noise{i}", 0], "guider": [f"guider{i}", 0], "sampler": sampler, "sigmas": sigmas,
            "latent_image": latent}}
        p[f"decode{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample{i}", 0], "vae": ["model", 2]}}
        p[f"out{i}"] = {"class_type": "HarnessCollectImages", "inputs": {"images": [f"decode{i}", 0], "key": str(i)}}
    return p


def frecas_settings(model, factor, method="frecas"):
    settings = dict(FRECAS[factor])
    if model == "flux":
        settings["gamma"] = 1.5  # unused on flow models; the node refuses any other value
    return {**settings, "fa_cfg": method == "frecas", "fa_cfg_high": FA_CFG_HIGH,
            "ca_fusion": MODELS[model]["ca_fusion"],
            "transition": "vae (decode, upsample, encode)"}


def method_settings(model, method, factor):
    if method == "direct":
        return {"steps": STEPS}
    if method == "scalecrafter":
        return {"node": SCALECRAFTER_NODE, **(scalecrafter_inputs(factor) or {})}
    return frecas_settings(model, factor, method)


def unavailable(model, method, factor):
    """Why a cell cannot run (None if it can): the ScaleCrafter node missing or not configured, or its refusal."""
    if method != "scalecrafter":
        return None
    import nodes
    if SCALECRAFTER_NODE not in nodes.NODE_CLASS_MAPPINGS or scalecrafter_inputs(factor) is None:
        return f"{SCALECRAFTER_NODE} is not in this checkout (or not configured in bench/highres_quality.py)"
    return refusal(cell_prompt(model, method, factor, quality.prompt_set(1), 1, 0), only="scalecrafter")


def refusal(prompt, only):
    """Run the ``only`` node of ``prompt`` alone; the engine's error message if it refuses, else None."""
    keep = {"model": prompt["model"], only: prompt[only],
            "out": {"class_type": "HarnessCollectModel", "inputs": {"model": [only, 0], "key": "refusal"}}}
    return comfy_host.refusal(keep)



def score(small, captions, per_prompt, judge):
    """small: the outputs downscaled to the training side, ``[N, 3, 128, 128]`` in 0..1."""
    wanted = torch.tensor([d for d, _, _ in captions]).repeat_interleave(per_prompt)
    colours = [c for _, c, _ in captions for _ in range(per_prompt)]
    with torch.no_grad():
        read = judge(small).argmax(1)
    components = torch.tensor(metrics.component_count(metrics.ink_map(small) > INK_THRESHOLD, MIN_COMPONENT))
    found_colours = metrics.nearest_colour(metrics.foreground_colour(small), digits.COLOURS)
    right = read == wanted
    return {"one_clean_digit": (right & (components == 1)).float().mean().item(),
            "digit_adherence": right.float().mean().item(),
            "colour_adherence": sum(a == b for a, b in zip(found_colours, colours)) / len(colours),
            "mean_components": components.float().mean().item(),
            "multi_component_share": (components > 1).float().mean().item(),
            "components_each": components.tolist(), "digit_read_each": read.tolist()}


def real_ceiling(count=359, seed=5):
    """The component rule on held-out real digits rendered at 128 px (what a perfect model would score)."""
    scans, labels = digits.load_scans()
    _, test_idx = digits.split(labels)
    images = digits.examples(scans, labels, test_idx, count, seed=seed)[0]
    ones = torch.tensor(metrics.component_count(metrics.ink_map(images) > INK_THRESHOLD, MIN_COMPONENT)) == 1
    return {"real_digits": count, "one_component_share": ones.float().mean().item()}


def boot():
    """ComfyUI with the pack and this benchmark's collector nodes."""
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessCollectImages=HarnessCollectImages, HarnessCollectModel=HarnessCollectModel)


def run_cell(model, method, factor, captions, per_prompt, seed):
    """The cell's outputs at the training side, as 8-bit images ``[N, 3, 128, 128]``, and seconds per image."""
    _collected.clear()
    started = time.perf_counter()
    comfy_host.execute_prompt(cell_prompt(model, method, factor, captions, per_prompt, seed))
    seconds = time.perf_counter() - started
    images = torch.cat([_collected[str(i)] for i in range(len(captions))]).permute(0, 3, 1, 2).float().clamp(0, 1)
    small = F.interpolate(images, size=(BASE, BASE), mode="area") if images.shape[-1] != BASE else images
    return small.mul(255).round().byte(), seconds / len(images)


def cached_cell(key, reuse, compute):
    """``compute()``'s (images, seconds) for a cell, kept in OUT/cells; with ``reuse``, taken from there when the
    cell was computed before with the same settings (``key``)."""
    path = os.path.join(OUT, "cells", "_".join(str(key[k]) for k in ("model", "size", "method")) + ".pt")
    if reuse and os.path.exists(path):
        kept = torch.load(path)
        if kept["key"] == key:
            return kept["images"], kept["seconds_per_image"], True
    images, seconds = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"key": key, "images": images, "seconds_per_image": seconds}, path)
    return images, seconds, False


def run(models=tuple(MODELS), factors=SIDE_FACTORS, methods=METHODS, prompts=10, per_prompt=2, seed=0,
        grid_dir=None, grid_seeds=1, reuse=False):
    boot()
    torch.set_num_threads(1)
    captions = quality.prompt_set(prompts)
    judge = oracle.load()
    rows = []
    for model in models:
        for factor in factors:
            tiles = []
            for method in (m for m in methods if factor > 1 or m == "direct"):
                common = {"model": model, "model_file": quality.MODELS[model], "side_factor": factor,
                          "size": side(factor), "method": method, "cfg": MODELS[model]["cfg"],
                          "scheduler": MODELS[model]["scheduler"], "sampler": SAMPLER,
                          "settings": method_settings(model, method, factor)}
                reason = unavailable(model, method, factor)
                if reason:
                    rows.append({**common, "skipped": reason})
                    print(f"{model} {side(factor)} {method}: skipped: {reason}", flush=True)
                    continue
                key = {**common, "prompts": prompts, "per_prompt": per_prompt, "seed": seed, "steps": STEPS}
                images, seconds, reused = cached_cell(
                    key, reuse, lambda: run_cell(model, method, factor, captions, per_prompt, seed))
                small = images.float() / 255
                row = score(small, captions, per_prompt, judge)
                rows.append({**common, "seconds_per_image": seconds, **row, **({"reused": True} if reused else {})})
                print(format_row(rows[-1]), flush=True)
                tiles.append(small.reshape(prompts, per_prompt, *small.shape[1:])[:, :grid_seeds])
            if grid_dir and tiles:
                os.makedirs(grid_dir, exist_ok=True)
                # rows: each method's first grid_seeds seeds; columns: the prompts
                grid = torch.cat([t.transpose(0, 1) for t in tiles]).flatten(0, 1)
                save_grid(grid, prompts, os.path.join(grid_dir, grid_name(model, factor)))
    return {"host": comfy_host.host_label().split(" ")[0], "torch_threads": 1, "prompts": prompts,
            "per_prompt": per_prompt, "seed": seed, "steps": STEPS, "base_side": BASE,
            "ink_threshold": INK_THRESHOLD, "min_component_px": MIN_COMPONENT,
            "real_digit_ceiling": real_ceiling(), "captions": [digits.caption(*c) for c in captions],
            "sampling_seconds": sum(r["seconds_per_image"] * prompts * per_prompt for r in rows if "skipped" not in r),
            "grid_rows": f"a row per method that ran, in the order {list(methods)}: the first {grid_seeds} seed(s) "
                         f"of each prompt",
            "rows": rows}


def save_grid(images, columns, path):
    """``quality.save_grid`` at 128 colours (the noisy high-resolution outputs make large PNGs otherwise)."""
    from PIL import Image
    quality.save_grid(images, columns, path)
    Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)


def grid_name(model, factor):
    return f"highres_{model}_{side(factor)}.png"


def format_row(row):
    return (f"{row['model']:<5} {row['size']:>4} {row['method']:<13} one clean digit {row['one_clean_digit']:.3f}  "
            f"digit {row['digit_adherence']:.3f}  colour {row['colour_adherence']:.3f}  components "
            f"{row['mean_components']:.2f} (>1: {row['multi_component_share']:.3f})  "
            f"{row['seconds_per_image']:.2f} s/img")


def tables(result):
    lines = []
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        lines += [f"#### {model}: `{quality.MODELS[model]}`, cfg {MODELS[model]['cfg']}, "
                  f"{MODELS[model]['scheduler']} scheduler", "",
                  "| size | method | one clean digit | digit adherence | colour adherence | mean components | "
                  "more than one component | s / image |", "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["model"] == model):
            if "skipped" in r:
                lines.append(f"| {r['size']} px | {r['method']} | - | - | - | - | - | - |")
                lines.append(f"|  | *skipped: {r['skipped']}* | | | | | | |")
            else:
                lines.append(f"| {r['size']} px | {r['method']} | {r['one_clean_digit']:.2f} | "
                             f"{r['digit_adherence']:.2f} | {r['colour_adherence']:.2f} | "
                             f"{r['mean_components']:.2f} | {r['multi_component_share']:.2f} | "
                             f"{r['seconds_per_image']:.2f} |")
        lines.append("")
    ceiling = result["real_digit_ceiling"]
    lines.append(f"Held-out real digits at 128 px under the same component rule: "
                 f"{ceiling['one_component_share']:.2f} of {ceiling['real_digits']} are one component. Sampling time "
                 f"of the whole run: {result['sampling_seconds'] / 60:.0f} minutes.")
    return "\n".join(lines)


def grids(result):
    lines = []
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        for size in dict.fromkeys(r["size"] for r in result["rows"] if r["model"] == model):
            ran = [r["method"] for r in result["rows"] if r["model"] == model and r["size"] == size
                   and "skipped" not in r]
            name = grid_name(model, size // BASE)
            lines += [f"**{model}, {size} px** (rows: {', '.join(ran)})", "",
                      f"![{model} {size}](quality/{name})", ""]
    return "\n".join(lines)


BEGIN, END = "<!-- generated by python -m bench.highres_quality: begin -->", \
    "<!-- generated by python -m bench.highres_quality: end -->"


def write_docs(result, path=DOCS):
    """Replace the text between BEGIN and END in docs/quality.md (the section's prose stays as written)."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block: add one to the High resolution section first")
    block = "\n".join([BEGIN, "", "    " + result["command"], "", tables(result), "", grids(result), END])
    head, rest = text.split(BEGIN, 1)
    with open(path, "w") as f:
        f.write(head + block + rest.split(END, 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--side-factors", nargs="+", type=int, choices=SIDE_FACTORS, default=list(SIDE_FACTORS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--per-prompt", type=int, default=2, help="seeds (batch items) per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="raw JSON file (default: bench/output/highres/highres_quality.json)")
    parser.add_argument("--grid-dir", help="folder for the grids (default: next to --out)")
    parser.add_argument("--reuse", action="store_true",
                        help="take cells computed before with the same settings from bench/output/highres/cells "
                             "(to add a method; the numbers are the same as recomputing: sampling is deterministic)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the generated block of docs/quality.md")
    args = parser.parse_args()
    out = args.out or os.path.join(OUT, "highres_quality.json")
    result = run(args.models, args.side_factors, args.methods, args.prompts, args.per_prompt, args.seed,
                 args.grid_dir or os.path.dirname(os.path.abspath(out)), reuse=args.reuse)
    # the command that reproduces the file (--reuse only saves time: the numbers are the same)
    result = {"command": " ".join(["python -m bench.highres_quality"] + [a for a in sys.argv[1:] if a != "--reuse"]),
              **result}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(tables(result))
    if args.write_docs:
        write_docs(result)


if __name__ == "__main__":
    main()
