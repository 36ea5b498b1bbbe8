"""Null-text inversion: the time to reach the paper protocol's reconstruction, with the node's own knobs.

    python -m bench.inversion_speed --out docs/bench/inversion_speed.json

On held-out real digits and the SD1.5-class reference model at CFG 7.5, each setting (steps, inner_steps,
learning_rate, early_stop) runs DDIM inversion + null-text inversion + sampling through ComfyUI's engine (one API
prompt per digit and setting, settings interleaved per digit so that a busy CPU slows them alike). The time is the
wall time of the two inversion nodes (DDIM inversion and the optimisation), read by pass-through clock nodes placed
around them. The target: a mean PSNR within 0.5 dB of the paper protocol's (50 steps x 10 inner iterations, lr
0.01, early stop), measured in the same run, in at most 40% of its time.
"""
import argparse
import json
import os
import time

import torch

from bench import inversion_quality as bench
from bench.quality import metrics
from harness import comfy_host, run_workflows

CFG = 7.5
PAPER = {"steps": 50, "inner_steps": 10, "learning_rate": 0.01, "early_stop": True}
SETTINGS = [PAPER,
            {**PAPER, "early_stop": False},
            {**PAPER, "inner_steps": 5},
            {**PAPER, "inner_steps": 3},
            {**PAPER, "inner_steps": 2},
            {**PAPER, "inner_steps": 3, "learning_rate": 0.02},
            {**PAPER, "steps": 25},
            {**PAPER, "steps": 25, "inner_steps": 5},
            {**PAPER, "steps": 25, "inner_steps": 3, "learning_rate": 0.02},
            {**PAPER, "steps": 20, "inner_steps": 3, "learning_rate": 0.02}]
PSNR_MARGIN, TIME_SHARE = 0.5, 0.4
_times, _reports = {}, {}


def clock(input_type):
    """A pass-through node that notes when it ran (and an inversion's report), under its key."""
    class Clock:
        CATEGORY = "harness"
        FUNCTION = "note"
        RETURN_TYPES = (input_type,)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": (input_type,), "key": ("STRING", {"default": "0"})}}

        def note(self, value, key):
            _times[key] = time.perf_counter()
            if hasattr(value, "report"):
                _reports[key] = dict(value.report)
            return (value,)
    return Clock


def name(setting):
    return (f"{setting['steps']} steps x {setting['inner_steps']} inner, lr {setting['learning_rate']:g}, "
            f"early stop {'on' if setting['early_stop'] else 'off'}")


def setting_prompt(i, caption, setting, key):
    p, links = bench.base_prompt("sd15", str(i), caption, setting["steps"], "normal")
    start = p.add("HarnessClockLatent", value=links["latent"], key=f"{key}|start")
    links = {**links, "latent": start}
    pivot = p.add("HarnessClockInversion", value=bench.invert(p, links), key=f"{key}|inverted")
    nti = bench.null_text(p, links, pivot, CFG, setting["inner_steps"], setting["learning_rate"],
                          setting["early_stop"])
    done = p.add("HarnessClockInversion", value=nti, key=f"{key}|optimised")
    p.collect(bench.sample(p, links, done, links["source"], CFG, "nti"), key)
    return p.nodes


def run(count=8, settings=SETTINGS):
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessSupplyImage=bench.HarnessSupplyImage,
                                     HarnessCollectImages=bench.HarnessCollectImages,
                                     HarnessClockLatent=clock("LATENT"), HarnessClockInversion=clock("TRAINFREE_INVERSION"))
    images, captions, *_ = bench.held_out(count)
    bench._collected.clear()
    for i, caption in enumerate(captions):
        bench._supplied[str(i)] = images[i:i + 1].permute(0, 2, 3, 1).contiguous()
        for s, setting in enumerate(settings):
            comfy_host.execute_prompt(setting_prompt(i, caption, setting, f"{s}|{i}"))
    rows = []
    for s, setting in enumerate(settings):
        keys = [f"{s}|{i}" for i in range(count)]
        got = torch.cat([bench._collected[k] for k in keys]).permute(0, 3, 1, 2).float()
        invert = sum(_times[f"{k}|inverted"] - _times[f"{k}|start"] for k in keys)
        optimise = sum(_times[f"{k}|optimised"] - _times[f"{k}|inverted"] for k in keys)
        reports = [_reports[f"{k}|optimised"] for k in keys]
        rows.append({"setting": name(setting), **setting, "psnr": metrics.psnr(got, images),
                     "ssim": metrics.ssim(got, images), "seconds_invert": invert, "seconds_null_text": optimise,
                     "seconds": invert + optimise,
                     "inner_iterations": sum(r["inner_iterations"] for r in reports),
                     "max_inner_iterations": sum(r["max_inner_iterations"] for r in reports)})
    paper = rows[0]
    for row in rows:
        row["psnr_gap"] = row["psnr"] - paper["psnr"]
        row["time_ratio"] = row["seconds"] / paper["seconds"]
        row["null_text_time_ratio"] = row["seconds_null_text"] / paper["seconds_null_text"]
        row["meets_target"] = row["psnr_gap"] >= -PSNR_MARGIN and row["time_ratio"] <= TIME_SHARE
    return {"command": f"python -m bench.inversion_speed --count {count}", "digits": count, "cfg": CFG,
            "seed": bench.SEED, "host": comfy_host.host_label().split(" ")[0], "torch_threads": torch.get_num_threads(),
            "target": f"PSNR within {PSNR_MARGIN} dB of the paper protocol in at most {TIME_SHARE:.0%} of its time "
                      f"(time: DDIM inversion + null-text optimisation)",
            "rows": rows}


def table(result):
    lines = ["| setting | PSNR (dB) | vs paper (dB) | inner iterations used | seconds (invert + NTI) | time ratio | "
             "NTI-only time ratio | target met |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {r['psnr']:.2f} | {r['psnr_gap']:+.2f} | {r['inner_iterations']} / "
                     f"{r['max_inner_iterations']} | {r['seconds']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['null_text_time_ratio']:.2f} | {'yes' if r['meets_target'] else 'no'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8, help="held-out digits")
    parser.add_argument("--out", default=os.path.join(bench.OUT, "inversion_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.count)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
