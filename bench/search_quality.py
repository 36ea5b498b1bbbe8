"""Inference-time search on the reference models: Diffusion Tree Sampling (DTS*), Diffusion Latent Beam Search and
best-of-N at equal budgets of model evaluations, scored by the Digit Scorer of the prompt they sample and judged by
the oracle (digit adherence) and the ink's hue (colour adherence).

    python -m bench.search_quality --model sd15 --out docs/bench --grid-dir docs/quality
    python -m bench.search_quality --model flux --out docs/bench --grid-dir docs/quality

Every image runs through ComfyUI's execution engine: the reference model, CLIPTextEncode of the caption and an
empty negative, CFGGuider at ``CFG`` (1: one pass per evaluation, a base that often misses the prompt),
BasicScheduler (``STEPS`` steps), RandomNoise (one seed per image), EmptyLatentImage 128 x 128, the search sampler
with TrainFree Digit Scorer of the same caption, and SamplerCustomAdvanced. Budgets are whole paths' worth of
evaluations (``PATHS`` x ``STEPS``); at one path every method is ComfyUI's euler_ancestral (beam search with one
beam), so that row is run once. The model evaluations are counted by an APPLY_MODEL wrapper (rows, halved above
CFG 1: CFG's two passes are one evaluation). The search's own score (``score``, a log-probability, 0 = perfect) is
the Digit Scorer's on the returned image; the adherences are the bench's independent reading (``bench.quality``:
the oracle's argmax digit, the nearest palette colour of the foreground). Writes ``search_quality_<model>.json``
(raw rows, per-image scores) to --out and ``search_<model>.png`` (rows: method and budget; columns: the images) to
--grid-dir.
"""
import argparse
import json
import os
import time

import torch

from bench.inversion_quality import Prompt
from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from bench.sampler_quality import HarnessCountRows, _rows_seen
from harness import comfy_host
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "search")
STEPS = 10
SCHEDULERS = {"sd15": "normal", "flux": "simple"}
# CFG 1: a single path often misses the prompt there (bench.gfcg_quality: digit adherence 0.70 / 0.40)
CFG = {"sd15": 1.0, "flux": 1.0}
PATHS = (1, 2, 4, 8)
# method -> (node, settings); beam search keeps the official code's 2 beams, 2 candidates and 6-step lookahead
METHODS = {"best_of_n": ("TrainFreeBestOfN", {}),
           "tree_dts_star": ("TrainFreeDiffusionTreeSampling", {"mode": "search (DTS*)", "lambda": 1.0,
                                                               "max_children": 4}),
           "beam": ("TrainFreeLatentBeamSearch", {"beams": 2, "candidates": 2, "lookahead": 6})}


def sampler_settings(method, paths):
    node, settings = METHODS[method]
    if method == "beam":
        settings = {**settings, "beams": min(settings["beams"], paths)}
    return node, {**settings, "budget": paths * STEPS}


def image_prompt(model, caption, seed, method, paths, key):
    p = Prompt()
    p.add("TrainFreeReferenceModel", node_id="model", model_file=quality.MODELS[model])
    counted = p.add("HarnessCountRows", model=["model", 0])
    node, settings = sampler_settings(method, paths)
    scorer = p.add("TrainFreeDigitScorer", prompt=caption)
    sampler = p.add(node, scorer=scorer, vae=["model", 2], **settings)
    guider = p.add("CFGGuider", model=counted, positive=p.text(caption), negative=p.text(""), cfg=CFG[model])
    sigmas = p.add("BasicScheduler", model=counted, scheduler=SCHEDULERS[model], steps=STEPS, denoise=1.0)
    latent = p.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    out = p.add("SamplerCustomAdvanced", noise=p.add("RandomNoise", noise_seed=seed), guider=guider, sampler=sampler,
                sigmas=sigmas, latent_image=latent)
    image = p.add("VAEDecode", samples=out, vae=["model", 2])
    p.add("HarnessCollectImages", images=image, key=key)
    return p.nodes


def rows_to_run():
    yield "single_path", "best_of_n", 1
    for paths in PATHS[1:]:
        for method in METHODS:
            yield f"{method}_{paths}", method, paths


def run(model, prompts=4, seeds=1, out=OUT, grid_dir=None):
    quality.boot_bench(2, HarnessCountRows=HarnessCountRows)
    scorers = comfy_host.pack_module("guidance_ops.scorers")
    captions = quality.prompt_set(prompts)
    texts = [digits.caption(*c) for c in captions]
    judge = oracle.load()
    comfy_host.execute_prompt(image_prompt(model, texts[0], 0, "best_of_n", 1, "warm"))  # loads the models once
    rows, grid = [], []
    for name, method, paths in rows_to_run():
        quality._collected.clear()
        _rows_seen.clear()
        started = time.perf_counter()
        for i, text in enumerate(texts):
            for s in range(seeds):
                comfy_host.execute_prompt(image_prompt(model, text, 1000 * i + s, method, paths, f"{i}|{s}"))
        seconds = time.perf_counter() - started
        images = torch.cat([quality._collected[f"{i}|{s}"] for i in range(len(texts)) for s in range(seeds)])
        images = images.permute(0, 3, 1, 2).float().clamp(0, 1)
        with torch.no_grad():
            per_image = [float(scorers.DigitColourScorer(texts[i]).score(images[i * seeds + s:i * seeds + s + 1])[0])
                     for i in range(len(texts)) for s in range(seeds)]
        wanted_digits = torch.tensor([d for d, _, _ in captions]).repeat_interleave(seeds)
        wanted_colours = [c for _, c, _ in captions for _ in range(seeds)]
        with torch.no_grad():
            read = judge(images).argmax(1)
        colours = metrics.nearest_colour(metrics.foreground_colour(images), digits.COLOURS)
        node, settings = sampler_settings(method, paths)
        row = {"name": name, "method": "euler_ancestral" if name == "single_path" else method, "paths": paths,
               "budget": paths * STEPS, "settings": settings,
               "evaluations_per_image": sum(_rows_seen) / (2 if CFG[model] > 1 else 1) / len(images),
               "score": sum(per_image) / len(per_image), "scores": per_image,
               "digit_adherence": (read == wanted_digits).float().mean().item(),
               "colour_adherence": sum(a == b for a, b in zip(colours, wanted_colours)) / len(colours),
               "seconds_per_image": seconds / len(images)}
        rows.append(row)
        grid.append(images)
        print(f"{model} {name:>20}: score {row['score']:.3f}  digit {row['digit_adherence']:.2f}  colour "
              f"{row['colour_adherence']:.2f}  evals/img {row['evaluations_per_image']:.0f}  "
              f"s/img {row['seconds_per_image']:.2f}", flush=True)
    result = {"command": f"python -m bench.search_quality --model {model} --prompts {prompts} --seeds {seeds}",
              "model_file": quality.MODELS[model], "steps": STEPS, "scheduler": SCHEDULERS[model], "cfg": CFG[model],
              "captions": texts, "seeds_per_caption": seeds, "host": comfy_host.host_label().split(" ")[0],
              "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"search_quality_{model}.json"), "w") as f:
        json.dump(result, f, indent=1)
    grid_dir = grid_dir or out
    os.makedirs(grid_dir, exist_ok=True)
    quality.save_grid(torch.cat(grid), len(texts) * seeds, os.path.join(grid_dir, f"search_{model}.png"))
    return result


def table(result):
    lines = ["| method | budget (paths) | evaluations / image | Digit Scorer score | digit adherence | "
             "colour adherence | s / image |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['budget']} ({r['paths']}) | {r['evaluations_per_image']:.0f} | "
                     f"{r['score']:.3f} | {r['digit_adherence']:.2f} | {r['colour_adherence']:.2f} | "
                     f"{r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(quality.MODELS), default="sd15")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--grid-dir", default=None)
    args = parser.parse_args()
    print(table(run(args.model, args.prompts, args.seeds, args.out, args.grid_dir)))


if __name__ == "__main__":
    main()
