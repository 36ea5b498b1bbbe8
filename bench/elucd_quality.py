"""EluCD calibrated classifier guidance (issue 18) on the reference models: CFG against CFG + EluCD climbing the
digit scorer of each prompt, and CFG with more steps at EluCD's cost.

    python -m bench.elucd_quality --out-dir docs/bench --grid-dir docs/quality

Every row samples the evaluation captions (``bench.quality.prompt_set``: --prompts x --per-prompt seeds, 128 px,
Euler; normal scheduler on the SD1.5-class model, simple on the Flux-class one) and is scored as ``bench.quality``
scores (digit oracle adherence, colour / background adherence, Fréchet distance of the oracle's features to
held-out real digits), plus the mean digit-scorer score (log p(digit) + log p(colour); perfect = 0). For each cfg
W of --cfgs:

- ``cfg_W``: plain CFG, --steps steps.
- ``elucd_S_cfg_W``: CFG + EluCD at scale S with TrainFreeDigitScorer(caption) and the paper's calibration (joint
  temperature 1, marginal 0.5, Softplus beta 3, the EDM schedule with gamma 0.3), --steps steps.
- ``cfg_W_equal_time``: plain CFG with the steps EluCD's seconds per image buy: cost equalised by wall time on this
  machine, the same model, sampler and batch. A row's seconds are a fixed part (prompts, the final decode) plus a
  part per step, read off ``cfg_W`` and a 2-step probe row (kept in the JSON's "probes"); the fastest EluCD row
  counts, since every scale does the same work.

The scorer's digit term is the network of the oracle that scores digit adherence, and its colour term reads the ink's
hue as the colour adherence does, so EluCD's digit / colour adherence and mean score are circular: they show that the
guidance climbs what it is given. The Fréchet distance and the background adherence are not seen by the scorer.
Model rows are counted by an APPLY_MODEL wrapper.
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

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "elucd_quality")
SCHEDULERS = {"sd15": "normal", "flux": "simple"}
PROBE_STEPS = 2  # a short plain row that measures what a row costs besides its steps


def graph(model, captions, per_prompt, cfg, scale, steps, seed):
    """Reference model -> row counter -> (per caption: EluCD with that caption's digit scorer) -> KSampler."""
    def patch(i, caption, prompt):
        if scale is None:
            return ["counted", 0]
        prompt[f"scorer{i}"] = {"class_type": "TrainFreeDigitScorer", "inputs": {"prompt": digits.caption(*caption)}}
        prompt[f"elucd{i}"] = {"class_type": "TrainFreeEluCD", "inputs": {
            "model": ["counted", 0], "scorer": [f"scorer{i}", 0], "vae": ["model", 2], "scale": scale,
            "joint_temperature": 1.0, "marginal_temperature": 0.5, "softplus_beta": 3.0,
            "schedule": "linear decay + sine (EDM)", "gamma": 0.3, "start_percent": 0.0, "end_percent": 1.0}}
        return [f"elucd{i}", 0]
    shared = {"counted": {"class_type": "HarnessCountRows", "inputs": {"model": ["model", 0]}}}
    return quality.per_caption_graph(quality.MODELS[model], captions, per_prompt, cfg, steps, seed,
                                     SCHEDULERS[model], patch, shared)


def mean_score(images, captions, per_prompt):
    from guidance_ops.scorers import DigitColourScorer
    scores = []
    with torch.no_grad():
        for i, caption in enumerate(captions):
            rows = images[i * per_prompt:(i + 1) * per_prompt]
            scores.append(DigitColourScorer(digits.caption(*caption)).score(rows))
    return torch.cat(scores).mean().item()


def run_row(model, args, captions, judge_net, reference, name, cfg, scale, steps):
    quality._collected.clear()
    _rows_seen.clear()
    started = time.perf_counter()
    comfy_host.execute_prompt(graph(model, captions, args.per_prompt, cfg, scale, steps, 0))
    seconds = time.perf_counter() - started
    images = torch.cat([quality._collected[str(i)] for i in range(len(captions))]).permute(0, 3, 1, 2).float()
    row = {"name": name, "cfg": cfg, "scale": scale, "steps": steps, "seconds_per_image": seconds / len(images),
           "model_rows_per_image": sum(_rows_seen) / len(images),
           "mean_score": mean_score(images, captions, args.per_prompt),
           **quality.score(images, captions, args.per_prompt, judge_net, reference)}
    print(f"{model} {quality.format_row(row)}  score {row['mean_score']:.3f}  steps {steps}  "
          f"rows/img {row['model_rows_per_image']:.0f}", flush=True)
    if name != "warm_up" and not name.endswith("_probe"):  # timing rows get no grid
        os.makedirs(args.grid_dir or args.out_dir, exist_ok=True)
        quality.save_grid(images, args.per_prompt,
                          os.path.join(args.grid_dir or args.out_dir, f"elucd_{model}_{name}.png"))
    return row


def run_model(model, args):
    captions = quality.prompt_set(args.prompts)
    judge_net = oracle.load()
    pack_nodes = comfy_host.pack_module("nodes.reference_model")
    reference = quality.real_features(judge_net, lambda: pack_nodes.TrainFreeReferenceModel().load(
        quality.MODELS[model])[2], OUT, model)
    run_row(model, args, captions[:1], judge_net, reference, "warm_up", 1.0, None, 2)  # load off the clock
    rows, probes = [], []
    for cfg in args.cfgs:
        plain = run_row(model, args, captions, judge_net, reference, f"cfg_{cfg:g}", cfg, None, args.steps)
        guided = [run_row(model, args, captions, judge_net, reference, f"elucd_{scale:g}_cfg_{cfg:g}", cfg, scale,
                          args.steps) for scale in args.scales]
        # every scale does the same work; the fastest row is the least disturbed by other loads on the machine
        cost = min(r["seconds_per_image"] for r in guided)
        probe = run_row(model, args, captions, judge_net, reference, f"cfg_{cfg:g}_probe", cfg, None, PROBE_STEPS)
        equal_steps = equal_time_steps(plain, probe, cost)
        rows += [plain, *guided, run_row(model, args, captions, judge_net, reference, f"cfg_{cfg:g}_equal_time", cfg,
                                         None, equal_steps)]
        probes.append(probe)
    return {"model": model, "steps": args.steps, "prompts": args.prompts, "per_prompt": args.per_prompt,
            "threads": args.threads, "rows": rows, "probes": probes}


def equal_time_steps(plain, probe, seconds):
    """The steps at which plain CFG takes ``seconds`` per image: a row's time is a fixed part (prompts, the final
    decode, scoring) plus a part per step, both read off the --steps row and a PROBE_STEPS row."""
    per_step = (plain["seconds_per_image"] - probe["seconds_per_image"]) / (plain["steps"] - probe["steps"])
    fixed = plain["seconds_per_image"] - per_step * plain["steps"]
    return max(plain["steps"], round((seconds - fixed) / per_step))


def table(result):
    lines = ["| row | cfg | steps | digit | colour | background | FD | mean score | model rows / image | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['cfg']:g} | {r['steps']} | {r['digit_adherence']:.3f} | {r['colour_adherence']:.3f} | "
                     f"{r['background_adherence']:.3f} | {r['frechet_distance']:.1f} | {r['mean_score']:.3f} | "
                     f"{r['model_rows_per_image']:.0f} | {r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SCHEDULERS), default=list(SCHEDULERS))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.05])
    parser.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=OUT, help="raw JSON: <out-dir>/elucd_quality_<model>.json")
    parser.add_argument("--grid-dir", help="folder for the grids (default: --out-dir)")
    parser.add_argument("--tables", nargs="+", metavar="JSON", help="print the tables of saved results and stop")
    args = parser.parse_args()
    if args.tables:
        quality.print_saved(args.tables, table)
        return
    quality.boot_bench(args.threads, HarnessCountRows=HarnessCountRows)
    os.makedirs(OUT, exist_ok=True)
    for model in args.models:
        result = {"command": " ".join(["python -m bench.elucd_quality"] + sys.argv[1:]), **run_model(model, args)}
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"elucd_quality_{model}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(table(result))


if __name__ == "__main__":
    main()
