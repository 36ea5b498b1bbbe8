"""Seconds per sampling step of PAG on the full-size SD1.5 UNet (random weights, CPU, float32).

Configurations, timed round-robin in one process (median over --repeats runs, after one warm-up run each):
  cfg        plain CFG
  ours       CFG + TrainFreePAG, scale 3, layers "auto", full window
  core       CFG + ComfyUI core PerturbedAttentionGuidance, scale 3
  ours-half  CFG + TrainFreePAG, scale 3, window 0.0-0.5

Each run is one comfy.sample.sample call (Euler, cfg 5, "normal" schedule); s/step is the run's wall time
divided by --steps, so it includes the small per-run setup. An APPLY_MODEL wrapper counts the batch rows
the UNet evaluates per run; rows beyond plain CFG's are the extra conditional passes.

Run from the pack root:  python -m bench.pag_speed [--steps 4] [--repeats 3] [--size 256] [--threads N]
Results also go to bench/output/pag_speed.json.
"""
import argparse
import json
import os

import torch

from bench.timing import make_sd15, round_robin
from harness import comfy_host


def configurations(base):
    import nodes
    ours = nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]()
    core = nodes.NODE_CLASS_MAPPINGS["PerturbedAttentionGuidance"]
    return {
        "cfg": base.clone(),
        "ours": ours.patch(base, 3.0, "auto", 0.0, 1.0)[0],
        "core": core.execute(model=base, scale=3.0).args[0],
        "ours-half": ours.patch(base, 3.0, "auto", 0.0, 0.5)[0],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent is size / 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    comfy_host.boot()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = configurations(make_sd15())
    print(f"SD1.5 UNet, {args.size}x{args.size}, {args.steps} Euler steps, cfg 5, {torch.get_num_threads()} "
          f"threads, {args.repeats} repeats", flush=True)
    result, times = round_robin(models, args.steps, args.repeats, args.size)
    median = {name: seconds for name, (seconds, _) in result.items()}
    rows = {name: r for name, (_, r) in result.items()}
    ratio = {name: median[name] / median["cfg"] for name in models}
    extra = {name: rows[name] - rows["cfg"] for name in models}
    print(f"\n{'configuration':<14}{'s/step':>9}{'x CFG':>8}{'rows/run':>10}{'extra passes':>14}")
    for name in models:
        print(f"{name:<14}{median[name]:>9.3f}{ratio[name]:>8.2f}{rows[name]:>10}{extra[name]:>14}")
    guided_share = extra["ours-half"] / max(1, extra["ours"])
    expected_half = 1 + guided_share * (ratio["ours"] - 1)
    print(f"\ntarget: ours <= 1.5x CFG at full window; core measured reference 1.51x "
          f"(measured: ours {ratio['ours']:.2f}x, core {ratio['core']:.2f}x)")
    print(f"half window: guides {extra['ours-half']} of {extra['ours']} steps; expected "
          f"{expected_half:.2f}x (1 + share * (full - 1)), measured {ratio['ours-half']:.2f}x")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pag_speed.json"), "w") as f:
        json.dump({"args": vars(args), "threads": torch.get_num_threads(), "seconds": times, "median": median,
                   "ratio": ratio, "rows": rows, "extra_passes": extra, "expected_half": expected_half}, f, indent=1)


if __name__ == "__main__":
    main()
