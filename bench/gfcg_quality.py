"""Gradient-Free Classifier Guidance (issue 15) on the reference models: CFG against CFG + GFCG on adherence and
Fréchet distance, with the extra model rows and seconds it costs.

    python -m bench.gfcg_quality --out-dir docs/bench --grid-dir docs/quality

Every row samples the evaluation captions (``bench.quality.prompt_set``: --prompts x --per-prompt seeds, 128 px,
20 Euler steps; normal scheduler on the SD1.5-class model, simple on the Flux-class one) and is scored as
``bench.quality`` scores (digit oracle adherence, colour / background adherence, Fréchet distance of the oracle's
features to held-out real digits). GFCG's classes are the ten captions that differ from the prompt in the digit
word alone; its target is the prompted digit.

- ``cfg_W``: plain CFG at W (1 = no guidance, 3).
- ``gfcg_prompt_cfg_W``: GFCG (scale 2) judged by a Prompt Judge over the ten captions (the Diffusion Classifier with
  the sampled model, --judge-timesteps timesteps): the judge is not the oracle that scores adherence.
- ``gfcg_oracle_cfg_3``: GFCG judged by the digit oracle itself; its digit adherence is circular (the judge is the
  scorer) and is reported only beside the colour, background and FD it does not see.

Model rows are counted by an APPLY_MODEL wrapper upstream of the patches (every pass, the judge's included).
"""
import argparse
import json
import os
import sys
import time

import torch

from bench.quality import __main__ as quality
from bench.quality import oracle
from bench.sampler_quality import HarnessCountRows, _rows_seen
from harness import comfy_host
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "gfcg_quality")
SCHEDULERS = {"sd15": "normal", "flux": "simple"}
ROWS = (("cfg_1", 1.0, None), ("gfcg_prompt_cfg_1", 1.0, "prompt"), ("cfg_3", 3.0, None),
        ("gfcg_prompt_cfg_3", 3.0, "prompt"), ("gfcg_oracle_cfg_3", 3.0, "oracle"))
SCALE = 2.0


def classes(colour, background):
    return "\n".join(digits.caption(d, colour, background) for d in range(10))


def graph(model, captions, per_prompt, cfg, judge, steps, seed, judge_timesteps):
    """Reference model -> row counter -> (per caption: GFCG over that caption's ten digit captions) -> KSampler."""
    def patch(i, caption, prompt):
        if judge is None:
            return ["counted", 0]
        digit, colour, background = caption
        gfcg = {"model": ["counted", 0], "clip": ["model", 1], "class_prompts": classes(colour, background),
                "target_class": str(digit + 1), "scale": SCALE, "start_percent": 0.0, "end_percent": 1.0}
        if judge == "oracle":
            gfcg.update(judge=["oracle", 0], vae=["model", 2])
        else:
            prompt[f"judge{i}"] = {"class_type": "TrainFreePromptJudge", "inputs": {
                "clip": ["model", 1], "prompts": classes(colour, background), "timesteps": judge_timesteps,
                "seed": 0}}
            gfcg["judge"] = [f"judge{i}", 0]
        prompt[f"gfcg{i}"] = {"class_type": "TrainFreeGFCG", "inputs": gfcg}
        return [f"gfcg{i}", 0]
    shared = {"counted": {"class_type": "HarnessCountRows", "inputs": {"model": ["model", 0]}},
              "oracle": {"class_type": "TrainFreeDigitOracleJudge", "inputs": {}}}
    return quality.per_caption_graph(quality.MODELS[model], captions, per_prompt, cfg, steps, seed,
                                     SCHEDULERS[model], patch, shared)


def run_model(model, args):
    captions = quality.prompt_set(args.prompts)
    judge_net = oracle.load()
    pack_nodes = comfy_host.pack_module("nodes.reference_model")
    reference = quality.real_features(judge_net, lambda: pack_nodes.TrainFreeReferenceModel().load(
        quality.MODELS[model])[2], OUT, model)
    rows = []
    for name, cfg, judge in ROWS:
        quality._collected.clear()
        _rows_seen.clear()
        started = time.perf_counter()
        comfy_host.execute_prompt(graph(model, captions, args.per_prompt, cfg, judge, args.steps, 0,
                                        args.judge_timesteps))
        seconds = time.perf_counter() - started
        images = torch.cat([quality._collected[str(i)] for i in range(len(captions))]).permute(0, 3, 1, 2).float()
        row = {"name": name, "cfg": cfg, "judge": judge, "seconds_per_image": seconds / len(images),
               "model_rows_per_image": sum(_rows_seen) / len(images),
               **quality.score(images, captions, args.per_prompt, judge_net, reference)}
        rows.append(row)
        os.makedirs(args.grid_dir or args.out_dir, exist_ok=True)
        quality.save_grid(images, args.per_prompt, os.path.join(args.grid_dir or args.out_dir,
                                                                f"gfcg_{model}_{name}.png"))
        print(f"{model} {quality.format_row(row)}  rows/img {row['model_rows_per_image']:.0f}", flush=True)
    return {"model": model, "steps": args.steps, "prompts": args.prompts, "per_prompt": args.per_prompt,
            "scale": SCALE, "judge_timesteps": args.judge_timesteps, "rows": rows}


def table(result):
    lines = ["| row | cfg | judge | digit | colour | background | FD | model rows / image | s / image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['cfg']:g} | {r['judge'] or '-'} | {r['digit_adherence']:.3f} | "
                     f"{r['colour_adherence']:.3f} | {r['background_adherence']:.3f} | {r['frechet_distance']:.1f} | "
                     f"{r['model_rows_per_image']:.0f} | {r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SCHEDULERS), default=list(SCHEDULERS))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--judge-timesteps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=OUT, help="raw JSON: <out-dir>/gfcg_quality_<model>.json")
    parser.add_argument("--grid-dir", help="folder for the grids (default: --out-dir)")
    parser.add_argument("--tables", nargs="+", metavar="JSON", help="print the tables of saved results and stop")
    args = parser.parse_args()
    if args.tables:
        quality.print_saved(args.tables, table)
        return
    quality.boot_bench(args.threads, HarnessCountRows=HarnessCountRows)
    os.makedirs(OUT, exist_ok=True)
    for model in args.models:
        result = {"command": " ".join(["python -m bench.gfcg_quality"] + sys.argv[1:]), **run_model(model, args)}
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"gfcg_quality_{model}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(table(result))


if __name__ == "__main__":
    main()
