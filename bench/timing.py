"""Shared pieces of the speed benchmarks: the full-size SD1.5 UNet with random weights, a row counter, and
round-robin timing (every configuration in turn, in rotated order, repeated) with ratios paired per repeat, so
that a noisy machine slows all configurations alike and the printed ratios stay meaningful."""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from harness import comfy_host, tiny_models

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")

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


SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def make_sd_vae(seed=0):
    """The SD1.5 VAE's architecture (KL-f8, 4 channels) with random weights, as a comfy VAE."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = {"ddconfig": dict(SD_VAE), "embed_dim": 4}
    ae = AutoencoderKL(**params)
    tiny_models.init_fan_in(ae, seed)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})


class RowCounter:
    """APPLY_MODEL wrapper: counts the batch rows pushed through the UNet."""

    def __init__(self, model):
        import comfy.patcher_extension as pe
        self.rows = 0
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench_counter", self)

    def __call__(self, executor, x, *args, **kwargs):
        self.rows += x.shape[0]
        return executor(x, *args, **kwargs)


def round_robin(models, steps, repeats, size=256, cfg=5.0, inputs=None, warmup_steps=None, after_run=None):
    """``{name: (median seconds per step, rows of the last run)}`` for MODEL patchers sampled side by side, then the
    wall-clock and the CPU seconds per step of every run by name (CPU time leaves out what a shared virtual machine
    steals from the process; on this project's machines both have shown the same spread).

    ``inputs`` = (positive, negative, latent) (default: SD1.5's, random 77 x 768 prompts and a 4-channel latent of
    ``size``). One warm-up run of each model first, of ``warmup_steps`` steps (default ``steps``; 0 = none).
    ``after_run(name, timed)`` is called after every run (timed False for the warm-up)."""
    import comfy.sample
    if inputs is None:
        g = torch.Generator().manual_seed(0)
        inputs = ([[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]],
                  torch.zeros(1, 4, size // 8, size // 8))
    pos, neg, latent = inputs
    noise = comfy.sample.prepare_noise(latent, 0)
    counters = {name: RowCounter(m) for name, m in models.items()}
    times = {name: [] for name in models}
    cpu_times = {name: [] for name in models}

    def run(name, count, timed=True):
        counters[name].rows = 0
        start, start_cpu = time.perf_counter(), time.process_time()
        comfy.sample.sample(models[name], noise, count, cfg, "euler", "normal", pos, neg, latent, seed=0,
                            disable_pbar=True)
        seconds = (time.perf_counter() - start) / count, (time.process_time() - start_cpu) / count
        if after_run is not None:
            after_run(name, timed)
        return seconds

    warmup_steps = steps if warmup_steps is None else warmup_steps
    with torch.inference_mode():
        for name in models if warmup_steps else ():
            run(name, warmup_steps, timed=False)
        names = list(models)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated, so no one always goes first
                wall, cpu = run(name, steps)
                times[name].append(wall)
                cpu_times[name].append(cpu)
            print(f"  repeat {r + 1}/{repeats} done", flush=True)
    return {name: (statistics.median(t), counters[name].rows) for name, t in times.items()}, times, cpu_times


def paired_ratio(times, name, baseline="cfg"):
    """Median over repeats of (this configuration's time / the baseline's time in the same repeat): slow drifts of
    a shared machine cancel within a repeat."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def setup(doc, default_steps, selectable=False, extra=(), threads=None, sd15=True):
    """The benchmarks' shared start: parse --steps / --repeats / --size / --threads (default ``threads``, None =
    torch's), boot ComfyUI, set the thread count, print the header line and build the SD1.5 UNet (unless ``sd15``
    is False). Returns (args, model or None)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent is size / 8)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch threads (default: {threads})" if threads else "torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the raw result here (default: bench/output/NAME.json); "
                                                     "README's figures come from the files in docs/bench/")
    if selectable:
        parser.add_argument("--only", default="", help="comma-separated configurations to time (default: all; "
                                                        "'cfg' is always timed, as the baseline)")
    for flag, kind, default, text in extra:
        parser.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args()
    comfy_host.boot()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'SD1.5 UNet, ' if sd15 else ''}{args.size}x{args.size}, {args.steps} Euler steps"
          f"{', cfg 5' if sd15 else ''}, {torch.get_num_threads()} threads, {args.repeats} repeats", flush=True)
    return args, make_sd15() if sd15 else None


def save(name, args, **results):
    """Write the result to ``--json`` (default bench/output/<name>.json): the command that made it, the arguments,
    the machine, the ComfyUI and torch versions, the thread count, then the results."""
    path = args.json or os.path.join(OUTPUT, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    command = " ".join(["python", "-m", f"bench.{name}"] + sys.argv[1:])
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(),
               "comfyui": comfy_host.host_version(), "torch": torch.__version__}
    with open(path, "w") as f:
        json.dump({"command": command, "args": vars(args), "machine": machine, "threads": torch.get_num_threads(),
                   **results}, f, indent=1)
    print(f"raw result: {path}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def select(models, only):
    """The configurations named in ``only`` (comma-separated), plus the CFG baseline; all when ``only`` is empty."""
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - set(models)
    if unknown:
        raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; choose from {sorted(models)}")
    return {k: v for k, v in models.items() if not names or k in names or k == "cfg"}
