"""CycleDiffusion on the reference models: zero-shot translations of held-out real digits ("red" -> "blue" and the
other colours three places on, "seven" -> "one" and the other digits four on) by the DPM-Encoder and its replay,
against img2img at the same strength (KSampler, denoise = the encoded share of the schedule, same sampler, steps,
cfg and target prompt), judged by the digit oracle and by PSNR outside the edited region.

    python -m bench.cycle_diffusion_quality --model sd15 --out docs/bench --grid-dir docs/quality

Everything runs through ComfyUI's execution engine (one API prompt per digit). Writes ``cycle_diffusion_<model>.json``
(raw rows) to --out and ``cycle_diffusion_<model>.png`` (one row per digit: source, VAE round trip, CycleDiffusion
with the source prompt, then colour and digit edits by CycleDiffusion and img2img) to --grid-dir (with --strength:
``cycle_diffusion_<model>_strength_<s>.*``), and prints the tables as markdown.
"""
import argparse
import json
import os
import time

import torch

from bench import inversion_quality as inv
from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from harness import comfy_host, run_workflows
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "cycle_diffusion")
SETTINGS = {"sd15": {"steps": 20, "scheduler": "normal", "cfg": 5.0, "strength": 0.7},
            "flux": {"steps": 20, "scheduler": "simple", "cfg": 5.0, "strength": 0.7}}
SAMPLER = "euler_ancestral"
METHODS = ("cycle", "img2img")
COLUMNS = ["source", "rec|vae", "rec|cycle", "colour|cycle", "colour|img2img", "digit|cycle", "digit|img2img"]


def shape_kept(images, source):
    """The digit's shape whatever its colour: intersection over union of the strokes (ink above 0.5, ink being the
    distance from the image's background colour scaled to 0..1), averaged over images."""
    a, b = metrics.ink_map(images) > 0.5, metrics.ink_map(source) > 0.5
    return ((a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp_min(1)).mean().item()


def digit_prompt(model, i, caption, edits, seed, s):
    p = inv.Prompt()
    p.add("TrainFreeReferenceModel", node_id="model", model_file=quality.MODELS[model])
    image = p.add("HarnessSupplyImage", key=str(i))
    latent = p.add("VAEEncode", pixels=image, vae=["model", 2])
    source, empty = p.text(caption), p.text("")
    p.collect(latent, f"rec|vae|{i}")
    sigmas = p.add("BasicScheduler", model=["model", 0], scheduler=s["scheduler"], steps=s["steps"],
                   denoise=s["strength"])
    sampler = p.add("KSamplerSelect", sampler_name=SAMPLER)
    encoded = p.add("TrainFreeDPMEncoder", model=["model", 0], positive=source, cfg=s["cfg"], latent=latent,
                    sampler=sampler, sigmas=sigmas, seed=seed, negative=empty)
    replay = p.add("TrainFreeCycleDiffusionSampler", dpm_latent=encoded)
    noise = p.add("RandomNoise", noise_seed=seed)
    for kind, positive in {"rec": source, **{k: p.text(t) for k, t in edits.items()}}.items():
        guider = p.add("CFGGuider", model=["model", 0], positive=positive, negative=empty, cfg=s["cfg"])
        p.collect(p.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=replay,
                        sigmas=[replay[0], 1], latent_image=latent), f"{kind}|cycle|{i}")
        if kind != "rec":
            p.collect(p.add("KSampler", model=["model", 0], seed=seed, steps=s["steps"], cfg=s["cfg"],
                            sampler_name=SAMPLER, scheduler=s["scheduler"], positive=positive, negative=empty,
                            latent_image=latent, denoise=s["strength"]), f"{kind}|img2img|{i}")
    return p.nodes


def run(model, count=10, out=OUT, grid_dir=None, strength=None):
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessSupplyImage=inv.HarnessSupplyImage,
                                     HarnessCollectImages=inv.HarnessCollectImages)
    s = {**SETTINGS[model], **({} if strength is None else {"strength": strength})}
    name = f"cycle_diffusion_{model}" + ("" if strength is None else f"_strength_{strength:g}")
    images, captions, numbers, colours, backgrounds = inv.held_out(count)
    inv._collected.clear()
    started = time.perf_counter()
    for i, (caption, d, c, b) in enumerate(zip(captions, numbers, colours, backgrounds)):
        inv._supplied[str(i)] = images[i:i + 1].permute(0, 2, 3, 1).contiguous()
        edits = {"colour": digits.caption(d, inv.colour_edit(c), b), "digit": digits.caption(inv.digit_edit(d), c, b)}
        comfy_host.execute_prompt(digit_prompt(model, i, caption, edits, i, s))
    seconds = time.perf_counter() - started

    def got(key):
        return torch.cat([inv._collected[f"{key}|{i}"] for i in range(count)]).permute(0, 3, 1, 2).float()
    common = {"model": model, "model_file": quality.MODELS[model], "digits": count, "seed": inv.SEED,
              "sampler": SAMPLER, **s, "host": comfy_host.host_label().split(" ")[0]}
    rows = [{**common, "kind": "reconstruction", "method": "vae_round_trip",
             **inv.score_reconstruction(got("rec|vae"), images)},
            {**common, "kind": "reconstruction", "method": "cycle",
             **inv.score_reconstruction(got("rec|cycle"), images)}]
    judge = oracle.load()
    targets = {"colour": (numbers, [inv.colour_edit(c) for c in colours]),
               "digit": ([inv.digit_edit(d) for d in numbers], colours)}
    for kind, (target_digits, target_colours) in targets.items():
        outside = inv.source_background(images)
        rows.append({**common, "kind": f"{kind} edit", "method": "vae_round_trip",
                     "psnr_outside_edit": inv.masked_psnr(got("rec|vae"), images, outside),
                     "shape_iou": shape_kept(got("rec|vae"), images),
                     "outside_share": outside.float().mean().item()})
        for method in METHODS:
            edited = got(f"{kind}|{method}")
            rows.append({**common, "kind": f"{kind} edit", "method": method,
                         **inv.score_edit(kind, edited, images, judge, numbers, colours, target_digits,
                                          target_colours), "shape_iou": shape_kept(edited, images)})
    command = f"python -m bench.cycle_diffusion_quality --model {model} --count {count}"
    result = {"command": command + ("" if strength is None else f" --strength {strength:g}"),
              "seconds": seconds, "outside_the_edit": "as bench.inversion_quality: colour edit, the source's "
              "background; digit edit, that less the pixels the edit draws in the digit's colour, grown by 2 px",
              "shape_iou": "intersection over union of the strokes (ink above 0.5) of edit and source",
              "img2img": "KSampler, denoise = strength, the same sampler, steps, scheduler, cfg, target prompt and "
                         "seed",
              "captions": captions, "edits": {"colour": [inv.colour_edit(c) for c in colours],
                                              "digit": [inv.digit_edit(d) for d in numbers]},
              "columns": COLUMNS, "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    grid_dir = grid_dir or out
    os.makedirs(grid_dir, exist_ok=True)
    columns = [images] + [got(key) for key in COLUMNS[1:]]
    quality.save_grid(torch.stack(columns, 1).flatten(0, 1).clamp(0, 1), len(columns),
                      os.path.join(grid_dir, f"{name}.png"))
    return result


def tables(result):
    lines = ["| reconstruction | PSNR (dB) | SSIM |", "|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "reconstruction":
            lines.append(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    lines += ["", "| edit | method | edit adherence | other attribute kept | digit shape kept (stroke IoU) | PSNR "
              "outside the edit (dB) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"].endswith("edit") and r["method"] == "vae_round_trip":
            lines.append(f"| {r['kind']} | VAE round trip (the ceiling) | - | - | {r['shape_iou']:.3f} | "
                         f"{r['psnr_outside_edit']:.2f} |")
        elif r["kind"] == "colour edit":
            lines.append(f"| colour edit | {r['method']} | colour {r['colour_adherence']:.2f} | digit "
                         f"{r['digit_kept']:.2f} | {r['shape_iou']:.3f} | {r['psnr_outside_edit']:.2f} |")
        elif r["kind"] == "digit edit":
            lines.append(f"| digit edit | {r['method']} | digit {r['digit_adherence']:.2f} | colour "
                         f"{r['colour_kept']:.2f} | {r['shape_iou']:.3f} | {r['psnr_outside_edit']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="sd15")
    parser.add_argument("--count", type=int, default=10, help="held-out digits")
    parser.add_argument("--strength", type=float, help="share of the schedule encoded / img2img's denoise "
                                                      "(default: the model's setting, 0.7)")
    parser.add_argument("--out", default=OUT, help="folder for cycle_diffusion_<model>.json")
    parser.add_argument("--grid-dir", help="folder for cycle_diffusion_<model>.png (default: --out)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.model, args.count, args.out, args.grid_dir, args.strength)
    print(tables(result))
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
