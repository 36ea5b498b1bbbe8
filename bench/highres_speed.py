"""Seconds per image of high-resolution sampling on the full-size SD1.5 UNet and VAE (random weights, CPU,
float32): FreCaS and ScaleCrafter against direct sampling at the target size with the same step count, at 2x and
4x the base pixel count.

Configurations, per scale, timed round-robin in one process (after one warm-up run each):
  direct         --steps Euler steps at the target size, "normal" schedule, CFG 5
  scalecrafter   the same with TrainFreeScaleCrafter re-dilation (its SD1.5 4x-pixel preset; the paper has no 2x
                 setting, so the same table is timed there) and no noise-damped pass (the paper uses it at 16x)
  frecas         TrainFreeFreCaS, two stages (base, target), the paper's 4:1 split of the steps (40 / 10), stage end
                 200, gamma 1.5, FA-CFG and attention fusion on, the paper's VAE transition (decode, upsample, encode)
  frecas-latent  the same with the latent transition
  base           direct sampling at the base size (for the per-step costs below)
Also timed once per scale: the VAE transition alone (decode at the base size, upsample, encode at the target).
From these per-step costs the script also prints the speed-up the paper's 50-step plan (40 + 10) would have on
this machine: 50 t_direct / (40 t_base + 10 t_direct + t_vae), labelled as derived, not measured.
"x direct" is the median over --repeats of the ratio to direct's time in the same repeat.

Run from the pack root:  python -m bench.highres_speed [--steps 10] [--repeats 1] [--size 256] [--warmup 1] [--scales 4x,2x] [--configs NAMES] [--threads N]
Print a saved raw result again:  python -m bench.highres_speed --from-json docs/bench/highres_speed.json
The raw result goes to --json (default bench/output/highres_speed.json); docs/bench/ keeps the committed one.
"""
import statistics
import time

import torch

from bench.timing import make_sd_vae, paired_ratio, save, setup

TARGET = {"4x": 2.0, "2x": 2 ** 0.5}  # side ratio for 4x / 2x the pixels (4x first: the target)


def target_side(base, scale):
    return int(round(base * TARGET[scale] / 8)) * 8


def configurations(model, vae, base, side, steps):
    import comfy.samplers
    import nodes
    euler = comfy.samplers.sampler_object("euler")
    plan = {"model": model, "sampler": euler, "width": side, "height": side, "batch_size": 1, "base_width": base,
            "base_height": base, "stage_steps": f"{steps - steps // 5}, {steps // 5}",
            "stage_end_timesteps": "200, 0", "gamma": 1.5, "fa_cfg": True, "fa_cfg_high": 35.0, "ca_fusion": 0.6,
            "vae": vae}
    frecas = nodes.NODE_CLASS_MAPPINGS["TrainFreeFreCaS"]()
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).float()
    found = {"direct": (model, euler, sigmas, side), "base": (model, euler, sigmas, base),
             "frecas": (model, *frecas.build(**plan, transition="vae (decode, upsample, encode)")[:2], side),
             "frecas-latent": (model, *frecas.build(**plan, transition="latent (bilinear)")[:2], side)}
    crafter = nodes.NODE_CLASS_MAPPINGS.get("TrainFreeScaleCrafter")
    if crafter is not None:
        found["scalecrafter"] = (scalecrafter(crafter, model), euler, sigmas, side)
    return found


def scalecrafter(crafter, model):
    return crafter().apply(model=model, preset="SD1.5 1024x1024 (4x pixels)", dilate_percent=-1.0,
                           progressive="preset default", noise_damped="off", disperse_percent=0.0)[0]


def sample(model, sampler, sigmas, side, cfg=5.0):
    import comfy.samplers
    g = torch.Generator().manual_seed(0)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds([[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]])
    guider.set_cfg(cfg)
    latent = torch.zeros(1, 4, side // 8, side // 8)
    noise = torch.randn(latent.shape, generator=g)
    return guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True)


def main():
    args, model = setup(__doc__, default_steps=10, extra=[("--warmup", int, 1, "1: one untimed round first"),
                                                         ("--scales", str, "4x,2x", "which pixel ratios to time"),
                                                         ("--configs", str, "", "comma-separated configurations "
                                                          "to time (default all; direct always)")])
    vae = make_sd_vae()
    times, cpu_times, ratios, vae_seconds, derived = {}, {}, {}, {}, {}
    with torch.inference_mode():
        for scale in [s.strip() for s in args.scales.split(",")]:
            side = target_side(args.size, scale)
            configs = configurations(model, vae, args.size, side, args.steps)
            if args.configs:
                wanted = {"direct"} | {c.strip() for c in args.configs.split(",")}
                configs = {name: value for name, value in configs.items() if name in wanted}
            names = list(configs)
            wall = {name: [] for name in names}
            cpu = {name: [] for name in names}
            print(f"\n{scale} pixels: {args.size} -> {side} px", flush=True)
            for r in range(0 if args.warmup else 1, args.repeats + 1):  # round 0 warms up
                for name in names[r % len(names):] + names[:r % len(names)]:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    sample(*configs[name])
                    if r:
                        wall[name].append(time.perf_counter() - start)
                        cpu[name].append(time.process_time() - start_cpu)
                    print(f"  {'warm-up' if not r else f'repeat {r}'}: {name} "
                          f"{time.perf_counter() - start:.1f} s", flush=True)
            start = time.perf_counter()
            transition(vae, args.size, side)
            vae_seconds[scale] = time.perf_counter() - start
            print(f"  VAE transition {vae_seconds[scale]:.1f} s", flush=True)
            times[scale], cpu_times[scale] = wall, cpu
            ratios[scale] = {name: 1 / paired_ratio(wall, name, baseline="direct") for name in names}
            save("highres_speed", args, seconds=times, cpu_seconds=cpu_times, speedup_over_direct=ratios,
                 vae_transition_seconds=vae_seconds, partial=True)  # a long run keeps what it has
    for scale, wall in times.items():
        if "base" in wall:
            step = {name: statistics.median(wall[name]) / args.steps for name in ("direct", "base")}
            derived[scale] = 50 * step["direct"] / (40 * step["base"] + 10 * step["direct"] + vae_seconds[scale])
    save("highres_speed", args, seconds=times, cpu_seconds=cpu_times, speedup_over_direct=ratios,
         vae_transition_seconds=vae_seconds, derived_50_step_speedup=derived)
    report({"seconds": times, "cpu_seconds": cpu_times, "vae_transition_seconds": vae_seconds,
            "derived_50_step_speedup": derived})


def report(result):
    """The table of a run (or of a saved raw result): speed-ups over direct sampling in wall-clock and CPU time.
    CPU time leaves out what other jobs on a shared machine take from the process."""
    print(f"\n{'scale':<7}{'configuration':<15}{'s/image':>9}{'CPU s':>8}{'x direct (wall)':>17}{'x direct (CPU)':>16}")
    speedups = {}
    for scale, wall in result["seconds"].items():
        cpu = result["cpu_seconds"][scale]
        speedups[scale] = {kind: {name: 1 / paired_ratio(times, name, baseline="direct") for name in times}
                           for kind, times in (("wall", wall), ("cpu", cpu))}
        for name in wall:
            print(f"{scale:<7}{name:<15}{statistics.median(wall[name]):>9.1f}{statistics.median(cpu[name]):>8.1f}"
                  f"{speedups[scale]['wall'][name]:>17.2f}{speedups[scale]['cpu'][name]:>16.2f}")
    for scale, value in result.get("derived_50_step_speedup", {}).items():
        print(f"{scale}: VAE transition {result['vae_transition_seconds'][scale]:.1f} s; derived, not measured: the "
              f"paper's 40 + 10 steps would be {value:.2f}x faster than 50 direct steps")
    four = speedups.get("4x")
    if four:
        for kind in ("wall", "cpu"):
            f = four[kind]
            line = (f"{kind}: FreCaS {f['frecas']:.2f}x faster than direct at 4x pixels (latent transition "
                    f"{f['frecas-latent']:.2f}x; target 2.5x)")
            if "scalecrafter" in f:
                line += f", {f['frecas'] / f['scalecrafter']:.2f}x faster than ScaleCrafter"
            print(line)


def reprint(path):
    import json
    with open(path) as f:
        result = json.load(f)
    print(f"raw result {path}: {result['command']}")
    report(result)


def transition(vae, base, side):
    """FreCaS's pixel-space transition on its own: decode at the base size, nearest upsample, encode."""
    import torch.nn.functional as F
    pixels = vae.decode(torch.randn(1, 4, base // 8, base // 8))
    up = F.interpolate(pixels.movedim(-1, 1), size=(side, side), mode="nearest").movedim(1, -1)
    return vae.encode(up)


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--from-json":
        reprint(sys.argv[2])
    else:
        main()
