"""Samplers and adaptive compute (issue 14) on the reference models: CFG against Adaptive Guidance and LinearAG,
CFG++ against CFG over a strength sweep, momentum samplers against their base solvers at few steps and high CFG.

    python -m bench.sampler_quality --out-dir docs/bench --grid-dir docs/quality     # both models
    python -m bench.sampler_quality --models sd15 --per-prompt 4

Every row samples the evaluation captions (``bench.quality.prompt_set``: 10 prompts x --per-prompt seeds, 128 px)
through ComfyUI's engine with ``SamplerCustomAdvanced`` (RandomNoise, CFGGuider, BasicScheduler; the normal
scheduler on the SD1.5-class model, simple on the Flux-class one) and is scored as ``bench.quality`` scores
(digit oracle adherence, colour / background adherence, Fréchet distance of the oracle's features to held-out
real digits, share of clipped channel values, mean chroma), plus PSNR / SSIM against a reference row.

- guidance (20 Euler steps, cfg 7.5): ``cfg``; ``ag`` (TrainFreeAdaptiveGuidance at the paper's 0.991);
  ``linear_ag`` (TrainFreeLinearAG, calibrated in the same graph by TrainFreeLinearAGCalibrate on CALIBRATION
  captions that the evaluation set never uses, same steps / cfg / sampler / scheduler, seed 1000, 4 runs each).
  Model evaluations are counted twice, independently: rows pushed through the model (an APPLY_MODEL wrapper
  upstream of the patches) and the passes the nodes report saved in their log; the two must agree.
- CFG++ (20 steps): Euler CFG at cfg 3 / 5 / 7.5 / 12 against TrainFreeCFGPPSampler (ddim = euler) at
  lambda 0.2 ... 1.0, same seeds. PSNR against CFG 7.5.
- momentum (cfg 15, 6 and 10 steps): core dpmpp_2m against dpmpp_2m_hb (beta 0.8); PLMS order 4 (our sampler at
  beta 1, which is PLMS exactly) against plms_hb and ghvb at order 4, beta 0.8. PSNR against core dpmpp_2m at
  REFERENCE_STEPS steps, same cfg (the converged solution: how far the few-step solver lands from it).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from bench import highres_quality
from bench.cache_quality import calibration_captions, logged
from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from harness import comfy_host
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "sampler_quality")
SCHEDULERS = {"sd15": "normal", "flux": "simple"}
GUIDANCE_CFG, GUIDANCE_STEPS, AG_THRESHOLD = 7.5, 20, 0.991
CFG_SWEEP, LAMBDA_SWEEP = (3.0, 5.0, 7.5, 12.0), (0.2, 0.4, 0.6, 0.8, 1.0)
MOMENTUM_CFG, MOMENTUM_STEPS, MOMENTUM_BETA, REFERENCE_STEPS = 15.0, (6, 10), 0.8, 40
CALIBRATION_SEED, CALIBRATION_RUNS = 1000, 4
FROM_INPUT = "(from the calibration input)"
_rows_seen = []


class HarnessCountRows:
    """MODEL -> MODEL: counts the batch rows the model evaluates (APPLY_MODEL wrapper; clones keep it)."""
    CATEGORY = "harness"
    FUNCTION = "count"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def count(self, model):
        import comfy.patcher_extension as pe
        m = model.clone()

        def wrapper(executor, x, *args, **kwargs):
            _rows_seen.append(x.shape[0])
            return executor(x, *args, **kwargs)
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench_row_counter", wrapper)
        return (m,)


def core_sampler(name):
    return {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}}


def cfgpp_sampler():
    return {"class_type": "TrainFreeCFGPPSampler", "inputs": {"solver": "ddim (= euler)", "eta": 0.0}}


def momentum_sampler(solver, order, beta):
    return {"class_type": "TrainFreeMomentumSampler", "inputs": {"solver": solver, "order": order, "beta": beta}}


def calibrate_node(model, captions, steps, cfg):
    return {"class_type": "TrainFreeLinearAGCalibrate", "inputs": {
        "model": ["model", 0], "clip": ["model", 1],
        "calibration_prompts": "\n".join(digits.caption(*c) for c in captions), "negative_prompt": "",
        "runs_per_prompt": CALIBRATION_RUNS, "seed": CALIBRATION_SEED, "steps": steps, "cfg": cfg,
        "sampler_name": "euler", "scheduler": SCHEDULERS[model], "width": digits.SIZE, "height": digits.SIZE,
        "filename_prefix": f"sampler_quality_{model}"}}


def graph(model, captions, per_prompt, seed, steps, cfg, sampler, patches=()):
    """API prompt: reference model -> row counter -> patches -> SamplerCustomAdvanced per caption -> images."""
    prompt = {"model": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": quality.MODELS[model]}},
              "counted": {"class_type": "HarnessCountRows", "inputs": {"model": ["model", 0]}},
              "sampler": sampler,
              "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["model", 1]}},
              "latent": {"class_type": "EmptyLatentImage",
                         "inputs": {"width": digits.SIZE, "height": digits.SIZE, "batch_size": per_prompt}}}
    current = ["counted", 0]
    for i, (class_type, inputs) in enumerate(patches):
        inputs = dict(inputs)
        for key, value in inputs.items():
            if isinstance(value, dict) and "class_type" in value:
                prompt[f"patch{i}_{key}"] = value
                inputs[key] = [f"patch{i}_{key}", 0]
        prompt[f"patch{i}"] = {"class_type": class_type, "inputs": {"model": current, **inputs}}
        current = [f"patch{i}", 0]
    prompt["sigmas"] = {"class_type": "BasicScheduler", "inputs": {
        "model": current, "scheduler": SCHEDULERS[model], "steps": steps, "denoise": 1.0}}
    for i, (digit, colour, background) in enumerate(captions):
        prompt[f"pos{i}"] = {"class_type": "CLIPTextEncode",
                             "inputs": {"text": digits.caption(digit, colour, background), "clip": ["model", 1]}}
        prompt[f"guider{i}"] = {"class_type": "CFGGuider", "inputs": {
            "model": current, "positive": [f"pos{i}", 0], "negative": ["neg", 0], "cfg": cfg}}
        prompt[f"noise{i}"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed + i}}
        prompt[f"sample{i}"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [f"noise{i}", 0], "guider": [f"guider{i}", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}}
        prompt[f"decode{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample{i}", 0],
                                                                      "vae": ["model", 2]}}
        prompt[f"out{i}"] = {"class_type": "HarnessCollectImages",
                             "inputs": {"images": [f"decode{i}", 0], "key": str(i)}}
    return prompt


def reported_saves(records):
    """Unconditional passes the guidance nodes logged as saved, summed over runs, and their run count."""
    saved, runs = 0, 0
    for r in records:
        if r.name != "trainfree":
            continue
        text = str(r.msg)
        if text.startswith("TrainFree Adaptive Guidance:"):
            saved, runs = saved + r.args[3], runs + 1
        elif text.startswith("TrainFree LinearAG:"):
            saved, runs = saved + r.args[0], runs + 1
    return saved, runs


class Bench:
    def __init__(self, model, prompts, per_prompt):
        self.model, self.per_prompt = model, per_prompt
        self.captions = quality.prompt_set(prompts)
        self.judge = oracle.load()
        reference = comfy_host.pack_module("nodes.reference_model")
        self.real = quality.real_features(
            self.judge, lambda: reference.TrainFreeReferenceModel().load(quality.MODELS[model])[2], OUT, model)
        self.rows = {}

    def images(self, name):
        return torch.load(os.path.join(OUT, f"{self.model}_{name}.pt")).float() / 255

    def run(self, name, steps, cfg, sampler, patches=(), against=None, **settings):
        quality._collected.clear()
        _rows_seen.clear()
        started = time.perf_counter()
        _, records = logged(lambda: comfy_host.execute_prompt(
            graph(self.model, self.captions, self.per_prompt, 0, steps, cfg, sampler, patches)))
        seconds = time.perf_counter() - started
        images = torch.cat([quality._collected[str(i)] for i in range(len(self.captions))]).permute(0, 3, 1, 2)
        images = images.float()
        runs = len(self.captions)
        evaluations = len(_rows_seen)
        rows = sum(_rows_seen)
        saved, reporting_runs = reported_saves(records)
        row = {"row": name, "steps": steps, "cfg": cfg, **settings, "model_evaluations": evaluations,
               "model_rows": rows, "passes_per_image": rows / (runs * self.per_prompt),
               "reported_saved_passes_per_run": saved / runs if reporting_runs else None,
               "seconds_per_image": seconds / len(images),
               **quality.score(images, self.captions, self.per_prompt, self.judge, self.real)}
        if against:
            reference = self.images(against)
            row.update(against=against, psnr=metrics.psnr(images, reference), ssim=metrics.ssim(images, reference))
        torch.save(images.mul(255).round().byte(), os.path.join(OUT, f"{self.model}_{name}.pt"))
        self.rows[name] = row
        print(format_row(row), flush=True)
        return row


def guidance(bench):
    m, cfg, steps = bench.model, GUIDANCE_CFG, GUIDANCE_STEPS
    base = bench.run("cfg", steps, cfg, core_sampler("euler"), group="guidance", method="CFG")
    ag = bench.run("ag", steps, cfg, core_sampler("euler"), [("TrainFreeAdaptiveGuidance",
                                                              {"threshold": AG_THRESHOLD})], against="cfg",
                   group="guidance", method=f"Adaptive Guidance {AG_THRESHOLD}")
    lag = bench.run("linear_ag", steps, cfg, core_sampler("euler"), [(
        "TrainFreeLinearAG", {"calibration_file": FROM_INPUT,
                              "calibration": calibrate_node(m, calibration_captions(), steps, cfg)})],
        against="cfg", group="guidance", method="LinearAG")
    for row in (ag, lag):
        passes_saved = (base["model_rows"] - row["model_rows"]) / (len(bench.captions) * bench.per_prompt)
        row["counted_saved_passes_per_image"] = passes_saved
        row["saved_share_of_cfg_evaluations"] = passes_saved / base["passes_per_image"]
        if row["reported_saved_passes_per_run"] != passes_saved:
            raise RuntimeError(f"{row['row']}: the node reported {row['reported_saved_passes_per_run']} passes saved "
                               f"per run, the row counter {passes_saved}")


def cfgpp(bench):
    steps = GUIDANCE_STEPS
    for w in CFG_SWEEP:
        if w == GUIDANCE_CFG and "cfg" in bench.rows:
            bench.rows[f"cfg_{w:g}"] = dict(bench.rows["cfg"], row=f"cfg_{w:g}", group="cfgpp")
            shutil.copyfile(os.path.join(OUT, f"{bench.model}_cfg.pt"), os.path.join(OUT, f"{bench.model}_cfg_{w:g}.pt"))
            continue
        bench.run(f"cfg_{w:g}", steps, w, core_sampler("euler"), against="cfg", group="cfgpp", method="CFG (Euler)")
    for lam in LAMBDA_SWEEP:
        bench.run(f"cfgpp_{lam:g}", steps, lam, cfgpp_sampler(), against="cfg", group="cfgpp",
                  method="CFG++ (DDIM = Euler)", strength_lambda=lam)


MOMENTUM_ROWS = [  # name, sampler node, the solver it is measured against
    ("dpmpp_2m", lambda: core_sampler("dpmpp_2m"), None),
    ("dpmpp_2m_hb", lambda: momentum_sampler("dpmpp_2m_hb", 2, MOMENTUM_BETA), "dpmpp_2m"),
    ("plms4", lambda: momentum_sampler("plms_hb", 4, 1.0), None),
    ("plms4_hb", lambda: momentum_sampler("plms_hb", 4, MOMENTUM_BETA), "plms4"),
    ("ghvb4", lambda: momentum_sampler("ghvb", 4, MOMENTUM_BETA), "plms4"),
]


def momentum(bench):
    cfg = MOMENTUM_CFG
    bench.run(f"reference_{REFERENCE_STEPS}", REFERENCE_STEPS, cfg, core_sampler("dpmpp_2m"), group="momentum",
              method=f"dpmpp_2m, {REFERENCE_STEPS} steps (converged reference)")
    for steps in MOMENTUM_STEPS:
        for name, sampler, base in MOMENTUM_ROWS:
            bench.run(f"{name}_{steps}", steps, cfg, sampler(), against=f"reference_{REFERENCE_STEPS}",
                      group="momentum", method=name, base=None if base is None else f"{base}_{steps}")


def format_row(r):
    drift = f"  psnr {r['psnr']:6.2f}  ssim {r['ssim']:.3f}" if "psnr" in r else ""
    return (f"{r['row']:<16} digit {r['digit_adherence']:.3f}  colour {r['colour_adherence']:.3f}  FD "
            f"{r['frechet_distance']:7.1f}  clipped {r['clipped_share']:.4f}  chroma {r['mean_chroma']:.3f}  "
            f"passes/img {r['passes_per_image']:.1f}{drift}  {r['seconds_per_image']:.2f} s/img")


def grid(bench, names, path):
    images = [bench.images(n)[::bench.per_prompt] for n in names]
    highres_quality.save_grid(torch.cat(images), len(bench.captions), path)
    half(path)
    return os.path.basename(path)


def half(path):
    """Grids at 64 px a cell (128-colour PNG), small enough for the docs."""
    from PIL import Image
    image = Image.open(path).convert("RGB")
    image.resize((image.width // 2, image.height // 2), Image.LANCZOS).quantize(128).save(path, optimize=True)


def run_model(model, args):
    bench = Bench(model, args.prompts, args.per_prompt)
    guidance(bench)
    cfgpp(bench)
    momentum(bench)
    grid_dir = args.grid_dir or args.out_dir
    os.makedirs(grid_dir, exist_ok=True)
    grids = {
        "cfgpp": ([f"cfg_{w:g}" for w in CFG_SWEEP] + [f"cfgpp_{x:g}" for x in LAMBDA_SWEEP]),
        "momentum": [f"reference_{REFERENCE_STEPS}"] + [f"{n}_{s}" for s in MOMENTUM_STEPS for n, _, _ in
                                                        MOMENTUM_ROWS],
        "guidance": ["cfg", "ag", "linear_ag"],
    }
    made = {kind: {"file": grid(bench, names, os.path.join(grid_dir, f"sampler_{model}_{kind}.png")),
                   "rows": names} for kind, names in grids.items()}
    return {"model": model, "model_file": quality.MODELS[model], "scheduler": SCHEDULERS[model],
            "prompts": args.prompts, "per_prompt": args.per_prompt, "seed": 0,
            "calibration_captions": [digits.caption(*c) for c in calibration_captions()],
            "calibration_seed": CALIBRATION_SEED, "calibration_runs_per_caption": CALIBRATION_RUNS,
            "host": comfy_host.host_label().split(" ")[0], "torch_threads": torch.get_num_threads(),
            "grids": made, "rows": list(bench.rows.values())}


COLUMNS = [("digit", "digit_adherence", "{:.3f}"), ("colour", "colour_adherence", "{:.3f}"),
           ("FD", "frechet_distance", "{:.0f}"), ("clipped", "clipped_share", "{:.4f}"),
           ("chroma", "mean_chroma", "{:.3f}"), ("PSNR", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.3f}")]


def tables(result):
    """Markdown tables of one model's result (what docs/quality.md quotes)."""
    out = []
    for group, extra in (("guidance", [("model passes / image", "passes_per_image", "{:.1f}"),
                                       ("saved (counted)", "counted_saved_passes_per_image", "{:.2f}"),
                                       ("saved share", "saved_share_of_cfg_evaluations", "{:.1%}")]),
                         ("cfgpp", []), ("momentum", [("passes / image", "passes_per_image", "{:.0f}")])):
        columns = [("row", "row", "{}"), ("steps", "steps", "{}"), ("cfg / lambda", "cfg", "{:g}")] + extra + COLUMNS
        out.append("| " + " | ".join(c[0] for c in columns) + " |")
        out.append("|" + "---|" * len(columns))
        for r in result["rows"]:
            if r.get("group") == group:
                out.append("| " + " | ".join("-" if r.get(key) is None else fmt.format(r[key])
                                             for _, key, fmt in columns) + " |")
        out.append("")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SCHEDULERS), default=list(SCHEDULERS))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--per-prompt", type=int, default=4, help="seeds (batch items) per prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=OUT, help="raw JSON: <out-dir>/sampler_quality_<model>.json")
    parser.add_argument("--grid-dir", help="folder for the grids (default: --out-dir)")
    parser.add_argument("--tables", nargs="+", metavar="JSON", help="print the markdown tables of saved results "
                                                                    "and stop")
    args = parser.parse_args()
    if args.tables:
        quality.print_saved(args.tables, tables)
        return
    quality.boot_bench(args.threads, HarnessCountRows=HarnessCountRows)
    import folder_paths
    os.makedirs(OUT, exist_ok=True)
    calibrations = tempfile.mkdtemp(prefix="sampler_quality_")  # the calibrations, not in the host's output
    folder_paths.set_output_directory(calibrations)
    try:
        for model in args.models:
            result = {"command": " ".join(["python -m bench.sampler_quality"] + sys.argv[1:]),
                      **run_model(model, args)}
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, f"sampler_quality_{model}.json"), "w") as f:
                json.dump(result, f, indent=1)
    finally:
        shutil.rmtree(calibrations, ignore_errors=True)


if __name__ == "__main__":
    main()
