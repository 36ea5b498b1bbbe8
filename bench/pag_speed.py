"""Seconds per sampling step of PAG on the full-size SD1.5 UNet (random weights, CPU, float32).

Configurations, timed round-robin in one process (after one warm-up run each; x CFG is the median over --repeats
of the ratio to CFG's run in the same repeat):
  cfg        plain CFG
  ours       CFG + TrainFreePAG, scale 3, layers "auto", full window
  core       CFG + ComfyUI core PerturbedAttentionGuidance, scale 3
  ours-half  CFG + TrainFreePAG, scale 3, window 0.0-0.5

Each run is one comfy.sample.sample call (Euler, cfg 5, "normal" schedule); s/step is the run's wall time
divided by --steps, so it includes the small per-run setup. An APPLY_MODEL wrapper counts the batch rows
the UNet evaluates per run; rows beyond plain CFG's are the extra conditional passes.

Run from the pack root:  python -m bench.pag_speed [--steps 4] [--repeats 3] [--size 256] [--threads N] [--json PATH]
The raw result goes to --json (default bench/output/pag_speed.json); README's figures are in docs/bench/.
"""
from bench.timing import paired_ratio, round_robin, save, setup


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
    args, base = setup(__doc__, default_steps=4)
    models = configurations(base)
    result, times, cpu_times = round_robin(models, args.steps, args.repeats, args.size)
    median = {name: seconds for name, (seconds, _) in result.items()}
    rows = {name: r for name, (_, r) in result.items()}
    ratio = {name: paired_ratio(times, name) for name in models}
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
    save("pag_speed", args, seconds=times, cpu_seconds=cpu_times, median=median, ratio=ratio, rows=rows,
         extra_passes=extra, expected_half=expected_half)


if __name__ == "__main__":
    main()
