"""Caching (issue 13) on the reference models: drift and adherence against speed-up.

    python -m bench.cache_quality --write-docs                 # both models (about 15 minutes each on a 2-core CPU)
    python -m bench.cache_quality --models sd15 --out-dir docs/bench --grid-dir docs/quality
    python -m bench.cache_quality --models flux --flux-blocks 0 -1 --out-dir docs/bench   # the whole stack cached

Per model (SD1.5-class: TrainFreeDeepCache, branch 0; Flux-class: TrainFreeBlockCache, blocks 1..last, or the range
``--flux-blocks FIRST LAST`` names: another range is its own run, ``flux_blocks<FIRST>[-<LAST>]`` in file names and
docs markers), through ComfyUI's engine with ``bench.quality``'s rows (10 prompts x --per-prompt seeds, 20 Euler
steps, 128 px):

- ``uncached``: the reference every other row's PSNR / SSIM is measured against (same prompts and seeds);
- ``uniform_N`` / ``non_uniform_N`` for N in INTERVALS (the nodes' own schedules);
- ``dp_N`` / ``ecad_N``: TrainFreeCacheScheduleSearch (dynamic programming / evolutionary) on CALIBRATION captions
  (never the evaluation ones; seed 1000) at the cost of ``uniform_N`` as budget, then loaded back with
  TrainFreeLoadCacheSchedule from the file the search saved;
- ``easycache_N`` / ``lazycache_N``: core ComfyUI's EasyCache / LazyCache (default start 0.15, end 0.95) with the
  reuse threshold bisected on the calibration captions until their speed-up is the nearest to ``uniform_N``'s.

Speed-up (one definition for every row): sampling steps / model-evaluation cost, in units of a full evaluation.
A step of an EasyCache / LazyCache run that they skip costs 0 (they skip the whole model; their log's "skipped
X/Y steps"); a step of a TrainFree cache run costs 1 - (sum of the saved shares of the units it reuses). The
saved share of reusing every unit is measured once per model (``cost_share``: median over REPEATS runs of
uniform 1:2 of 1 - seconds of a reusing evaluation / seconds of a full one, the nodes' own report); for the
Flux block cache it is split between its two units by parameters (the search's cost axis). Counts come from
the schedule actually used and are checked against the nodes' logs.

The searches save their schedules into a temporary ComfyUI output folder, removed at the end; the ones at
PRESET_INTERVAL's cost are copied to the pack's cache_schedules/ as presets.
"""
import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile

import torch

from bench import highres_quality
from bench.quality import __main__ as quality
from harness import collect, comfy_host, run_workflows
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "cache_quality")
DOCS = os.path.join(comfy_host.PACK_DIR, "docs", "quality.md")
PRESETS = os.path.join(comfy_host.PACK_DIR, "cache_schedules")
STEPS, INTERVALS, CFG, REPEATS = 20, (2, 3, 4, 5), 7.5, 3
CALIBRATION_SEED, POPULATION, GENERATIONS = 1000, 8, 3
MODELS = {
    "sd15": {"scheduler": "normal", "node": "TrainFreeDeepCache", "settings": {"cache_branch": 0},
             "preset": "trainfree_digits_deepcache_b0_20steps"},
    "flux": {"scheduler": "simple", "node": "TrainFreeBlockCache", "settings": {"first_block": 1, "last_block": -1},
             "preset": "trainfree_digits_flux_blockcache_1-5_20steps"},
}
FLUX_BLOCKS = 6  # the Flux-class reference model's blocks (double then single): names the preset's range
TAGS = {model: model for model in MODELS}  # a model's run in file names, row names and docs markers
CORE = {"easycache": "EasyCache", "lazycache": "LazyCache"}
PRESET_INTERVAL = 3  # the searched schedules shipped in cache_schedules/: those at uniform 1:3's cost
HarnessKeepModel, _kept = collect.collector("model", "MODEL", take=lambda m: _models.append(m) or torch.zeros(()))
_models = []


def use_flux_blocks(first, last):
    """Cache blocks first..last (the node's counting, -1 = the last) in the Flux rows; their tag in file names."""
    if (first, last) == (1, -1):
        return
    MODELS["flux"] = {**MODELS["flux"], "settings": {"first_block": first, "last_block": last},
                      "preset": f"trainfree_digits_flux_blockcache_{first}-{last % FLUX_BLOCKS}_20steps"}
    TAGS["flux"] = f"flux_blocks{first}" + ("" if last == -1 else f"-{last}")


def calibration_captions():
    """Captions the evaluation set (``quality.prompt_set``) never uses: another colour and background per digit."""
    colours, backgrounds = list(digits.COLOURS), list(digits.BACKGROUNDS)
    return [(d, colours[(d * 3 + 1) % len(colours)], backgrounds[1 - (d // 5) % 2]) for d in (3, 6)]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def logged(fn):
    """``(fn(), [log records])``: INFO records of the run kept here, not printed."""
    handler, root = _Records(), logging.getLogger()
    levels = [(h, h.level) for h in root.handlers]
    for h, _ in levels:
        h.setLevel(max(h.level, logging.WARNING))
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        return fn(), handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for h, level in levels:
            h.setLevel(level)


def trainfree_counts(records):
    """(evaluations, reusing evaluations) summed over the runs, from the cache nodes' log line."""
    found = [r.args for r in records if r.name == "trainfree" and str(r.msg).startswith("TrainFree %s: %d of %d")]
    if any(args[4] for args in found):
        raise RuntimeError(f"a cache run ran reuse steps in full for want of a cached feature: {found}")
    return sum(a[2] for a in found), sum(a[1] for a in found), len(found)


def core_skipped(records, name):
    """(skipped steps, steps) summed over the runs, from EasyCache / LazyCache's own log line."""
    pattern = re.compile(rf"^{name} - skipped (\d+)/(\d+) steps")
    found = [pattern.match(r.getMessage()) for r in records]
    found = [m for m in found if m]
    if not found:
        raise RuntimeError(f"no '{name} - skipped' line in the log")
    return sum(int(m.group(1)) for m in found), sum(int(m.group(2)) for m in found)


def cache_patch(model, **inputs):
    s = MODELS[model]
    return (s["node"], {"cache_interval": 3, "schedule": "uniform", "start_percent": 0.0, "end_percent": 1.0,
                        **s["settings"], **inputs})


def pack_host():
    return comfy_host.pack_module("nodes.host")


def unit_shares(model):
    """The cache node's units and their parameter shares (the search's cost axis), read off a patched model."""
    _models.clear()
    prompt = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": quality.MODELS[model]}}}
    node, inputs = cache_patch(model)
    prompt["cache"] = {"class_type": node, "inputs": {"model": ["model", 0], **inputs}}
    prompt["keep"] = {"class_type": "HarnessKeepModel", "inputs": {"model": ["cache", 0], "key": "0"}}
    comfy_host.execute_prompt(prompt)
    patched = _models.pop()
    host = pack_host()
    units = list(host.cache_scope(patched).trainfree_cache_units)
    return host.unit_shares(patched, units)


def cost_share(model, per_prompt):
    """Saved share of a full evaluation's time when every unit reuses: median over REPEATS runs of uniform 1:2."""
    saved = []
    for i in range(REPEATS):
        _models.clear()
        prompt = quality.technique_graph(quality.prompt_set(1), per_prompt, CFG, STEPS, i,
                                         [cache_patch(model, cache_interval=2)], "euler",
                                         MODELS[model]["scheduler"], quality.MODELS[model])
        prompt["keep"] = {"class_type": "HarnessKeepModel", "inputs": {"model": ["patch0", 0], "key": "0"}}
        comfy_host.execute_prompt(prompt)
        (report,) = [r for k, r in pack_host().run_reports(_models.pop()).items() if "cache" in k]
        saved.append(1 - report["seconds_reusing"] / report["seconds_full"])
    return statistics.median(saved), saved


def schedule_cost(pattern_by_unit, saved_by_unit):
    """Sampling steps over evaluation cost (see the module docstring) for a compute pattern per unit."""
    steps = len(next(iter(pattern_by_unit.values())))
    cost = sum(1 - sum(saved_by_unit[u] for u, p in pattern_by_unit.items() if not p[i]) for i in range(steps))
    return steps / cost


def run_row(model, name, patches, args, against="uncached"):
    s = MODELS[model]
    row, records = logged(lambda: quality.run(
        f"{TAGS[model]}_{name}", CFG, patches, prompts=args.prompts, per_prompt=args.per_prompt, steps=STEPS,
        seed=0, against=None if against is None else f"{TAGS[model]}_{against}", out=OUT, scheduler=s["scheduler"],
        model=model))
    return row, records


def search(model, method, budget):
    """Run the schedule search node; (file name it saved, summary)."""
    s = MODELS[model]
    node, inputs = cache_patch(model)
    prompt = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": quality.MODELS[model]}},
              "cache": {"class_type": node, "inputs": {"model": ["model", 0], **inputs}},
              "search": {"class_type": "TrainFreeCacheScheduleSearch", "inputs": {
                  "model": ["cache", 0], "clip": ["model", 1],
                  "calibration_prompts": "\n".join(digits.caption(*c) for c in calibration_captions()),
                  "negative_prompt": "", "seed": CALIBRATION_SEED, "steps": STEPS, "cfg": CFG,
                  "sampler_name": "euler", "scheduler": s["scheduler"], "width": digits.SIZE,
                  "height": digits.SIZE, "method": method, "budget": budget, "population": POPULATION,
                  "generations": GENERATIONS, "filename_prefix": f"cache_quality_{TAGS[model]}"}}}
    (summary,) = comfy_host.execute_prompt(prompt)["search"]["text"]
    name = re.search(r"saved as (\S+\.json)", summary).group(1)
    return name, summary


def core_speedup(model, kind, threshold):
    """EasyCache / LazyCache's speed-up on the calibration captions (one seed each) at ``threshold``."""
    prompt = quality.technique_graph(calibration_captions(), 1, CFG, STEPS, CALIBRATION_SEED,
                                     [core_patch(kind, threshold)], "euler", MODELS[model]["scheduler"],
                                     quality.MODELS[model])
    _, records = logged(lambda: comfy_host.execute_prompt(prompt))
    skipped, steps = core_skipped(records, CORE[kind])
    return steps / (steps - skipped)


def core_patch(kind, threshold):
    return (CORE[kind], {"reuse_threshold": threshold, "start_percent": 0.15, "end_percent": 0.95, "verbose": False})


def tune(model, kind, target, iterations=7):
    """The reuse threshold (0..3) whose calibration speed-up is nearest to ``target`` (bisection; the speed-up
    grows with the threshold)."""
    low, high, tried = 0.0, 3.0, []
    for _ in range(iterations):
        mid = (low + high) / 2
        got = core_speedup(model, kind, mid)
        tried.append((mid, got))
        low, high = (mid, high) if got < target else (low, mid)
    return round(min(tried, key=lambda t: (abs(t[1] - target), t[0]))[0], 4), tried


def folder_paths():
    import folder_paths
    return folder_paths


def ops():
    return comfy_host.pack_module("guidance_ops.cache_schedule")


def run_model(model, args):
    s = MODELS[model]
    shares = unit_shares(model)
    units = list(shares)
    saved_all, saved_runs = cost_share(model, args.per_prompt)
    saved = {u: saved_all * p / sum(shares.values()) for u, p in shares.items()}
    print(f"{TAGS[model]}: units {shares}; a reusing evaluation saves {saved_all:.3f} of a full one "
          f"(runs: {', '.join(f'{v:.3f}' for v in saved_runs)})", flush=True)
    rows, speed_of = [], {}

    def add(name, method, interval, patches, pattern=None, core=None, **extra):
        row, records = run_row(model, name, patches, args, against=None if name == "uncached" else "uncached")
        found = {"row": name, "method": method, "interval": interval, **extra}
        if pattern is not None:
            evaluations, reusing, runs = trainfree_counts(records)
            expected = runs * sum(1 for i in range(STEPS) if any(not p[i] for p in pattern.values()))
            if evaluations != runs * STEPS or reusing != expected:
                raise RuntimeError(f"{name}: the log says {reusing} of {evaluations} evaluations reused, the schedule "
                                   f"{expected} of {runs * STEPS}")
            schedule = ops().Schedule(STEPS, {u: tuple(p) for u, p in pattern.items()})
            found.update(schedule={u: "".join("C" if c else "R" for c in p) for u, p in pattern.items()},
                         reusing_evaluations=reusing, evaluations=evaluations,
                         search_cost=ops().relative_cost(schedule, shares),
                         speedup=schedule_cost(pattern, saved))
        elif core is not None:
            skipped, steps = core_skipped(records, CORE[core])
            found.update(skipped_steps=skipped, steps=steps, speedup=steps / (steps - skipped))
        else:
            found.update(speedup=1.0)
        found.update({k: row[k] for k in ("digit_adherence", "colour_adherence", "background_adherence",
                                          "frechet_distance", "psnr", "ssim", "seconds_per_image") if k in row})
        rows.append(found)
        print(format_row(found), flush=True)
        return found

    add("uncached", "uncached", None, [])
    for n in args.intervals:
        pattern = {u: ops().uniform(STEPS, n) for u in units}
        speed_of[n] = add(f"uniform_{n}", "uniform", n, [cache_patch(model, cache_interval=n)], pattern)["speedup"]
        try:
            pattern = {u: ops().non_uniform(STEPS, n) for u in units}
        except ops().ScheduleError as error:
            rows.append({"row": f"non_uniform_{n}", "method": "non-uniform", "interval": n, "skipped": str(error)})
            continue
        add(f"non_uniform_{n}", "non-uniform", n,
            [cache_patch(model, cache_interval=n, schedule="non-uniform")], pattern)
    for n in args.intervals:
        budget = ops().relative_cost(ops().Schedule.from_pattern(units, ops().uniform(STEPS, n)), shares) + 1e-6
        for tag, method in (("dp", "dynamic programming (CacheQuant)"), ("ecad", "evolutionary (ECAD)")):
            name, summary = search(model, method, budget)
            schedule = pack_host().load_schedule(name)
            if n == PRESET_INTERVAL:
                os.makedirs(PRESETS, exist_ok=True)
                shutil.copyfile(os.path.join(folder_paths().get_output_directory(), "cache_schedules", name),
                                os.path.join(PRESETS, f"{s['preset']}_{tag}.json"))
            loader = {"class_type": "TrainFreeLoadCacheSchedule", "inputs": {"schedule_file": name}}
            add(f"{tag}_{n}", tag, n, [cache_patch(model, schedule="from schedule input", cache_schedule=loader)],
                {u: list(p) for u, p in schedule.compute.items()}, budget=budget,
                calibration_drift=schedule.meta.get("relative_drift"))
    for kind in CORE:
        for n in args.intervals:
            threshold, tried = tune(model, kind, speed_of[n])
            add(f"{kind}_{n}", kind, n, [core_patch(kind, threshold)], core=kind, reuse_threshold=threshold,
                calibration_speedups=tried)
    return {"model": model, "tag": TAGS[model], "model_file": quality.MODELS[model], "cache_node": s["node"],
            "cache_settings": s["settings"], "units_parameter_share": shares, "saved_share_all_units": saved_all,
            "saved_share_runs": saved_runs, "saved_share_by_unit": saved, "cfg": CFG, "steps": STEPS,
            "scheduler": s["scheduler"], "sampler": "euler", "prompts": args.prompts, "per_prompt": args.per_prompt,
            "seed": 0, "calibration_captions": [digits.caption(*c) for c in calibration_captions()],
            "calibration_seed": CALIBRATION_SEED, "population": POPULATION, "generations": GENERATIONS,
            "host": comfy_host.host_label().split(" ")[0], "torch_threads": 1, "rows": rows}


def format_row(r):
    if "skipped" in r:
        return f"{r['row']:<16} skipped: {r['skipped']}"
    drift = f"psnr {r['psnr']:6.2f}  ssim {r['ssim']:.3f}" if "psnr" in r else "(reference)"
    return (f"{r['row']:<16} speed-up {r['speedup']:.2f}x  {drift}  digit {r['digit_adherence']:.3f}  "
            f"colour {r['colour_adherence']:.3f}  FD {r['frechet_distance']:7.1f}")


GRID_ROWS = ("uncached", "uniform", "non_uniform", "dp", "ecad", "easycache", "lazycache")


def save_grids(result, grid_dir, prompts, per_prompt):
    model, names = result.get("tag", result["model"]), []
    for n in [n for n in (3, 5) if any(r.get("interval") == n for r in result["rows"])]:
        ran = {r["row"] for r in result["rows"] if "skipped" not in r}
        rows = [g if g == "uncached" else f"{g}_{n}" for g in GRID_ROWS]
        rows = [r for r in rows if r in ran]
        images = [torch.load(os.path.join(OUT, f"{model}_{r}.pt"))[::per_prompt].float() / 255 for r in rows]
        name = f"cache_{model}_{n}.png"
        os.makedirs(grid_dir, exist_ok=True)
        highres_quality.save_grid(torch.cat(images), prompts, os.path.join(grid_dir, name))
        names.append((name, rows))
    return names


def table(result):
    lines = ["| row | schedule / setting | speed-up | PSNR (dB) | SSIM | digit | colour | Fréchet distance |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | *not made: {r['skipped']}* | | | | | | |")
            continue
        if "schedule" in r:
            setting = " / ".join(f"`{p}`" for p in dict.fromkeys(r["schedule"].values()))
        elif "reuse_threshold" in r:
            setting = f"threshold {r['reuse_threshold']:g} (skipped {r['skipped_steps']}/{r['steps']})"
        else:
            setting = "-"
        psnr = f"{r['psnr']:.2f}" if "psnr" in r else "-"
        ssim = f"{r['ssim']:.3f}" if "ssim" in r else "-"
        lines.append(f"| {r['row']} | {setting} | {r['speedup']:.2f} | {psnr} | {ssim} | "
                     f"{r['digit_adherence']:.2f} | {r['colour_adherence']:.2f} | {r['frechet_distance']:.0f} |")
    return "\n".join(lines)


def block(result):
    lines = [f"    {result['command']}", "",
             f"{result['cache_node']} {result['cache_settings']}; a reusing evaluation saves "
             f"{result['saved_share_all_units']:.3f} of a full one's time (median of "
             f"{', '.join(f'{v:.3f}' for v in result['saved_share_runs'])})"
             + ("" if len(result["saved_share_by_unit"]) == 1 else
                ", split by parameters: " + ", ".join(f"{u} {v:.3f}" for u, v in
                                                      result["saved_share_by_unit"].items())) + ".", "",
             table(result), ""]
    for name, rows in result.get("grids", []):
        lines += [f"**{name[:-4]}** (rows: {', '.join(rows)}; first seed of each prompt)", "",
                  f"![{name[:-4]}](quality/{name})", ""]
    return "\n".join(lines)


def markers(model):
    return (f"<!-- generated by python -m bench.cache_quality: {model} -->",
            f"<!-- end of generated part: cache {model} -->")


def write_docs(result, path=DOCS):
    begin, end = markers(result.get("tag", result["model"]))
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block: add one to the Caching section first")
    head, rest = text.split(begin, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + block(result) + end + rest.split(end, 1)[1])


def boot():
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessCollectImages=quality.HarnessCollectImages,
                                     HarnessKeepModel=HarnessKeepModel)
    for kind in CORE.values():
        if kind not in nodes.NODE_CLASS_MAPPINGS:
            raise SystemExit(f"core node {kind} is not in this ComfyUI ({comfy_host.host_label()})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--per-prompt", type=int, default=4, help="seeds (batch items) per prompt")
    parser.add_argument("--intervals", nargs="+", type=int, default=list(INTERVALS),
                        help="the uniform schedules' N (each sets a cost the other rows are matched to)")
    parser.add_argument("--out-dir", default=OUT, help="raw JSON: <out-dir>/cache_quality_<model>.json")
    parser.add_argument("--grid-dir", help="folder for the grids (default: --out-dir)")
    parser.add_argument("--flux-blocks", nargs=2, type=int, default=[1, -1], metavar=("FIRST", "LAST"),
                        help="the Flux rows' TrainFreeBlockCache first_block / last_block (-1: the last block); a "
                             "range other than 1 -1 writes cache_quality_flux_blocks<FIRST>[-<LAST>].json and its "
                             "own docs block")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the models' generated blocks of "
                                                                  "docs/quality.md")
    args = parser.parse_args()
    use_flux_blocks(*args.flux_blocks)
    boot()
    torch.set_num_threads(1)
    searches = tempfile.mkdtemp(prefix="cache_quality_")  # the searches' saved schedules, not the host's output
    folder_paths().set_output_directory(searches)
    try:
        run_models(args)
    finally:
        shutil.rmtree(searches, ignore_errors=True)


def run_models(args):
    for model in args.models:
        result = {"command": " ".join(["python -m bench.cache_quality"] + sys.argv[1:]), **run_model(model, args)}
        result["grids"] = save_grids(result, args.grid_dir or args.out_dir, args.prompts, args.per_prompt)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"cache_quality_{TAGS[model]}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(block(result), flush=True)
        if args.write_docs:
            write_docs(result)


if __name__ == "__main__":
    main()
