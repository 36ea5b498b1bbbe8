"""Wall-clock and CPU-time ratio of Adaptive Guidance and LinearAG against CFG at the same steps (issue 14), on
the full-size SD1.5 UNet (random weights, CPU, float32), timed round-robin in one process (bench.timing).

    python -m bench.sampler_speed --steps 6 --repeats 2 --threads 1 --json docs/bench/sampler_speed.json

Configurations: cfg (Euler, normal scheduler, cfg 5, cond and uncond batched); ag (TrainFreeAdaptiveGuidance at
the paper's 0.991: the random model's conditional and guided predictions do align as sigma falls, so it stops
by itself; where it stops is this model's, not a trained one's, and is reported); linear_ag (TrainFreeLinearAG,
calibrated first by TrainFreeLinearAGCalibrate on this model with two prompts at --calibration-size px, same
steps / cfg / sampler / scheduler / negative). Random-weights prompts: a stand-in text encoder maps each text to
a fixed random 77 x 768 embedding (the empty negative to the timing runs' negative).

Passes are counted (rows pushed through the UNet per run) and the nodes' reports are kept; "expected" is the
ratio if a step cost what its rows cost: rows of the run / rows of CFG's run.
"""
import shutil
import tempfile

import torch

from bench.timing import paired_ratio, round_robin, save, setup
from harness import comfy_host

FROM_INPUT = "(from the calibration input)"


class RandomTextEncoder:
    """Just enough of a CLIP for the calibration node: each text -> a fixed random [1, 77, 768] embedding."""

    def __init__(self, fixed):
        self.fixed = fixed

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        if text in self.fixed:
            return self.fixed[text]
        g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)) % (2 ** 31))
        return [[torch.randn(1, 77, 768, generator=g), {}]]


def configurations(base, negative, steps, size):
    import nodes
    mapping = nodes.NODE_CLASS_MAPPINGS
    calibration, summary = mapping["TrainFreeLinearAGCalibrate"]().calibrate(
        base, RandomTextEncoder({"": negative}), "calibration prompt one\ncalibration prompt two", "", 1, 100,
        steps, 5.0, "euler", "normal", size, size, "sampler_speed")["result"]
    print(summary, flush=True)
    return {
        "cfg": base.clone(),
        "ag": mapping["TrainFreeAdaptiveGuidance"]().patch(base, 0.991)[0],
        "linear_ag": mapping["TrainFreeLinearAG"]().patch(base, FROM_INPUT, calibration)[0],
    }, summary


def main():
    args, base = setup(__doc__, default_steps=8, threads=1, extra=[
        ("--calibration-size", int, 64, "image size of LinearAG's two calibration runs"),
        ("--no-warmup", int, 0, "1: no warm-up run (default: one untimed run of --steps steps per configuration; "
                                "a shorter one would not do, LinearAG's calibration holds for --steps only)")])
    import folder_paths
    run_reports = comfy_host.pack_module("nodes.host").run_reports
    g = torch.Generator().manual_seed(0)  # round_robin's own default inputs, made here to share the negative
    pos, neg = [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]]
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    saved_to = tempfile.mkdtemp(prefix="sampler_speed_")
    folder_paths.set_output_directory(saved_to)
    try:
        models, summary = configurations(base, neg, args.steps, args.calibration_size)
    finally:
        shutil.rmtree(saved_to, ignore_errors=True)
    reports = {name: [] for name in models}

    def keep_report(name, timed):
        if timed:
            reports[name].append({k: r for k, r in run_reports(models[name]).items()})
    result, times, cpu_times = round_robin(models, args.steps, args.repeats, args.size, inputs=(pos, neg, latent),
                                           warmup_steps=0 if args.no_warmup else args.steps, after_run=keep_report)
    ratios = {name: paired_ratio(times, name) for name in result}
    cpu_ratios = {name: paired_ratio(cpu_times, name) for name in result}
    base_rows = result["cfg"][1]
    print(f"\n{'configuration':<14}{'s/step':>9}{'x CFG':>8}{'x CFG cpu':>10}{'rows/run':>10}{'passes saved':>14}"
          f"{'expected':>10}")
    for name, (seconds, rows) in result.items():
        print(f"{name:<14}{seconds:>9.3f}{ratios[name]:>8.3f}{cpu_ratios[name]:>10.3f}{rows:>10}"
              f"{base_rows - rows:>14}{rows / base_rows:>10.3f}")
    print("(x CFG: median over repeats of the ratio to CFG's run in the same repeat, wall clock and CPU time; "
          "expected: rows / CFG's rows)")
    for name, runs in reports.items():
        if runs:
            print(f"{name}: node report of the last run {runs[-1]}")
    save("sampler_speed", args, seconds=times, cpu_seconds=cpu_times, result=result, paired_ratio=ratios,
         paired_cpu_ratio=cpu_ratios, expected_ratio={n: r / base_rows for n, (_, r) in result.items()},
         node_reports=reports, calibration=summary, calibration_size=args.calibration_size)


if __name__ == "__main__":
    main()
