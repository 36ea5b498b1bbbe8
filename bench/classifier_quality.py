"""The Diffusion Classifier (issue 15) as a zero-shot digit classifier on the reference models, against the digit
oracle, with and without adaptive elimination.

    python -m bench.classifier_quality --count 20 --models sd15     # docs/bench/classifier_quality_sd15.json
    python -m bench.classifier_quality --count 20 --models flux     # docs/bench/classifier_quality_flux.json
    python -m bench.classifier_quality --from-json docs/bench/classifier_quality_sd15.json \
        docs/bench/classifier_quality_flux.json                      # the table of both again

Held-out real digit scans (never trained on), the same number of each digit, rendered as the training data is
(colour, background, shift). Each image's candidates are the ten captions that differ only in the digit word; the
colour and background come from the image's own caption, as a user who knows them would write. Each image is one
API prompt through ComfyUI's engine: TrainFreeReferenceModel -> VAEEncode of the image -> TrainFreeDiffusionClassifier
(seed 0, batch 8), once per plan:

- ``elimination``: the node's defaults, timesteps 25, 250 and keep 5, 1 (the paper's plan for Pets);
- ``all``: every candidate at all 250 timesteps (timesteps 250, keep 1).

Accuracy: the share of images whose best prompt names the true digit; also the true caption's mean rank. Cost
per image: model evaluations (the (t, eps) pairs the node's scores list, summed over candidates) and the seconds of
the whole prompt (wall and CPU time; loading the model and encoding the image are included and measured alone as
``overhead``). The oracle (bench/quality/oracle.py, trained on the train split) reads the same images; chance is
10%. The raw rows are written to --json after every image (one file per model), so an interrupted run keeps what
it measured and ``--resume`` goes on from there.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench.quality import __main__ as quality
from bench.quality import oracle
from harness import collect, comfy_host, run_workflows
from training import digits

SEED = 11
POOL = 10  # renderings drawn per digit; the images are a prefix of these
PLANS = {"elimination": ("25, 250", "5, 1"), "all": ("250", "1")}
JSON = os.path.join(comfy_host.PACK_DIR, "docs", "bench", "classifier_quality_{model}.json")
HarnessSupplyImage, _supplied = collect.supplier("image", "IMAGE")


def balanced_held_out(count, seed=SEED):
    """``count`` (at most 10 * POOL) held-out digits, digit i % 10 at position i (every prefix of ten is balanced,
    and a smaller count gives a prefix of a larger one's images): (images [N, 3, H, W], digits, colours,
    backgrounds)."""
    if count > 10 * POOL:
        raise SystemExit(f"at most {10 * POOL} images")
    scans, labels = digits.load_scans()
    _, test_idx = digits.split(labels)
    per_digit = POOL
    drawn = [digits.examples(scans, labels, test_idx[labels[test_idx] == d], per_digit, seed=seed + d)
             for d in range(10)]
    order = [(i % 10, i // 10) for i in range(count)]
    images = torch.stack([drawn[d][0][k] for d, k in order])
    return images, [d for d, _ in order], [drawn[d][3][k] for d, k in order], [drawn[d][4][k] for d, k in order]


def candidates(colour, background):
    return [digits.caption(d, colour, background) for d in range(10)]


def boot():
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS["HarnessSupplyImage"] = HarnessSupplyImage


def image_prompt(model, key, texts=None, plan=None):
    """Loader -> supplied image -> VAEEncode (-> the classifier with ``plan`` when ``texts`` are given)."""
    prompt = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": quality.MODELS[model]}},
              "image": {"class_type": "HarnessSupplyImage", "inputs": {"key": key}},
              "latent": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["model", 2]}}}
    if texts is None:  # the overhead alone: something has to consume the latent
        prompt["keep"] = {"class_type": "PreviewImage", "inputs": {"images": ["decoded", 0]}}
        prompt["decoded"] = {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["model", 2]}}
        return prompt
    timesteps, keep = PLANS[plan]
    prompt["classify"] = {"class_type": "TrainFreeDiffusionClassifier", "inputs": {
        "model": ["model", 0], "clip": ["model", 1], "candidates": "\n".join(texts), "timesteps_per_stage": timesteps,
        "keep_per_stage": keep, "seed": 0, "batch_size": 8, "latent": ["latent", 0]}}
    return prompt


def parse_scores(text):
    """The node's ui text: best prompt, then 'mean  (n pairs)  prompt' lines in ranking order -> (best,
    [(prompt, mean, pairs)])."""
    best, *lines = text.splitlines()
    rows = []
    for line in lines:
        mean, rest = line.split("  (", 1)
        pairs, prompt = rest.split(" pairs)  ", 1)
        rows.append((prompt, float(mean), int(pairs)))
    return best, rows


def timed(prompt):
    start, start_cpu = time.perf_counter(), time.process_time()
    outputs = comfy_host.execute_prompt(prompt)
    return outputs, time.perf_counter() - start, time.process_time() - start_cpu


def classify_one(model, key, digit, colour, background, plan):
    texts = candidates(colour, background)
    outputs, wall, cpu = timed(image_prompt(model, key, texts, plan))
    best, rows = parse_scores(outputs["classify"]["text"][0])
    if best != rows[0][0]:
        raise RuntimeError(f"the node's best prompt {best!r} is not the first of its ranking {rows[0][0]!r}")
    ranking = [r[0] for r in rows]
    return {"best_digit": texts.index(best), "correct": texts.index(best) == digit,
            "true_rank": ranking.index(texts[digit]) + 1, "evaluations": sum(r[2] for r in rows),
            "seconds": wall, "cpu_seconds": cpu, "scores": [[texts.index(p), m, n] for p, m, n in rows]}


def overhead(model, key, repeats=3):
    """Median wall / CPU seconds of the prompt without the classifier (load, encode, decode)."""
    runs = [timed(image_prompt(model, key))[1:] for _ in range(repeats)]
    return {"seconds": statistics.median(r[0] for r in runs), "cpu_seconds": statistics.median(r[1] for r in runs)}


def summary(rows, plan):
    found = [r[plan] for r in rows]
    return {"accuracy": sum(f["correct"] for f in found) / len(found),
            "mean_true_rank": statistics.mean(f["true_rank"] for f in found),
            "evaluations_per_image": statistics.mean(f["evaluations"] for f in found),
            "seconds_per_image": statistics.median(f["seconds"] for f in found),
            "cpu_seconds_per_image": statistics.median(f["cpu_seconds"] for f in found)}


def run_model(model, count, result, path):
    images, numbers, colours, backgrounds = balanced_held_out(count)
    with torch.no_grad():
        predicted = oracle.load()(images).argmax(1).tolist()
    entry = result["models"].setdefault(model, {"rows": []})
    for i in range(len(entry["rows"]), count):
        key = f"{model}{i}"
        _supplied[key] = images[i:i + 1].permute(0, 2, 3, 1).contiguous()
        if "overhead" not in entry:
            entry["overhead"] = overhead(model, key)
        row = {"digit": numbers[i], "caption": digits.caption(numbers[i], colours[i], backgrounds[i]),
               "oracle_digit": predicted[i], "oracle_correct": predicted[i] == numbers[i]}
        for plan in PLANS:
            row[plan] = classify_one(model, key, numbers[i], colours[i], backgrounds[i], plan)
        entry["rows"].append(row)
        rows = entry["rows"]
        entry["summary"] = {plan: summary(rows, plan) for plan in PLANS}
        entry["summary"]["oracle_accuracy"] = sum(r["oracle_correct"] for r in rows) / len(rows)
        entry["summary"]["plans_agree"] = sum(r["elimination"]["best_digit"] == r["all"]["best_digit"]
                                             for r in rows) / len(rows)
        entry["summary"]["images"] = len(rows)
        write(result, path)
        print(f"  {model} {i + 1}/{count}: digit {numbers[i]}  elimination -> {row['elimination']['best_digit']} "
              f"({row['elimination']['seconds']:.1f} s)  all -> {row['all']['best_digit']} "
              f"({row['all']['seconds']:.1f} s)  oracle -> {predicted[i]}", flush=True)


def write(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def table(result):
    lines = ["| model | reader | correct | accuracy | mean rank of the true caption | model evaluations / image "
             "| s / image, wall | s / image, CPU |", "|---|---|---|---|---|---|---|---|"]
    for model, entry in result["models"].items():
        s, n = entry["summary"], entry["summary"]["images"]
        for plan, name in (("elimination", "classifier, elimination (25, 250; keep 5, 1)"),
                           ("all", "classifier, all 10 candidates at 250 timesteps")):
            p = s[plan]
            lines.append(f"| {model} | {name} | {round(p['accuracy'] * n)}/{n} | {p['accuracy']:.0%} "
                         f"| {p['mean_true_rank']:.2f} | {p['evaluations_per_image']:.0f} "
                         f"| {p['seconds_per_image']:.1f} | {p['cpu_seconds_per_image']:.1f} |")
        lines.append(f"| {model} | digit oracle | {round(s['oracle_accuracy'] * n)}/{n} | {s['oracle_accuracy']:.0%} "
                     f"| - | - | - | - |")
        lines.append(f"| {model} | chance | - | 10% | 5.50 | - | - | - |")
    lines.append("")
    for model, entry in result["models"].items():
        s = entry["summary"]
        lines.append(f"{model}: both plans give the same answer on {s['plans_agree']:.0%} of the images; loading the "
                     f"model and encoding the image (included in the seconds above, medians of whole prompts) take "
                     f"{entry['overhead']['seconds']:.2f} s wall, {entry['overhead']['cpu_seconds']:.2f} s CPU.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=50, help="held-out images per model (digit i %% 10 at i)")
    parser.add_argument("--models", nargs="+", choices=sorted(quality.MODELS), default=["sd15", "flux"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", default=JSON, help="raw rows per model, rewritten after every image ({model} is "
                                                     "the model's name)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json, go on from there")
    parser.add_argument("--from-json", nargs="+", help="print the table of earlier runs' raw rows and stop")
    args = parser.parse_args()
    if args.from_json:
        merged = {"models": {}}
        for path in args.from_json:
            with open(path) as f:
                merged["models"].update(json.load(f)["models"])
        print(table(merged))
        return
    boot()
    torch.set_num_threads(args.threads)
    command = " ".join(["python", "-m", "bench.classifier_quality"] + sys.argv[1:])
    results = {}
    for model in args.models:
        path = args.json.format(model=model)
        result = {"command": command, "comfyui": comfy_host.host_version(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "plans": PLANS, "seed": SEED, "models": {}}
        if args.resume and os.path.exists(path):
            with open(path) as f:
                earlier = json.load(f)
            result["models"] = {model: earlier["models"][model]} if model in earlier["models"] else {}
            result["resumed_from"] = [earlier["command"]] + earlier.get("resumed_from", [])
        run_model(model, args.count, result, path)
        results[model] = result["models"][model]
    print(table({"models": results}))


if __name__ == "__main__":
    main()
