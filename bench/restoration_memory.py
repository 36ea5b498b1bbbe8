"""The restorers' extra memory: (1) the process's peak resident memory after ComfyUI's img2img and after a RED-diff
(or, with --restorer steered, a Steered Diffusion) restoration of the same start image on the SD1.5-class reference model at 128 px (CPU; each batch size in a fresh
process, since the peak only grows); (2) what the measurement's gradient keeps: the activations the VAE decoder
saves for its backward pass, counted (unique storages) for the SD1.5 VAE's architecture (random weights) at several
sizes. That backward is the only one per iteration (no gradient through the diffusion model), so (2) bounds what
RED-diff adds to sampling, besides Adam's two latent-sized moments; Steered Diffusion runs that backward once per
step and batch row (rows one at a time).

    python -m bench.restoration_memory --json docs/bench/restoration_memory.json
    python -m bench.restoration_memory --restorer steered --sides 128 --json docs/bench/restoration_memory_steered.json
"""
import argparse
import json

import torch

from bench.memory import in_fresh_process, node_runner, peak_mib


def restorer_sampler(node, restorer, measurement, vae):
    if restorer == "steered":
        return node("TrainFreeSteeredDiffusion", measurement=measurement, vae=vae, strength=1.0, iterations=1)[0]
    from bench.restoration_quality import RED_DIFF
    return node("TrainFreeREDDiff", measurement=measurement, vae=vae, **RED_DIFF)[0]


def measure(batch, steps, restorer="red_diff"):
    node = node_runner()
    torch.set_num_threads(1)
    with torch.inference_mode():
        model, clip, vae = node("TrainFreeReferenceModel", model_file="trainfree_digits.safetensors")
        positive = node("CLIPTextEncode", clip=clip, text="a red digit seven on a dark background")[0]
        negative = node("CLIPTextEncode", clip=clip, text="")[0]
        clean = torch.rand(batch, 128, 128, 3, generator=torch.Generator().manual_seed(0))
        degradation = {"degradation": "super-resolution", "factor": 4, "noise_level": 0.0}
        observed = node("TrainFreeDegrade", image=clean, seed=0, **degradation)[0]
        measurement, start = node("TrainFreeMeasurement", image=observed, **degradation)
        latent = node("VAEEncode", pixels=start, vae=vae)[0]
        node("KSampler", model=model, seed=0, steps=steps, cfg=3.0, sampler_name="euler", scheduler="normal",
             positive=positive, negative=negative, latent_image=latent, denoise=0.5)
        sampling = peak_mib()
        sampler = restorer_sampler(node, restorer, measurement, vae)
        sigmas = node("BasicScheduler", model=model, scheduler="normal", steps=steps, denoise=1.0)[0]
        guider = node("CFGGuider", model=model, positive=positive, negative=negative, cfg=3.0)[0]
        noise = node("RandomNoise", noise_seed=0)[0]
        node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent)
        return {"batch": batch, "steps": steps, "peak_mib_after_img2img": round(sampling, 1),
                f"peak_mib_after_{restorer}": round(peak_mib(), 1), "extra_mib": round(peak_mib() - sampling, 1),
                "report": sampler.trainfree_report}


def decoder_activations(side):
    """MiB of the tensors the SD1.5-architecture VAE decoder saves for backward at ``side`` x ``side`` px (one
    image, float32), counted once per storage."""
    from harness import comfy_host
    comfy_host.boot()
    from bench.timing import make_sd_vae
    vae = make_sd_vae()
    latent = torch.randn(1, 4, side // 8, side // 8, requires_grad=True)
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        pixels = vae.first_stage_model.decode(latent)
    del pixels
    return round(sum(kept.values()) / 2 ** 20, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--restorer", choices=("red_diff", "steered"), default="red_diff")
    parser.add_argument("--json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps, args.restorer)))
        return
    if args.side is not None:
        torch.set_num_threads(1)
        print(json.dumps({"side": args.side, "decoder_saved_for_backward_mib": decoder_activations(args.side)}))
        return

    def fresh(*flags):
        return in_fresh_process("bench.restoration_memory", *flags)
    rows = []
    for batch in args.batches:
        rows.append(fresh("--one", str(batch), "--steps", str(args.steps), "--restorer", args.restorer))
        print(f"batch {batch}: peak {rows[-1]['peak_mib_after_img2img']} MiB after img2img, "
              f"{rows[-1][f'peak_mib_after_{args.restorer}']} MiB after {args.restorer} (+{rows[-1]['extra_mib']} MiB)")
    decoder = [fresh("--side", str(side)) for side in args.sides]
    for row in decoder:
        print(f"SD1.5 VAE decoder at {row['side']} px keeps {row['decoder_saved_for_backward_mib']} MiB for backward")
    if args.json:
        restorer = "" if args.restorer == "red_diff" else f" --restorer {args.restorer}"
        command = f"python -m bench.restoration_memory{restorer} --json {args.json}"
        with open(args.json, "w") as f:
            json.dump({"command": command, "rows": rows, "decoder": decoder}, f, indent=1)


if __name__ == "__main__":
    main()
