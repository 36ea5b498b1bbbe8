"""Run a technique (or a workflow) on the reference model over a fixed set of prompts and seeds; print one row.

    python -m bench.quality --name cfg_7.5 --cfg 7.5
    python -m bench.quality --name pag --cfg 7.5 --patch TrainFreePAG scale=3.0
    python -m bench.quality --name wf --workflow workflows/pag_sd15.json
    python -m bench.quality --name cached --cfg 7.5 --patch ... --against cfg_7.5   # adds PSNR / SSIM
    python -m bench.quality --model flux --name flux_cfg_3 --cfg 3 --scheduler simple

Everything runs through ComfyUI's execution engine. Each row is written to --out as <name>.json, the images
as <name>.png (one row per prompt) and <name>.pt (for later --against comparisons).
"""
import argparse
import json
import os
import time

import torch

from bench.quality import metrics, oracle
from harness import collect, comfy_host, run_workflows
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "quality")
MODELS = {"sd15": "trainfree_digits.safetensors", "flux": "trainfree_digits_flux.safetensors"}
HarnessCollectImages, _collected = collect.collector("images", "IMAGE")


def prompt_set(count):
    """``count`` captions cycling over digits, colours and backgrounds (the same every run)."""
    colours, backgrounds = list(digits.COLOURS), list(digits.BACKGROUNDS)
    return [(i % 10, colours[(i * 3) % len(colours)], backgrounds[(i // 5) % 2]) for i in range(count)]


def technique_graph(captions, per_prompt, cfg, steps, seed, patches, sampler="euler", scheduler="normal",
                    model_file=MODELS["sd15"]):
    """API prompt: reference model -> patches -> one KSampler per caption -> images collected by caption."""
    prompt = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": model_file}}}
    model = ["model", 0]
    for i, (class_type, inputs) in enumerate(patches):
        inputs = dict(inputs)
        for name, value in inputs.items():
            if isinstance(value, dict) and "class_type" in value:  # an input made by a node of its own
                prompt[f"patch{i}_{name}"] = value
                inputs[name] = [f"patch{i}_{name}", 0]
        prompt[f"patch{i}"] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [f"patch{i}", 0]
    prompt["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["model", 1]}}
    prompt["latent"] = {"class_type": "EmptyLatentImage",
                        "inputs": {"width": digits.SIZE, "height": digits.SIZE, "batch_size": per_prompt}}
    for i, (digit, colour, background) in enumerate(captions):
        prompt[f"pos{i}"] = {"class_type": "CLIPTextEncode",
                             "inputs": {"text": digits.caption(digit, colour, background), "clip": ["model", 1]}}
        prompt[f"sample{i}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed + i, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": [f"pos{i}", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}}
        prompt[f"decode{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample{i}", 0], "vae": ["model", 2]}}
        prompt[f"out{i}"] = {"class_type": "HarnessCollectImages", "inputs": {"images": [f"decode{i}", 0], "key": str(i)}}
    return prompt


def per_caption_graph(model_file, captions, per_prompt, cfg, steps, seed, scheduler, patch=None, shared=None):
    """API prompt: reference model -> per caption ``patch(i, caption, prompt)`` (nodes it adds to ``prompt`` for
    that caption; returns the model to sample, or None for the plain model) -> KSampler -> images collected by
    caption. ``shared`` nodes (judges, say) join the prompt once."""
    prompt = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": model_file}},
              "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["model", 1]}},
              "latent": {"class_type": "EmptyLatentImage",
                         "inputs": {"width": digits.SIZE, "height": digits.SIZE, "batch_size": per_prompt}},
              **(shared or {})}
    for i, caption in enumerate(captions):
        model = (patch(i, caption, prompt) if patch else None) or ["model", 0]
        prompt[f"pos{i}"] = {"class_type": "CLIPTextEncode",
                             "inputs": {"text": digits.caption(*caption), "clip": ["model", 1]}}
        prompt[f"sample{i}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed + i, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": scheduler, "positive": [f"pos{i}", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}}
        prompt[f"decode{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample{i}", 0],
                                                                      "vae": ["model", 2]}}
        prompt[f"out{i}"] = {"class_type": "HarnessCollectImages",
                             "inputs": {"images": [f"decode{i}", 0], "key": str(i)}}
    return prompt


@torch.no_grad()
def real_features(judge, vae_source, out, model, count=360, seed=777):
    """Oracle features of held-out real digits passed through the reference model's VAE (cached in ``out``)."""
    path = os.path.join(out, f"real_features_{model}.pt")
    if os.path.exists(path):
        return torch.load(path)
    scans, labels = digits.load_scans()
    _, test_idx = digits.split(labels)
    images = digits.examples(scans, labels, test_idx, count, seed=seed)[0]
    vae = vae_source()
    round_trip = vae.decode(vae.encode(images.permute(0, 2, 3, 1))).permute(0, 3, 1, 2).clamp(0, 1)
    feats = judge.embed(round_trip)
    torch.save(feats, path)
    return feats


def score(images, captions, per_prompt, judge, reference_features):
    """images: [N, 3, H, W] in 0..1, ``per_prompt`` consecutive images per caption."""
    wanted_digits = torch.tensor([d for d, _, _ in captions]).repeat_interleave(per_prompt)
    wanted_colours = [c for _, c, _ in captions for _ in range(per_prompt)]
    wanted_backgrounds = [b for _, _, b in captions for _ in range(per_prompt)]
    with torch.no_grad():
        predicted = judge(images).argmax(1)
        feats = judge.embed(images)
    colours = metrics.nearest_colour(metrics.foreground_colour(images), digits.COLOURS)
    backgrounds = metrics.nearest_background(images, digits.BACKGROUNDS)
    return {"digit_adherence": (predicted == wanted_digits).float().mean().item(),
            "colour_adherence": sum(a == b for a, b in zip(colours, wanted_colours)) / len(colours),
            "background_adherence": sum(a == b for a, b in zip(backgrounds, wanted_backgrounds)) / len(backgrounds),
            "frechet_distance": (None if reference_features is None
                                 else metrics.frechet_distance(feats, reference_features)),
            "clipped_share": metrics.clipped_share(images), "mean_chroma": metrics.mean_chroma(images)}


def save_grid(images, per_prompt, path):
    from PIL import Image
    rows = images.reshape(-1, per_prompt, *images.shape[1:])
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    Image.fromarray(grid.permute(1, 2, 0).mul(255).round().byte().numpy()).save(path)


def run(name, cfg=7.5, patches=(), workflow=None, prompts=10, per_prompt=8, steps=20, seed=0, against=None,
        out=OUT, sampler="euler", scheduler="normal", model="sd15", features=True):
    """One row of the quality table. ``features=False`` skips the Frechet distance and the real digits' features
    it needs (a VAE round trip of 360 digits): for tests that do not read it."""
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS["HarnessCollectImages"] = HarnessCollectImages
    os.makedirs(out, exist_ok=True)
    captions = prompt_set(prompts)
    _collected.clear()
    started = time.perf_counter()
    if workflow:
        images = []
        for i, (d, c, b) in enumerate(captions):
            graph = run_workflows.to_reference_prompt(workflow, digits.caption(d, c, b), per_prompt, steps, seed + i)
            for key, node in graph.items():
                if node["class_type"] in ("SaveImage", "PreviewImage"):
                    graph[key] = {"class_type": "HarnessCollectImages",
                                  "inputs": {"images": node["inputs"]["images"], "key": "0"}}
            comfy_host.execute_prompt(graph)
            images.append(_collected.pop("0"))
    else:
        comfy_host.execute_prompt(technique_graph(captions, per_prompt, cfg, steps, seed, list(patches), sampler,
                                                  scheduler, MODELS[model]))
        images = [_collected[str(i)] for i in range(len(captions))]
    seconds = time.perf_counter() - started
    images = torch.cat(images).permute(0, 3, 1, 2).float()
    judge = oracle.load()
    pack_nodes = comfy_host.pack_module("nodes.reference_model")
    row = {"name": name, "model": model, "scheduler": scheduler, "cfg": cfg, "patches": [list(p) for p in patches],
           "workflow": workflow, "prompts": prompts,
           "per_prompt": per_prompt, "steps": steps, "seed": seed, "seconds_per_image": seconds / len(images),
           **score(images, captions, per_prompt, judge,
                   real_features(judge, lambda: pack_nodes.TrainFreeReferenceModel().load(MODELS[model])[2], out,
                                 model) if features else None)}
    if against:
        reference = torch.load(os.path.join(out, f"{against}.pt")).float() / 255
        row.update(against=against, psnr=metrics.psnr(images, reference), ssim=metrics.ssim(images, reference))
    torch.save(images.mul(255).round().byte(), os.path.join(out, f"{name}.pt"))
    save_grid(images, per_prompt, os.path.join(out, f"{name}.png"))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(row, f, indent=1)
    return row


def print_saved(paths, tables):
    """A bench's --tables: print the tables of saved results (``tables(result)`` makes them) with their commands."""
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        print(f"{result['model']}: {result['command']}\n\n{tables(result)}")


def boot_bench(threads, **harness_nodes):
    """ComfyUI booted for a quality bench: the image collector (and ``harness_nodes``) registered, torch's threads
    set."""
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessCollectImages=HarnessCollectImages, **harness_nodes)
    torch.set_num_threads(threads)


def format_row(row):
    extra = f"  psnr {row['psnr']:.2f}  ssim {row['ssim']:.3f}" if "psnr" in row else ""
    return (f"{row['name']:<16} digit {row['digit_adherence']:.3f}  colour {row['colour_adherence']:.3f}  "
            f"background {row['background_adherence']:.3f}  "
            f"FD {row['frechet_distance']:8.2f}  clipped {row['clipped_share']:.4f}  chroma {row['mean_chroma']:.3f}"
            f"  {row['seconds_per_image']:.2f} s/img{extra}")


def _value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--patch", nargs="+", action="append", default=[], metavar=("NODE", "KEY=VALUE"),
                        help="a MODEL->MODEL node and its inputs, applied in order (repeatable); an input "
                             "whose value is a JSON node ({class_type, inputs}) is that node's first output, e.g. "
                             "cache_schedule= a TrainFreeLoadCacheSchedule node")
    parser.add_argument("--workflow")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15",
                        help="reference model: sd15 (trainfree_digits) or flux (trainfree_digits_flux)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    args = parser.parse_args()
    patches = [(p[0], {k: _value(v) for k, v in (kv.split("=", 1) for kv in p[1:])}) for p in args.patch]
    row = run(args.name, args.cfg, patches, args.workflow, args.prompts, args.per_prompt, args.steps, args.seed,
              args.against, args.out, args.sampler, args.scheduler, args.model)
    print(format_row(row))


if __name__ == "__main__":
    main()
