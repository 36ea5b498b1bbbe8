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
import statistics
import time

import torch

from harness import comfy_host, tiny_models

# The SD1.5 UNet exactly as comfy/model_detection.py detects it from a real checkpoint.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False}


def make_sd15(seed=0):
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = config.get_model({}, device=cpu)
    tiny_models.init_fan_in(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class RowCounter:
    """APPLY_MODEL wrapper: counts the batch rows pushed through the UNet."""

    def __init__(self, model):
        import comfy.patcher_extension as pe
        self.rows = 0
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench_counter", self)

    def __call__(self, executor, x, *args, **kwargs):
        self.rows += x.shape[0]
        return executor(x, *args, **kwargs)


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


def timed_run(model, counter, args, latent, noise, pos, neg):
    import comfy.sample
    counter.rows = 0
    start = time.perf_counter()
    comfy.sample.sample(model, noise, args.steps, 5.0, "euler", "normal", pos, neg, latent, seed=0,
                        disable_pbar=True)
    return (time.perf_counter() - start) / args.steps, counter.rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent is size / 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    comfy_host.boot()
    import comfy.sample
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)

    models = configurations(make_sd15())
    counters = {name: RowCounter(m) for name, m in models.items()}
    times = {name: [] for name in models}
    rows = {}
    print(f"SD1.5 UNet, {args.size}x{args.size}, {args.steps} Euler steps, cfg 5, {torch.get_num_threads()} "
          f"threads, {args.repeats} repeats", flush=True)
    with torch.inference_mode():
        for name, m in models.items():  # warm-up
            timed_run(m, counters[name], args, latent, noise, pos, neg)
        for r in range(args.repeats):
            for name, m in models.items():
                seconds, rows[name] = timed_run(m, counters[name], args, latent, noise, pos, neg)
                times[name].append(seconds)
            print(f"  repeat {r + 1}/{args.repeats} done", flush=True)

    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: median[name] / median["cfg"] for name in models}
    extra = {name: rows[name] - rows["cfg"] for name in models}
    print(f"\n{'configuration':<14}{'s/step':>9}{'x CFG':>8}{'rows/run':>10}{'extra passes':>14}")
    for name in models:
        print(f"{name:<14}{median[name]:>9.3f}{ratio[name]:>8.2f}{rows[name]:>10}{extra[name]:>14}")
    expected_half = 1 + 0.5 * (ratio["ours"] - 1)
    print(f"\ntarget: ours <= 1.5x CFG at full window; core measured reference 1.51x "
          f"(measured: ours {ratio['ours']:.2f}x, core {ratio['core']:.2f}x)")
    print(f"half window: expected {expected_half:.2f}x (1 + 0.5 * (full - 1)), measured {ratio['ours-half']:.2f}x")

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pag_speed.json"), "w") as f:
        json.dump({"args": vars(args), "threads": torch.get_num_threads(), "seconds": times, "median": median,
                   "ratio": ratio, "rows": rows, "extra_passes": extra, "expected_half": expected_half}, f, indent=1)


if __name__ == "__main__":
    main()
