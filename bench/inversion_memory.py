"""Null-text inversion's extra memory: the process's peak resident memory after sampling from an inversion, then
after null-text inversion of the same latent, on the SD1.5-class reference model at 128 px (CPU). Each batch size
runs in a fresh process, since the peak only grows.

    python -m bench.inversion_memory --json docs/bench/inversion_memory.json
"""
import argparse
import json

import torch

from bench.memory import in_fresh_process, node_runner, peak_mib


def measure(batch, steps):
    node = node_runner()
    torch.set_num_threads(1)
    with torch.inference_mode():
        model, clip, _ = node("TrainFreeReferenceModel", model_file="trainfree_digits.safetensors")
        positive = node("CLIPTextEncode", clip=clip, text="a red digit seven on a dark background")[0]
        negative = node("CLIPTextEncode", clip=clip, text="")[0]
        latent = {"samples": torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5}
        sigmas = node("BasicScheduler", model=model, scheduler="normal", steps=steps, denoise=1.0)[0]
        inversion = node("TrainFreeInvert", model=model, positive=positive, latent=latent, sigmas=sigmas,
                         sampler="euler", guidance=1.0, fixed_point_iterations=0)[0]
        node("TrainFreeSampleFromInversion", model=model, inversion=inversion, positive=positive, cfg=7.5,
             unconditional="negative prompt", negative=negative)
        sampling = peak_mib()
        node("TrainFreeNullTextInversion", model=model, inversion=inversion, negative=negative, cfg=7.5,
             inner_steps=2, learning_rate=0.01, early_stop=True)
        return {"batch": batch, "steps": steps, "peak_mib_after_sampling": round(sampling, 1),
                "peak_mib_after_null_text": round(peak_mib(), 1), "extra_mib": round(peak_mib() - sampling, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps)))
        return
    rows = []
    for batch in args.batches:
        rows.append(in_fresh_process("bench.inversion_memory", "--one", str(batch), "--steps", str(args.steps)))
        print(f"batch {batch}: peak {rows[-1]['peak_mib_after_sampling']} MiB after sampling, "
              f"{rows[-1]['peak_mib_after_null_text']} MiB after null-text inversion (+{rows[-1]['extra_mib']} MiB)")
    if args.json:
        command = "python -m bench.inversion_memory" + (f" --json {args.json}")
        with open(args.json, "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
