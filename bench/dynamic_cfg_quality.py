"""Dynamic CFG (issue 15) on the reference models: greedy per-step guidance scales chosen by a judge, against CFG
at each candidate scale held fixed.

    python -m bench.dynamic_cfg_quality --models sd15 --per-prompt 4 --out-dir docs/bench
    python -m bench.dynamic_cfg_quality --tables docs/bench/dynamic_cfg_quality_sd15.json

Every row samples the evaluation captions (``bench.quality.prompt_set``: 10 prompts x --per-prompt seeds, 128 px,
20 Euler steps, KSampler, the normal scheduler on the SD1.5-class model, simple on the Flux-class one) through
ComfyUI's engine and is scored as ``bench.quality`` scores: digit adherence (the digit oracle), colour and
background adherence, Fréchet distance of the oracle's features to held-out real digits, clipped share, chroma.

- fixed: CFG at each candidate scale (1, 3, 5, 7.5, 10).
- dynamic, digit oracle: TrainFreeDynamicCFG over the same candidates, judged by TrainFreeDigitOracleJudge with the
  caption's digit as target. This is circular for digit adherence (the judge is the oracle that scores it); colour
  adherence and the Fréchet distance are not what it optimises. Run with the sampler's cfg at 7.5 and at 3 (exact
  ties, where the oracle is certain of several candidates, go to the sampler's cfg).
- dynamic, prompt judge: judged by TrainFreePromptJudge (the Diffusion Classifier with the sampled model, 2
  timesteps) over the caption and two rivals (the same caption with another digit, with another colour), target
  the caption: an evaluator the scores do not share.
Cost: seconds per image against the fixed row at the sampler's cfg, and the node's own count of judged candidate
estimates and seconds spent judging (from its log).
"""
import argparse
import json
import os
import sys
import time

import torch

from bench.cache_quality import logged
from bench.quality import __main__ as quality
from bench.quality import oracle
from harness import comfy_host
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "dynamic_cfg_quality")
SCHEDULERS = {"sd15": "normal", "flux": "simple"}
CANDIDATES = (1.0, 3.0, 5.0, 7.5, 10.0)
STEPS = 20
PROMPT_JUDGE_TIMESTEPS = 2


def rivals(digit, colour, background):
    """The caption and two rivals for the prompt judge: another digit, another colour."""
    colours = list(digits.COLOURS)
    other_colour = colours[(colours.index(colour) + 2) % len(colours)]
    return [digits.caption(digit, colour, background), digits.caption((digit + 5) % 10, colour, background),
            digits.caption(digit, other_colour, background)]


def graph(model, captions, per_prompt, seed, steps, cfg, judge=None):
    """API prompt: reference model -> (per caption: dynamic CFG judged towards that caption) -> KSampler."""
    def patch(i, caption, prompt):
        digit, colour, background = caption
        if judge is None:
            return None
        inputs = {"model": ["model", 0], "candidate_scales": ", ".join(f"{w:g}" for w in CANDIDATES),
                  "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0}
        if judge == "oracle":
            inputs.update(judge=["oracle", 0], target=digits.WORDS[digit], vae=["model", 2])
        else:
            prompt[f"judge{i}"] = {"class_type": "TrainFreePromptJudge", "inputs": {
                "clip": ["model", 1], "prompts": "\n".join(rivals(digit, colour, background)),
                "timesteps": PROMPT_JUDGE_TIMESTEPS, "seed": 0}}
            inputs.update(judge=[f"judge{i}", 0], target="1")
        prompt[f"dynamic{i}"] = {"class_type": "TrainFreeDynamicCFG", "inputs": inputs}
        return [f"dynamic{i}", 0]
    return quality.per_caption_graph(quality.MODELS[model], captions, per_prompt, cfg, steps, seed,
                                     SCHEDULERS[model], patch,
                                     {"oracle": {"class_type": "TrainFreeDigitOracleJudge", "inputs": {}}})


def schedules(records):
    """Per run, from the node's log: (judged estimates, judge seconds, [per image: the chosen scale per step])."""
    runs = []
    for r in records:
        if r.name == "trainfree" and str(r.msg).startswith("TrainFree Dynamic CFG:"):
            _, _, estimates, seconds, text = r.args
            images = [[float(w) for w in line.split(":", 1)[1].split()] for line in text.splitlines()]
            runs.append((estimates, seconds, images))
    return runs


class Bench:
    def __init__(self, model, prompts, per_prompt, grid_dir=OUT, only=()):
        self.model, self.per_prompt, self.grid_dir, self.only = model, per_prompt, grid_dir, set(only)
        self.captions = quality.prompt_set(prompts)
        self.judge = oracle.load()
        reference = comfy_host.pack_module("nodes.reference_model")
        self.real = quality.real_features(
            self.judge, lambda: reference.TrainFreeReferenceModel().load(quality.MODELS[model])[2], OUT, model)
        self.rows = []

    def run(self, name, cfg, judge=None, **settings):
        if self.only and name not in self.only:
            return None
        quality._collected.clear()
        started = time.perf_counter()
        _, records = logged(lambda: comfy_host.execute_prompt(
            graph(self.model, self.captions, self.per_prompt, 0, STEPS, cfg, judge)))
        seconds = time.perf_counter() - started
        images = torch.cat([quality._collected[str(i)] for i in range(len(self.captions))]).permute(0, 3, 1, 2)
        images = images.float()
        row = {"row": name, "cfg": cfg, "judge": judge, **settings, "seconds_per_image": seconds / len(images),
               **quality.score(images, self.captions, self.per_prompt, self.judge, self.real)}
        runs = schedules(records)
        if judge is not None:
            if len(runs) != len(self.captions):
                raise RuntimeError(f"{name}: {len(runs)} Dynamic CFG log lines for {len(self.captions)} runs")
            per_image = [s for _, _, images_ in runs for s in images_]
            steps = len(per_image[0])
            row.update(judged_estimates_per_image=sum(e for e, _, _ in runs) / len(images),
                       judge_seconds_per_image=sum(s for _, s, _ in runs) / len(images),
                       mean_schedule=[sum(s[t] for s in per_image) / len(per_image) for t in range(steps)],
                       mean_chosen_scale=sum(map(sum, per_image)) / (len(per_image) * steps),
                       chosen_share={f"{w:g}": sum(x == w for s in per_image for x in s) / (len(per_image) * steps)
                                     for w in CANDIDATES},
                       distinct_schedules=len({tuple(s) for s in per_image}),
                       schedules=per_image)
        os.makedirs(self.grid_dir, exist_ok=True)
        quality.save_grid(images, self.per_prompt, os.path.join(self.grid_dir, f"dynamic_cfg_{self.model}_{name}.png"))
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


def format_row(r):
    extra = ""
    if r.get("judge"):
        extra = (f"  mean w {r['mean_chosen_scale']:.2f}  judged {r['judged_estimates_per_image']:.0f}/img "
                 f"({r['judge_seconds_per_image']:.2f} s/img)")
    return (f"{r['row']:<22} digit {r['digit_adherence']:.3f}  colour {r['colour_adherence']:.3f}  "
            f"background {r['background_adherence']:.3f}  FD {r['frechet_distance']:8.1f}  "
            f"clipped {r['clipped_share']:.4f}  {r['seconds_per_image']:.2f} s/img{extra}")


def run_model(model, args):
    bench = Bench(model, args.prompts, args.per_prompt, args.grid_dir or OUT, args.rows or ())
    for w in CANDIDATES:
        bench.run(f"cfg_{w:g}", w, method="CFG")
    for cfg in (7.5, 3.0):
        bench.run(f"dynamic_oracle_cfg_{cfg:g}", cfg, "oracle", method="Dynamic CFG, digit oracle judge")
    if not args.skip_prompt_judge:
        bench.run("dynamic_prompt_cfg_7.5", 7.5, "prompt",
                  method=f"Dynamic CFG, prompt judge ({PROMPT_JUDGE_TIMESTEPS} timesteps, 3 captions)")
    fixed = {r["cfg"]: r for r in bench.rows if r["judge"] is None}
    for r in bench.rows:
        if r["judge"] is not None:
            if r["cfg"] in fixed:
                r["seconds_per_image_of_cfg_row"] = fixed[r["cfg"]]["seconds_per_image"]
                r["cost_vs_cfg"] = r["seconds_per_image"] / fixed[r["cfg"]]["seconds_per_image"]
    return {"model": model, "model_file": quality.MODELS[model], "scheduler": SCHEDULERS[model], "steps": STEPS,
            "prompts": args.prompts, "per_prompt": args.per_prompt, "candidates": list(CANDIDATES),
            "host": comfy_host.host_version(), "torch_threads": torch.get_num_threads(), "rows": bench.rows}


def tables(result):
    columns = [("row", "row", "{}"), ("cfg", "cfg", "{:g}"), ("digit", "digit_adherence", "{:.3f}"),
               ("colour", "colour_adherence", "{:.3f}"), ("background", "background_adherence", "{:.3f}"),
               ("FD", "frechet_distance", "{:.1f}"), ("clipped", "clipped_share", "{:.3f}"),
               ("mean w", "mean_chosen_scale", "{:.2f}"), ("s / img", "seconds_per_image", "{:.2f}"),
               ("x CFG time", "cost_vs_cfg", "{:.1f}"), ("judged / img", "judged_estimates_per_image", "{:.0f}")]
    out = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in result["rows"]:
        out.append("| " + " | ".join("-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in columns)
                   + " |")
    out.append("")
    for r in result["rows"]:
        if r.get("mean_schedule"):
            shares = ", ".join(f"{w}: {s:.0%}" for w, s in r["chosen_share"].items())
            out.append(f"- {r['row']}: mean scale per step " + " ".join(f"{w:.1f}" for w in r["mean_schedule"])
                       + f"; share of choices {shares}; {r['distinct_schedules']} distinct schedules")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SCHEDULERS), default=["sd15"])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--per-prompt", type=int, default=4, help="seeds (batch items) per prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-prompt-judge", action="store_true")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="run only these rows (e.g. cfg_3 "
                                                                 "dynamic_oracle_cfg_3)")
    parser.add_argument("--grid-dir", help="write each row's grid here as dynamic_cfg_<model>_<row>.png (default: "
                                           "bench/output/dynamic_cfg_quality)")
    parser.add_argument("--out-dir", default=OUT, help="raw JSON: <out-dir>/dynamic_cfg_quality_<model>.json")
    parser.add_argument("--tables", nargs="+", metavar="JSON", help="print the markdown tables of saved results "
                                                                    "and stop")
    args = parser.parse_args()
    if args.tables:
        quality.print_saved(args.tables, tables)
        return
    quality.boot_bench(args.threads)
    os.makedirs(OUT, exist_ok=True)
    for model in args.models:
        result = {"command": " ".join(["python -m bench.dynamic_cfg_quality"] + sys.argv[1:]),
                  **run_model(model, args)}
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"dynamic_cfg_quality_{model}.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
