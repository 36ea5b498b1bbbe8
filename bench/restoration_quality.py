"""Plug-and-play restoration on the reference models: held-out real digits degraded (half the digit masked, 4x
super-resolution, heavy noise), restored by the pack's restorers and by ComfyUI's own inpainting / img2img at the
same number of model evaluations, scored by PSNR / SSIM to the clean digit and by the digit oracle.

    python -m bench.restoration_quality --model sd15 --out docs/bench --grid-dir docs/quality
    python -m bench.restoration_quality --model flux --out docs/bench --grid-dir docs/quality
    python -m bench.restoration_quality --tables docs/bench/restoration_sd15.json docs/bench/restoration_flux.json

Each restorer is one entry of ``METHODS`` (name -> function adding its nodes to a digit's API prompt and returning
the restored latent), so another restorer joins by adding an entry. Everything runs through ComfyUI's execution
engine, one API prompt per digit, task and method, each timed (the time per restoration in the same run as its
baseline). Writes ``restoration_<model>.json`` (raw rows) to --out and ``restoration_<model>.png`` (per task, one
row per digit: clean, observed, the measurement's start image, each method) to --grid-dir, and prints the tables.
"""
import argparse
import json
import os
import time

import torch

from bench.inversion_quality import (HarnessCollectImages, HarnessSupplyImage, Prompt, _collected, _supplied,
                                     held_out)
from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from harness import comfy_host, run_workflows

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "restoration")
SIZE = run_workflows.REFERENCE_SIZE
# Per model: the scheduler, the CFG of every method (RED-diff's guider and the baselines' KSampler alike), and
# the model evaluations each restoration gets (RED-diff's iterations; the baselines' steps).
SETTINGS = {"sd15": {"scheduler": "normal", "cfg": 3.0, "evaluations": 20},
            "flux": {"scheduler": "simple", "cfg": 3.0, "evaluations": 20}}
TASKS = {"inpainting": {"degradation": "inpainting", "factor": 4, "noise_level": 0.0},
         "super-resolution": {"degradation": "super-resolution", "factor": 4, "noise_level": 0.0},
         "denoising": {"degradation": "denoising", "factor": 4, "noise_level": 0.25}}
IMG2IMG_STRENGTH = 0.5  # the baselines' denoise for super-resolution and denoising
RED_DIFF = {"learning_rate": 0.5, "lambda": 0.25, "observation_weight": 1.0, "weighting": "linear"}  # the README's
SEED = 11


def red_diff(p, links, task, s):
    sampler = p.add("TrainFreeREDDiff", measurement=links["measurement"], vae=["model", 2], **RED_DIFF)
    guider = p.add("CFGGuider", model=["model", 0], positive=links["caption"], negative=links["empty"], cfg=s["cfg"])
    sigmas = p.add("BasicScheduler", model=["model", 0], scheduler=s["scheduler"], steps=s["evaluations"],
                   denoise=1.0)
    noise = p.add("RandomNoise", noise_seed=links["seed"])
    return p.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                 latent_image=links["latent"])


def comfy_baseline(p, links, task, s):
    """Inpainting: the start latent with a noise mask (ComfyUI's SetLatentNoiseMask), sampled from full noise in the
    mask; super-resolution and denoising: img2img of the start image at IMG2IMG_STRENGTH."""
    latent, denoise = links["latent"], IMG2IMG_STRENGTH
    if task == "inpainting":
        latent, denoise = p.add("SetLatentNoiseMask", samples=latent, mask=links["mask"]), 1.0
    return p.add("KSampler", model=["model", 0], seed=links["seed"], steps=s["evaluations"], cfg=s["cfg"],
                 sampler_name="euler", scheduler=s["scheduler"], positive=links["caption"], negative=links["empty"],
                 latent_image=latent, denoise=denoise)


METHODS = {"red_diff": red_diff, "comfy_baseline": comfy_baseline}


def lower_half_mask(p):
    """MASK, 1 on the lower half of the image, from core nodes."""
    whole = p.add("SolidMask", value=0.0, width=SIZE, height=SIZE)
    half = p.add("SolidMask", value=1.0, width=SIZE, height=SIZE // 2)
    return p.add("MaskComposite", destination=whole, source=half, x=0, y=SIZE // 2, operation="add")


def digit_prompt(model, i, task, caption, method=None):
    """Digit ``i`` degraded for ``task``; with ``method`` its restoration collected as ``<task>|<method>|i``,
    without, the observed and start images (``<task>|observed|i``, ``<task>|start|i``)."""
    s = SETTINGS[model]
    p = Prompt()
    p.add("TrainFreeReferenceModel", node_id="model", model_file=quality.MODELS[model])
    clean = p.add("HarnessSupplyImage", key=str(i))
    degradation = dict(TASKS[task])
    if task == "inpainting":
        degradation["mask"] = lower_half_mask(p)
    observed = p.add("TrainFreeDegrade", image=clean, seed=SEED + i, **degradation)
    measurement = p.add("TrainFreeMeasurement", image=observed, **degradation)
    start = [measurement[0], 1]
    if method is None:
        p.add("HarnessCollectImages", images=observed, key=f"{task}|observed|{i}")
        p.add("HarnessCollectImages", images=start, key=f"{task}|start|{i}")
        return p.nodes
    links = {"measurement": measurement, "mask": degradation.get("mask"), "seed": SEED + i,
             "latent": p.add("VAEEncode", pixels=start, vae=["model", 2]), "caption": p.text(caption),
             "empty": p.text("")}
    p.collect(METHODS[method](p, links, task, s), f"{task}|{method}|{i}")
    return p.nodes


def score(images, clean, judge, numbers):
    with torch.no_grad():
        read = judge(images).argmax(1).tolist()
    return {"psnr": metrics.psnr(images, clean), "ssim": metrics.ssim(images, clean),
            "oracle_accuracy": sum(a == b for a, b in zip(read, numbers)) / len(numbers)}


def run(model, count=10, out=OUT, grid_dir=None, methods=tuple(METHODS), tasks=tuple(TASKS)):
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessSupplyImage=HarnessSupplyImage, HarnessCollectImages=HarnessCollectImages)
    images, captions, numbers, *_ = held_out(count)
    _collected.clear()
    for i in range(count):
        _supplied[str(i)] = images[i:i + 1].permute(0, 2, 3, 1).contiguous()
    comfy_host.execute_prompt(digit_prompt(model, 0, tasks[0], captions[0], methods[0]))  # warm-up: loads models
    seconds = {}
    for task in tasks:
        for i, caption in enumerate(captions):
            comfy_host.execute_prompt(digit_prompt(model, i, task, caption))
        for method in methods:
            started = time.perf_counter()
            for i, caption in enumerate(captions):
                comfy_host.execute_prompt(digit_prompt(model, i, task, caption, method))
            seconds[task, method] = (time.perf_counter() - started) / count
    got = lambda key: torch.cat([_collected[f"{key}|{i}"] for i in range(count)]).permute(0, 3, 1, 2).float()  # noqa
    judge = oracle.load()
    s = SETTINGS[model]
    common = {"model": model, "model_file": quality.MODELS[model], "digits": count, "seed": SEED, **s,
              "host": comfy_host.host_label().split(" ")[0]}
    rows = [{**common, "task": "clean", "method": "clean digit", **score(images, images, judge, numbers)}]
    for task in tasks:
        rows.append({**common, "task": task, **TASKS[task], "method": "start (measurement's right inverse)",
                     **score(got(f"{task}|start"), images, judge, numbers)})
        for method in methods:
            rows.append({**common, "task": task, **TASKS[task], "method": method,
                         "seconds_per_restoration": seconds[task, method],
                         **score(got(f"{task}|{method}").clamp(0, 1), images, judge, numbers)})
    command = f"python -m bench.restoration_quality --model {model} --count {count}"
    result = {"command": command, "captions": captions, "red_diff": RED_DIFF, "img2img_strength": IMG2IMG_STRENGTH,
              "matched_compute": f"{s['evaluations']} guider evaluations per restoration (RED-diff: iterations; "
                                 f"baselines: KSampler steps), cfg {s['cfg']} with the digit's true caption",
              "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"restoration_{model}.json"), "w") as f:
        json.dump(result, f, indent=1)
    grid_dir = grid_dir or out
    os.makedirs(grid_dir, exist_ok=True)
    blocks = []
    for task in tasks:
        columns = [images, got(f"{task}|observed"), got(f"{task}|start")] + [got(f"{task}|{m}") for m in methods]
        columns[1] = torch.nn.functional.interpolate(columns[1], size=(SIZE, SIZE), mode="nearest")
        blocks.append(torch.stack(columns, 1).flatten(0, 1))
    quality.save_grid(torch.cat(blocks).clamp(0, 1), 3 + len(methods),
                      os.path.join(grid_dir, f"restoration_{model}.png"))
    return result


def tables(result):
    lines = ["| task | method | PSNR (dB) | SSIM | oracle accuracy | s / restoration |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        seconds = f"{r['seconds_per_restoration']:.1f}" if "seconds_per_restoration" in r else "-"
        fidelity = "- | -" if r["task"] == "clean" else f"{r['psnr']:.2f} | {r['ssim']:.3f}"
        lines.append(f"| {r['task']} | {r['method']} | {fidelity} | {r['oracle_accuracy']:.2f} | {seconds} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="sd15")
    parser.add_argument("--count", type=int, default=10, help="held-out digits")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated entries of METHODS")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated entries of TASKS")
    parser.add_argument("--out", default=OUT, help="folder for restoration_<model>.json")
    parser.add_argument("--grid-dir", help="folder for restoration_<model>.png (default: --out)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", nargs="+", metavar="JSON", help="print the tables of saved results and stop")
    args = parser.parse_args()
    if args.tables:
        for path in args.tables:
            with open(path) as f:
                saved = json.load(f)
            print(f"{saved['rows'][0]['model']}: {saved['command']}\n\n{tables(saved)}\n")
        return
    torch.set_num_threads(args.threads)
    result = run(args.model, args.count, args.out, args.grid_dir, tuple(args.methods.split(",")),
                 tuple(args.tasks.split(",")))
    print(tables(result))


if __name__ == "__main__":
    main()
