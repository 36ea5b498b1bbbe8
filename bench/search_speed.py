"""Score reached per second of inference-time search, side by side in one run: each method on the same reference
model, prompts and seeds, the models loaded once, timed per image.

    python -m bench.search_speed --model sd15 --out docs/bench

Rows: a single Euler ancestral path (the reference), then best-of-N, Diffusion Tree Sampling (DTS*) and Latent Beam
Search at ``PATHS`` paths' worth of model evaluations (``bench.search_quality``'s graph and settings), and EluCD on
one path (its default scale, climbing the same scorer's gradient). Per row: seconds
per image, the mean Digit Scorer score (a log-probability, 0 = perfect), its gain over the single path and that
gain per second of sampling; the ratios are against best-of-N's gain per second (> 1: the method buys score faster).
Other techniques join by adding a row to ``ROWS``: a function (model, caption, seed, key) -> API prompt that ends in
HarnessCollectImages under ``key``. Writes ``search_speed_<model>.json`` to --out.
"""
import argparse
import json
import os
import time

import torch

from bench import search_quality as sq
from bench.quality import __main__ as quality
from bench.sampler_quality import HarnessCountRows
from harness import comfy_host
from training import digits

PATHS = 4


def search_row(method, paths):
    return lambda model, caption, seed, key: sq.image_prompt(model, caption, seed, method, paths, key)


def elucd_row(model, caption, seed, key):
    """One Euler ancestral path (the single path's graph) on the model patched by EluCD at its defaults, climbing
    the Digit Scorer of the caption: no extra model evaluation, one VAE decode and backward pass per step."""
    nodes = sq.image_prompt(model, caption, seed, "best_of_n", 1, key)
    counted = next(n for n in nodes.values() if n["class_type"] == "HarnessCountRows")
    scorer = next(k for k, n in nodes.items() if n["class_type"] == "TrainFreeDigitScorer")
    nodes["elucd"] = {"class_type": "TrainFreeEluCD", "inputs": {
        "model": counted["inputs"]["model"], "scorer": [scorer, 0], "vae": ["model", 2], "scale": 0.05,
        "joint_temperature": 1.0, "marginal_temperature": 0.5, "softplus_beta": 3.0,
        "schedule": "linear decay + sine (EDM)", "gamma": 0.3, "start_percent": 0.0, "end_percent": 1.0}}
    counted["inputs"]["model"] = ["elucd", 0]
    return nodes


ROWS = {"single_path": search_row("best_of_n", 1),
        "best_of_n": search_row("best_of_n", PATHS),
        "tree_dts_star": search_row("tree_dts_star", PATHS),
        "beam": search_row("beam", PATHS),
        "elucd": elucd_row}


def run(model, prompts=3, seeds=1, out=sq.OUT):
    quality.boot_bench(2, HarnessCountRows=HarnessCountRows)
    scorers = comfy_host.pack_module("guidance_ops.scorers")
    texts = [digits.caption(*c) for c in quality.prompt_set(prompts)]
    comfy_host.execute_prompt(ROWS["single_path"](model, texts[0], 0, "warm"))  # loads the models once
    rows = {}
    for name, build in ROWS.items():
        quality._collected.clear()
        seconds, scores = 0.0, []
        for i, text in enumerate(texts):
            for s in range(seeds):
                started = time.perf_counter()
                comfy_host.execute_prompt(build(model, text, 1000 * i + s, f"{i}|{s}"))
                seconds += time.perf_counter() - started
                image = quality._collected[f"{i}|{s}"].permute(0, 3, 1, 2).float().clamp(0, 1)
                with torch.no_grad():
                    scores.append(float(scorers.DigitColourScorer(text).score(image)[0]))
        count = len(texts) * seeds
        rows[name] = {"seconds_per_image": seconds / count, "score": sum(scores) / count, "scores": scores}
    base = rows["single_path"]
    for row in rows.values():
        row["gain"] = row["score"] - base["score"]
        row["gain_per_second"] = row["gain"] / row["seconds_per_image"]
    reference = rows["best_of_n"]["gain_per_second"]
    for row in rows.values():
        row["ratio_to_best_of_n"] = row["gain_per_second"] / reference if reference else None
    result = {"command": f"python -m bench.search_speed --model {model} --prompts {prompts} --seeds {seeds}",
              "model": model, "paths": PATHS, "steps": sq.STEPS, "cfg": sq.CFG[model], "captions": texts,
              "host": comfy_host.host_label().split(" ")[0], "threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"search_speed_{model}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def table(result):
    lines = ["| row | s / image | Digit Scorer score | gain over one path | gain / s | vs best-of-N |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        ratio = "-" if r["ratio_to_best_of_n"] is None or name == "single_path" else f"{r['ratio_to_best_of_n']:.2f}x"
        lines.append(f"| {name} | {r['seconds_per_image']:.2f} | {r['score']:.3f} | {r['gain']:+.3f} | "
                     f"{r['gain_per_second']:+.4f} | {ratio} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(quality.MODELS), default="sd15")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default=sq.OUT)
    args = parser.parse_args()
    print(table(run(args.model, args.prompts, args.seeds, args.out)))


if __name__ == "__main__":
    main()
