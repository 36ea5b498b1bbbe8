"""Time per image of the Diffusion Classifier (issue 15) with adaptive elimination against every candidate at
every timestep, side by side in one process (round-robin, ratios paired per repeat; bench.timing's conventions).

    python -m bench.classifier_speed --count 2 --repeats 3 --threads 1 --json docs/bench/classifier_speed.json

On the reference model (--model sd15: trainfree_digits, 128 px; flux: trainfree_digits_flux) the images are
held-out digits (bench.classifier_quality's first --count) with their ten digit-word captions as candidates. With
--full-sd15 the model is instead the full-size SD1.5 UNet with random weights (float32, CPU) on a random latent of
--size px, and the candidates are ten fixed random 77 x 768 prompts (sampler_speed's stand-in text encoder).

Configurations (TrainFreeDiffusionClassifier called directly, seed 0, batch 8): ``elimination``: timesteps
--timesteps with keep --keep (default the node's, 25, 250 and 5, 1); ``all``: every candidate at the last stage's
timesteps (keep 1). Rows through the model are counted (an APPLY_MODEL wrapper); "expected" is the ratio if time
followed rows. One untimed warm-up classification first (timesteps 2, 4).
"""
import argparse
import statistics
import time

import torch

from bench import classifier_quality, timing
from bench.sampler_speed import RandomTextEncoder
from bench.quality import __main__ as quality
from harness import comfy_host


def plans(timesteps, keep):
    return {"elimination": (timesteps, keep), "all": (timesteps.split(",")[-1].strip(), "1")}


def reference_cases(model, count):
    import nodes
    unet, clip, vae = nodes.NODE_CLASS_MAPPINGS["TrainFreeReferenceModel"]().load(quality.MODELS[model])[:3]
    images, numbers, colours, backgrounds = classifier_quality.balanced_held_out(count)
    with torch.inference_mode():
        latents = [vae.encode(images[i:i + 1].permute(0, 2, 3, 1)) for i in range(count)]
    return unet, clip, [(lat, classifier_quality.candidates(c, b)) for lat, c, b in zip(latents, colours, backgrounds)]


def full_sd15_cases(count, size):
    g = torch.Generator().manual_seed(0)
    texts = [f"candidate prompt {i}" for i in range(10)]
    latents = [torch.randn(1, 4, size // 8, size // 8, generator=g) for _ in range(count)]
    return timing.make_sd15(), RandomTextEncoder({}), [(lat, texts) for lat in latents]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(quality.MODELS), default="sd15")
    parser.add_argument("--full-sd15", action="store_true", help="the full-size SD1.5 UNet, random weights")
    parser.add_argument("--size", type=int, default=256, help="with --full-sd15: image size in px")
    parser.add_argument("--count", type=int, default=2, help="images, each timed once per repeat and configuration")
    parser.add_argument("--timesteps", default="25, 250")
    parser.add_argument("--keep", default="5, 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="raw result (default bench/output/classifier_speed.json)")
    args = parser.parse_args()
    comfy_host.boot()
    torch.set_num_threads(args.threads)
    import nodes
    model, clip, cases = full_sd15_cases(args.count, args.size) if args.full_sd15 else \
        reference_cases(args.model, args.count)
    subject = f"full-size SD1.5 UNet (random weights), {args.size} px" if args.full_sd15 else \
        f"reference model {quality.MODELS[args.model]}"
    print(f"{subject}, {args.count} images x 10 candidates, {torch.get_num_threads()} threads, {args.repeats} "
          f"repeats", flush=True)
    counter = timing.RowCounter(model)
    node = nodes.NODE_CLASS_MAPPINGS["TrainFreeDiffusionClassifier"]()
    configurations = plans(args.timesteps, args.keep)
    times = {name: [] for name in configurations}
    cpu_times = {name: [] for name in configurations}
    rows, answers = {}, {}

    def run(name):
        steps, keep = configurations[name]
        counter.rows = 0
        start, start_cpu = time.perf_counter(), time.process_time()
        found = [node.classify(model, clip, "\n".join(texts), steps, keep, 0, 8, latent={"samples": latent})
                 ["result"][0] for latent, texts in cases]
        wall, cpu = (time.perf_counter() - start) / len(cases), (time.process_time() - start_cpu) / len(cases)
        rows[name], answers[name] = counter.rows / len(cases), found
        return wall, cpu

    names = list(configurations)
    with torch.inference_mode():
        latent, texts = cases[0]  # warm-up, untimed: a two-stage plan on the first image
        node.classify(model, clip, "\n".join(texts), "2, 4", "2, 1", 0, 8, latent={"samples": latent})
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                wall, cpu = run(name)
                times[name].append(wall)
                cpu_times[name].append(cpu)
            print(f"  repeat {r + 1}/{args.repeats} done", flush=True)
    ratio = timing.paired_ratio(times, "elimination", "all")
    cpu_ratio = timing.paired_ratio(cpu_times, "elimination", "all")
    expected = rows["elimination"] / rows["all"]
    for name in names:
        print(f"{name:<12} {statistics.median(times[name]):8.2f} s/image wall  "
              f"{statistics.median(cpu_times[name]):8.2f} s/image CPU  {rows[name]:6.0f} rows/image")
    print(f"elimination / all: wall {ratio:.3f}x, CPU {cpu_ratio:.3f}x (rows alone: {expected:.3f}x); "
          f"same answers: {sum(a == b for a, b in zip(answers['elimination'], answers['all']))}/{len(cases)}")
    timing.save("classifier_speed", args, subject=subject, configurations=configurations, seconds=times,
                cpu_seconds=cpu_times, rows_per_image=rows, answers=answers, ratio_wall=ratio, ratio_cpu=cpu_ratio,
                ratio_rows=expected)


if __name__ == "__main__":
    main()
