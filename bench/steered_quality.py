"""Steered Diffusion against ComfyUI's own inpainting / img2img on the reference models: held-out real digits
degraded (lower half masked, 4x super-resolution, heavy noise), restored, scored by PSNR / SSIM against the clean
digit and by the digit oracle's accuracy.

    python -m bench.steered_quality --model sd15 --out docs/bench --grid-dir docs/quality
    python -m bench.steered_quality --model flux --out docs/bench --grid-dir docs/quality

Every method runs through ComfyUI's execution engine (one API prompt per digit and task) with the same model, the
digit's caption without its digit word ("a red digit on a dark background": which digit it is must come from the
observation), an empty negative at the model's ``CFG``, the same seed and the same number of model evaluations
(``STEPS`` Euler steps):

- ``observation``: TrainFree Measurement's start image (no model; the masked, block-upsampled or noisy image);
- ``core_inpaint`` (inpainting): VAEEncode + SetLatentNoiseMask, denoise 1 (ComfyUI replaces the known region by
  the noised source at every step);
- ``core_img2img`` (every task): VAEEncode of the start image, denoise ``IMG2IMG_DENOISE``;
- ``steered``: TrainFree Steered Diffusion from noise (denoise 1), strength 1, one iteration.

Steered Diffusion also decodes twice and back-propagates once through the VAE decoder per step: the seconds per
image of each method (one prompt per image and method, the models already loaded) are reported next to the
others. Writes ``steered_<model>.json`` (raw rows) to --out and
``steered_<model>.png`` (per digit and task: clean, observation, then the methods) to --grid-dir.
"""
import argparse
import json
import os
import time

import torch

from bench.inversion_quality import HarnessCollectImages, HarnessSupplyImage, Prompt, _collected, _supplied, held_out
from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from harness import comfy_host, run_workflows

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "steered")
STEPS = 10
IMG2IMG_DENOISE = 0.5
SCHEDULERS = {"sd15": "normal", "flux": "simple"}
CFG = {"sd15": 3.0, "flux": 5.0}
# task -> TrainFree Degrade / Measurement settings (the mask, for inpainting, is the lower half)
TASKS = {"inpainting": {"degradation": "inpainting", "factor": 4, "noise_level": 0.0},
         "super-resolution 4x": {"degradation": "super-resolution", "factor": 4, "noise_level": 0.0},
         "heavy noise (std 0.2)": {"degradation": "denoising", "factor": 4, "noise_level": 0.2}}
SIZE = 128


def methods(task):
    core = ["core_inpaint"] if TASKS[task]["degradation"] == "inpainting" else []
    return ["observation"] + core + ["core_img2img", "steered"]


def lower_half(p):
    empty = p.add("SolidMask", value=0.0, width=SIZE, height=SIZE)
    half = p.add("SolidMask", value=1.0, width=SIZE, height=SIZE // 2)
    return p.add("MaskComposite", destination=empty, source=half, x=0, y=SIZE // 2, operation="add")


def hint(colour, background):
    return f"a {colour} digit on a {background} background"


def task_prompt(model, i, task, seed, caption, method):
    """One digit, one task, one method: the collected image is keyed ``<task>|<method>|<i>``."""
    settings = TASKS[task]
    p = Prompt()
    p.add("TrainFreeReferenceModel", node_id="model", model_file=quality.MODELS[model])
    clean = p.add("HarnessSupplyImage", key=str(i))
    mask = {"mask": lower_half(p)} if settings["degradation"] == "inpainting" else {}
    observed = p.add("TrainFreeDegrade", image=clean, seed=seed, **settings, **mask)
    measured = p.add("TrainFreeMeasurement", image=observed, **settings, **mask)
    start = [measured[0], 1]
    key = f"{task}|{method}|{i}"
    if method == "observation":
        p.add("HarnessCollectImages", images=start, key=key)
        return p.nodes
    latent = p.add("VAEEncode", pixels=start, vae=["model", 2])
    if method == "core_inpaint":
        latent = p.add("SetLatentNoiseMask", samples=latent, mask=mask["mask"])
    if method == "steered":
        sampler = p.add("TrainFreeSteeredDiffusion", measurement=measured, vae=["model", 2], strength=1.0,
                        iterations=1)
    else:
        sampler = p.add("KSamplerSelect", sampler_name="euler")
    denoise = IMG2IMG_DENOISE if method == "core_img2img" else 1.0
    sigmas = p.add("BasicScheduler", model=["model", 0], scheduler=SCHEDULERS[model], steps=STEPS, denoise=denoise)
    guider = p.add("CFGGuider", model=["model", 0], positive=p.text(caption), negative=p.text(""), cfg=CFG[model])
    out = p.add("SamplerCustomAdvanced", noise=p.add("RandomNoise", noise_seed=seed), guider=guider, sampler=sampler,
                sigmas=sigmas, latent_image=latent)
    p.collect(out, key)
    return p.nodes


def run(model, count=4, out=OUT, grid_dir=None, seed=0):
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessSupplyImage=HarnessSupplyImage, HarnessCollectImages=HarnessCollectImages)
    images, captions, numbers, colours, backgrounds = held_out(count)
    _collected.clear()
    _supplied["warm"] = images[:1].permute(0, 2, 3, 1).contiguous()
    comfy_host.execute_prompt(task_prompt(model, "warm", "inpainting", seed, hint(colours[0], backgrounds[0]),
                                          "core_inpaint"))  # loads the models once
    seconds = {}
    for i in range(count):
        _supplied[str(i)] = images[i:i + 1].permute(0, 2, 3, 1).contiguous()
        for task in TASKS:
            for method in methods(task):
                started = time.perf_counter()
                comfy_host.execute_prompt(task_prompt(model, i, task, seed + i, hint(colours[i], backgrounds[i]),
                                                      method))
                seconds[task, method] = seconds.get((task, method), 0.0) + time.perf_counter() - started
    got = lambda key: torch.cat([_collected[f"{key}|{i}"] for i in range(count)]).permute(0, 3, 1, 2).float()  # noqa
    judge = oracle.load()
    rows = []
    for task in TASKS:
        for method in methods(task):
            restored = got(f"{task}|{method}").clamp(0, 1)
            with torch.no_grad():
                read = judge(restored).argmax(1).tolist()
            rows.append({"model": model, "task": task, "method": method, "psnr": metrics.psnr(restored, images),
                         "ssim": metrics.ssim(restored, images),
                         "oracle_accuracy": sum(a == b for a, b in zip(read, numbers)) / count,
                         "seconds_per_image": seconds[task, method] / count,
                         "psnr_each": [metrics.psnr(a[None], b[None]) for a, b in zip(restored, images)]})
    with torch.no_grad():
        clean_read = judge(images).argmax(1).tolist()
    result = {"command": f"python -m bench.steered_quality --model {model} --count {count}",
              "model_file": quality.MODELS[model], "digits": count, "steps": STEPS, "scheduler": SCHEDULERS[model],
              "img2img_denoise": IMG2IMG_DENOISE, "cfg": CFG[model],
              "prompts": [hint(c, b) for c, b in zip(colours, backgrounds)],
              "host": comfy_host.host_label().split(" ")[0], "captions": captions,
              "oracle_accuracy_on_clean": sum(a == b for a, b in zip(clean_read, numbers)) / count, "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"steered_{model}.json"), "w") as f:
        json.dump(result, f, indent=1)
    grid_dir = grid_dir or out
    os.makedirs(grid_dir, exist_ok=True)
    width = max(len(methods(t)) for t in TASKS) + 1
    tiles = []
    for i in range(count):
        for task in TASKS:
            row = [images[i]] + [got(f"{task}|{m}")[i].clamp(0, 1) for m in methods(task)]
            tiles += row + [torch.zeros_like(images[i])] * (width - len(row))
    quality.save_grid(torch.stack(tiles), width, os.path.join(grid_dir, f"steered_{model}.png"))
    return result


def table(result):
    lines = ["| task | method | PSNR (dB) | SSIM | oracle accuracy | s / image |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        secs = f"{r['seconds_per_image']:.2f}" if "seconds_per_image" in r else "-"
        lines.append(f"| {r['task']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{r['oracle_accuracy']:.2f} | {secs} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(quality.MODELS), default="sd15")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--grid-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.count, args.out, args.grid_dir)
    print(table(result))
    print(f"oracle accuracy on the clean digits: {result['oracle_accuracy_on_clean']:.2f}")


if __name__ == "__main__":
    main()
