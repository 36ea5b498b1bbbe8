"""Seconds per sampling step of the guidance patches against plain CFG on the full-size SD1.5 UNet (random
weights, CPU, float32), timed round-robin in one process. Target: the math-only patches (APG, FDG) cost under 3%
per step; guidance interval and residual CFG save unconditional passes (rows per run show how many). NASA runs
here at the same cfg as CFG, so its column is its own overhead (the negative prompt's attention in every
cross-attention layer, on the conditional rows); at the cfg 1 it is meant for it also drops CFG's unconditional row.
GFCG (issue 15) adds one conditional pass per step plus its judge: ``gfcg-prompt`` a Prompt Judge over two class
prompts at two timesteps (4 judge rows per image and step; the rows grow with classes x timesteps), ``gfcg-oracle``
the digit oracle on the estimate decoded by the SD1.5 VAE's architecture (random weights) at the latent's size.
Dynamic CFG (issue 15) runs no extra model pass; ``dynamic-cfg`` judges its 5 candidate scales' estimates with the
digit oracle after that VAE, so its cost is 5 decodes per step.
Their class prompts come from a 768-wide, 2-layer CLIP text encoder with random weights (only their shape matters).

    python -m bench.guidance_speed [--steps 8] [--repeats 3] [--size 256] [--threads N] [--only apg,fdg] [--json PATH]

The raw result goes to --json (default bench/output/guidance_speed.json); README's figures are in docs/bench/.
"""
from bench.timing import paired_ratio, round_robin, save, select, setup


def configurations(base):
    import torch
    import nodes
    node = lambda name, **kw: getattr(nodes.NODE_CLASS_MAPPINGS[name](), "patch")(base, **kw)[0]  # noqa: E731
    return {
        "cfg": base.clone(),
        "apg": node("TrainFreeAPG", eta=0.0, norm_threshold=15.0, momentum=-0.5),
        "fdg": node("TrainFreeFDG", low_scale=5.0, high_scale=10.0, levels=2, low_parallel_weight=1.0,
                    high_parallel_weight=1.0),
        "interval": node("TrainFreeGuidanceInterval", sigma_low=0.28, sigma_high=5.42),
        "residual-1x": node("TrainFreeResidualCFG", mode="one-time negative", delta=1.0),
        **judged_configurations(node),
        "nasa": node("TrainFreeNASA", negative=[[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(7)),
                                                 {}]], alpha=0.1, start_percent=0.0, end_percent=1.0),
    }


def judged_configurations(node):
    import comfy.sd
    import torch
    from bench.timing import make_sd_vae
    from harness import tiny_models
    config = {**tiny_models._CLIP_CONFIG, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
              "projection_dim": 768}
    clip = comfy.sd.CLIP(target=tiny_models.clip_target(config), model_options={"dtype": torch.float32})
    tiny_models.init_fan_in(clip.cond_stage_model, 0)
    classes = "a photo of a cat\na photo of a dog"
    import nodes
    prompt_judge = nodes.NODE_CLASS_MAPPINGS["TrainFreePromptJudge"]().make(clip, classes, 2, 0)[0]
    oracle = nodes.NODE_CLASS_MAPPINGS["TrainFreeDigitOracleJudge"]().make()[0]
    common = dict(clip=clip, target_class="1", scale=2.0, start_percent=0.0, end_percent=1.0)
    digits = "\n".join(f"a digit {label}" for label in oracle.labels)
    vae = make_sd_vae()
    return {"gfcg-prompt": node("TrainFreeGFCG", judge=prompt_judge, class_prompts=classes, **common),
            "gfcg-oracle": node("TrainFreeGFCG", judge=oracle, vae=vae, class_prompts=digits, **common),
            "dynamic-cfg": node("TrainFreeDynamicCFG", candidate_scales="1, 3, 5, 7.5, 10", judge=oracle,
                                target="seven", weight=1.0, start_percent=0.0, end_percent=1.0, vae=vae)}


def main():
    args, base = setup(__doc__, default_steps=8, selectable=True)
    models = select(configurations(base), args.only)
    result, times, cpu_times = round_robin(models, args.steps, args.repeats, args.size)
    base_time, base_rows = result["cfg"]
    ratios = {name: paired_ratio(times, name) for name in result}
    cpu_ratios = {name: paired_ratio(cpu_times, name) for name in result}
    print(f"\n{'configuration':<14}{'s/step':>9}{'x CFG':>8}{'x CFG cpu':>10}{'rows/run':>10}{'passes saved':>14}")
    for name, (seconds, rows) in result.items():
        print(f"{name:<14}{seconds:>9.3f}{ratios[name]:>8.3f}{cpu_ratios[name]:>10.3f}{rows:>10}{base_rows - rows:>14}")
    print("(x CFG: median over repeats of the ratio to CFG's run in the same repeat, wall clock and CPU time)")
    math_ms = math_only(args.size, base_time)
    math_percent = {name: 100 * ms / 1000 / base_time for name, ms in math_ms.items()}
    print("\ntarget: APG and FDG under 1.03x CFG per step. Their math alone (no model), per step:")
    for name, ms in math_ms.items():
        print(f"  {name}: {ms:.2f} ms = {math_percent[name]:.3f}% of a CFG step")
    save("guidance_speed", args, seconds=times, cpu_seconds=cpu_times, result=result, paired_ratio=ratios,
         paired_cpu_ratio=cpu_ratios, math_ms=math_ms, math_percent_of_cfg_step=math_percent)


def math_only(size, step_seconds, repeats=50):
    """Milliseconds of the APG and FDG combinations on one latent of this size: the part of their overhead that
    whole-run timings on a noisy machine cannot resolve."""
    import time
    import torch
    from guidance_ops import apg, fdg
    cond, uncond = torch.randn(2, 1, 4, size // 8, size // 8).unbind(0)
    buffer = apg.MomentumBuffer(-0.5)
    ops = {"apg": lambda: apg.apg(cond, uncond, 5.0, 0.0, 15.0, buffer),
           "fdg": lambda: fdg.fdg(cond, uncond, 5.0, 10.0, 2)}
    result = {}
    for name, op in ops.items():
        op()
        started = time.perf_counter()
        for _ in range(repeats):
            op()
        result[name] = (time.perf_counter() - started) / repeats * 1000
    return result


if __name__ == "__main__":
    main()
