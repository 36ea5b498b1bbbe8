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
"x direct" is the median over --repeats of the ratio to direct's time in the same repeat.

Run from the pack root:  python -m bench.highres_speed [--steps 10] [--repeats 1] [--size 256] [--threads N]
The raw result goes to --json (default bench/output/highres_speed.json); docs/bench/ keeps the committed one.
"""
import time

import torch

from bench.timing import make_sd_vae, paired_ratio, save, setup

TARGET = {"2x": 2 ** 0.5, "4x": 2.0}  # side ratio for 2x / 4x the pixels


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
    found = {"direct": (model, euler, sigmas),
             "frecas": (model, *frecas.build(**plan, transition="vae (decode, upsample, encode)")[:2]),
             "frecas-latent": (model, *frecas.build(**plan, transition="latent (bilinear)")[:2])}
    crafter = nodes.NODE_CLASS_MAPPINGS.get("TrainFreeScaleCrafter")
    if crafter is not None:
        found["scalecrafter"] = (scalecrafter(crafter, model), euler, sigmas)
    return found


def scalecrafter(crafter, model):
    return crafter().patch(model, preset="sd15_1024 (4x pixels)", dilate_percent=0.6, progressive="preset",
                           noise_damped=False)[0]


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
    args, model = setup(__doc__, default_steps=10)
    vae = make_sd_vae()
    times, cpu_times, ratios = {}, {}, {}
    with torch.inference_mode():
        for scale in TARGET:
            side = target_side(args.size, scale)
            configs = configurations(model, vae, args.size, side, args.steps)
            names = list(configs)
            wall = {name: [] for name in names}
            cpu = {name: [] for name in names}
            print(f"\n{scale} pixels: {args.size} -> {side} px", flush=True)
            for r in range(args.repeats + 1):  # the first round warms up
                for name in names[r % len(names):] + names[:r % len(names)]:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    sample(*configs[name], side)
                    if r:
                        wall[name].append(time.perf_counter() - start)
                        cpu[name].append(time.process_time() - start_cpu)
                    print(f"  {'warm-up' if not r else f'repeat {r}'}: {name} "
                          f"{time.perf_counter() - start:.1f} s", flush=True)
            times[scale], cpu_times[scale] = wall, cpu
            ratios[scale] = {name: 1 / paired_ratio(wall, name, baseline="direct") for name in names}
    print(f"\n{'scale':<7}{'configuration':<15}{'s/image':>9}{'x faster than direct':>22}")
    for scale, wall in times.items():
        for name, values in wall.items():
            print(f"{scale:<7}{name:<15}{sorted(values)[len(values) // 2]:>9.1f}{ratios[scale][name]:>22.2f}")
    four = ratios["4x"]
    print(f"\ntarget: FreCaS >= 2.5x faster than direct at 4x pixels (measured: {four['frecas']:.2f}x with the VAE "
          f"transition, {four['frecas-latent']:.2f}x with the latent one)")
    if "scalecrafter" in four:
        print(f"FreCaS against ScaleCrafter at 4x: {four['frecas'] / four['scalecrafter']:.2f}x")
    save("highres_speed", args, seconds=times, cpu_seconds=cpu_times, speedup_over_direct=ratios)


if __name__ == "__main__":
    main()
