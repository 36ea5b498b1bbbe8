"""NASA (issue 15) on the reference models: how often a negated colour is removed at 1-4 steps, against CFG with
the same negative prompt.

    python -m bench.nasa_quality --out-dir docs/bench            # both reference models
    python -m bench.nasa_quality --models sd15 --per-prompt 4
    python -m bench.nasa_quality --steps 10 --alpha -1 0.5 1 2 --tag _10_steps

Captions "a <colour> digit <d> on a dark background" for d = 0..9 (``--per-prompt`` seeds each), negative prompt
"<colour>" (default red). Rows per step count (Euler; normal scheduler on the SD1.5-class model, simple on the
Flux-class one): cfg 1 without a negative (how often the colour is drawn at all), CFG with the negative at
--cfg scales, and TrainFreeNASA at cfg 1 with the negative at each --alpha (-1 = the family default). An image
counts as "removed" when its foreground colour (``bench.quality.metrics.foreground_colour``) is nearest to a
palette colour other than the negated one; the digit oracle says whether the digit survived
("removed_with_digit_kept": not the negated colour and read as the prompted digit; at 1-2 steps the reference
models, trained for multi-step sampling, draw blobs or noise, whose colour says little). Seconds per image
are wall-clock on this machine (the step-time ratio NASA / CFG is the cost column).
"""
import argparse
import json
import os
import sys
import time

import torch

from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from harness import comfy_host, run_workflows
from training import digits

SCHEDULERS = {"sd15": "normal", "flux": "simple"}


def graph(model, colour, negative, per_prompt, steps, cfg, seed, alpha=None):
    """API prompt: reference model [-> NASA] -> one KSampler per digit -> images collected by digit."""
    prompt = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": quality.MODELS[model]}},
              "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["model", 1]}},
              "empty": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["model", 1]}},
              "latent": {"class_type": "EmptyLatentImage" if model == "sd15" else "EmptySD3LatentImage",
                         "inputs": {"width": digits.SIZE, "height": digits.SIZE, "batch_size": per_prompt}}}
    sampled = ["model", 0]
    if alpha is not None:
        prompt["nasa"] = {"class_type": "TrainFreeNASA", "inputs": {
            "model": sampled, "negative": ["negative", 0], "alpha": alpha, "start_percent": 0.0,
            "end_percent": 1.0}}
        sampled = ["nasa", 0]
    sampler_negative = ["negative", 0] if alpha is None and cfg > 1 else ["empty", 0]
    for d in range(10):
        prompt[f"pos{d}"] = {"class_type": "CLIPTextEncode",
                             "inputs": {"text": digits.caption(d, colour, "dark"), "clip": ["model", 1]}}
        prompt[f"sample{d}"] = {"class_type": "KSampler", "inputs": {
            "model": sampled, "seed": seed + d, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": SCHEDULERS[model], "positive": [f"pos{d}", 0], "negative": sampler_negative,
            "latent_image": ["latent", 0], "denoise": 1.0}}
        prompt[f"decode{d}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample{d}", 0],
                                                                       "vae": ["model", 2]}}
        prompt[f"out{d}"] = {"class_type": "HarnessCollectImages",
                             "inputs": {"images": [f"decode{d}", 0], "key": str(d)}}
    return prompt


def row(name, model, colour, negative, per_prompt, steps, cfg, seed, judge, alpha=None, grid_dir=None):
    quality._collected.clear()
    started = time.perf_counter()
    comfy_host.execute_prompt(graph(model, colour, negative, per_prompt, steps, cfg, seed, alpha))
    seconds = time.perf_counter() - started
    images = torch.cat([quality._collected[str(d)] for d in range(10)]).permute(0, 3, 1, 2).float()
    colours = metrics.nearest_colour(metrics.foreground_colour(images), digits.COLOURS)
    with torch.no_grad():
        predicted = judge(images).argmax(1)
    wanted = torch.arange(10).repeat_interleave(per_prompt)
    if grid_dir:
        quality.save_grid(images, per_prompt, os.path.join(grid_dir, f"nasa_{model}_{name}.png"))
    correct = (predicted == wanted).tolist()
    return {"name": name, "steps": steps, "cfg": cfg, "alpha": alpha, "images": len(colours),
            "removal_rate": sum(c != colour for c in colours) / len(colours),
            "removed_with_digit_kept": sum(c != colour and ok for c, ok in zip(colours, correct)) / len(colours),
            "per_image": [[c, bool(ok)] for c, ok in zip(colours, correct)],
            "colours": {c: colours.count(c) for c in sorted(set(colours))},
            "digit_adherence": (predicted == wanted).float().mean().item(),
            "mean_chroma": metrics.mean_chroma(images), "seconds_per_image": seconds / len(colours)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "flux"], choices=sorted(SCHEDULERS))
    parser.add_argument("--colour", default="red", choices=sorted(digits.COLOURS))
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4, 10])
    parser.add_argument("--cfg", nargs="*", type=float, default=[5.0])
    parser.add_argument("--alpha", nargs="*", type=float, default=[-1.0, 0.5, 1.0])
    parser.add_argument("--per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.path.join(comfy_host.PACK_DIR, "bench", "output"))
    parser.add_argument("--grid-dir", help="save each row's images here (one row per digit)")
    parser.add_argument("--tag", default="", help="suffix of the result file: nasa_quality_<model><tag>.json")
    args = parser.parse_args()
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS["HarnessCollectImages"] = quality.HarnessCollectImages
    judge = oracle.load()
    os.makedirs(args.out_dir, exist_ok=True)
    for model in args.models:
        rows = []
        for steps in args.steps:
            plan = [(f"cfg_1_{steps}", 1.0, None)] + [(f"cfg_{c:g}_{steps}", c, None) for c in args.cfg] + \
                   [(f"nasa_{'auto' if a < 0 else f'{a:g}'}_{steps}", 1.0, a) for a in args.alpha]
            for name, cfg, alpha in plan:
                r = row(name, model, args.colour, args.colour, args.per_prompt, steps, cfg, args.seed, judge, alpha,
                        args.grid_dir)
                rows.append(r)
                print(f"{model} {name:<16} removed {r['removal_rate']:.3f} (digit kept "
                      f"{r['removed_with_digit_kept']:.3f})  digit {r['digit_adherence']:.3f}  "
                      f"chroma {r['mean_chroma']:.3f}  {r['seconds_per_image']:.3f} s/img  {r['colours']}",
                      flush=True)
                result = {"command": " ".join(["python -m bench.nasa_quality"] + sys.argv[1:]),
                          "comfyui": comfy_host.host_version(), "model": quality.MODELS[model],
                          "colour": args.colour, "negative_prompt": args.colour, "rows": rows}
                path = os.path.join(args.out_dir, f"nasa_quality_{model}{args.tag}.json")
                with open(path, "w") as f:  # after every row
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
