"""The guidance family (APG, FDG, guidance interval, noise-damped CFG, residual CFG, two-model guidance) on the
real ComfyUI with tiny models of the four families: reductions to CFG, counted passes, composition."""
import itertools

import pytest
import torch

from conftest import ModelCallCounter, run_node, sample
from harness import tiny_models

AUTO = "autoguidance (guide gets the prompt)"
NEGATIVE = "negative model (guide gets the negative prompt)"
SINE = "SINE (guide is a fine-tuned model mixed into the prompt branch)"


def apg(m, eta=0.0, norm_threshold=15.0, momentum=-0.5):
    return run_node("TrainFreeAPG", model=m, eta=eta, norm_threshold=norm_threshold, momentum=momentum)[0]


def fdg(m, low=5.0, high=10.0, levels=2, eta_low=1.0, eta_high=1.0):
    return run_node("TrainFreeFDG", model=m, low_scale=low, high_scale=high, levels=levels,
                    low_parallel_weight=eta_low, high_parallel_weight=eta_high)[0]


def interval(m, low=0.28, high=5.42):
    return run_node("TrainFreeGuidanceInterval", model=m, sigma_low=low, sigma_high=high)[0]


def damped(m, weak, percent=0.7):
    return run_node("TrainFreeNoiseDampedCFG", model=m, weak_model=weak, damped_percent=percent)[0]


def residual(m, mode="one-time negative", delta=1.0):
    return run_node("TrainFreeResidualCFG", model=m, mode=mode, delta=delta)[0]


def two_model(m, guide, mode=AUTO, **inputs):
    if mode == SINE and "sine_prompt" not in inputs:  # the fine-tuned model's own prompt, c_hat
        family = {"wan": tiny_models.VIDEO_FAMILY}.get(_host().model_family(m), _host().model_family(m))
        inputs["sine_prompt"] = tiny_models.conditioning(family, tokens=8, seed=5)
    return run_node("TrainFreeTwoModelGuidance", model=m, guide_model=guide, mode=mode, **inputs)[0]


def _host():
    from harness import comfy_host
    return comfy_host.pack_module("nodes.host")


def pag(m):
    return run_node("TrainFreePAG", model=m, scale=2.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]


def report(model):
    from harness import comfy_host
    return list(comfy_host.pack_module("nodes.host").run_reports(model).values())


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_apg_with_eta_1_no_clip_no_momentum_is_cfg_exactly(tiny, family):
    assert torch.equal(sample(apg(tiny(family), 1.0, 0.0, 0.0), family), sample(tiny(family), family))


def test_apg_defaults_change_the_result(tiny, family):
    assert (sample(apg(tiny(family)), family) - sample(tiny(family), family)).abs().max() > 1e-3


def test_apg_is_core_apg_one_guidance_unit_weaker(tiny):
    for family in ("sd15", "sdxl"):
        core = run_node("APG", model=tiny(family), eta=0.0, norm_threshold=15.0, momentum=0.0)[0]
        close(sample(apg(tiny(family), 0.0, 15.0, 0.0), family, cfg=5.0), sample(core, family, cfg=4.0))


def test_fdg_with_equal_scales_is_cfg(tiny, family):
    close(sample(fdg(tiny(family), 3.0, 3.0), family, cfg=3.0), sample(tiny(family), family, cfg=3.0))
    assert (sample(fdg(tiny(family)), family) - sample(tiny(family), family)).abs().max() > 1e-3


def test_fdg_runs_the_unconditional_pass_even_at_cfg_1(tiny):
    counted = fdg(tiny("sd15")).clone()
    counter = ModelCallCounter(counted)
    sample(counted, "sd15", cfg=1.0, steps=3)
    assert counter.rows == 6


def test_interval_covering_everything_is_cfg_exactly(tiny, family):
    assert torch.equal(sample(interval(tiny(family), 0.0, 1000.0), family), sample(tiny(family), family))


def test_interval_skips_the_unconditional_pass_outside_and_reports_it(tiny, family):
    patched = interval(tiny(family), 0.5, 3.0).clone()
    counter = ModelCallCounter(patched)
    out = sample(patched, family, steps=8)
    saved = report(patched)[0]["saved_passes"]
    assert 0 < saved < 8 and counter.rows == 2 * 8 - saved
    assert (out - sample(tiny(family), family, steps=8)).abs().max() > 1e-3


def test_noise_damped_with_the_same_weights_is_cfg_and_costs_one_pass_per_damped_step(tiny, family):
    weak = tiny(family).clone()
    patched = damped(tiny(family), weak, 0.5)
    close(sample(patched, family, steps=6), sample(tiny(family), family, steps=6))
    assert 0 < report(patched)[0]["weak_passes"] < 6
    other = tiny_models.make_model(family, seed=7)
    assert (sample(damped(tiny(family), other), family) - sample(tiny(family), family)).abs().max() > 1e-3
    assert torch.equal(sample(damped(tiny(family), other, 0.0), family), sample(tiny(family), family))


@pytest.mark.parametrize("mode,passes", [("one-time negative", 4 + 1), ("self-negative", 4)])
def test_residual_cfg_runs_at_most_one_unconditional_pass(tiny, family, mode, passes):
    patched = residual(tiny(family), mode).clone()
    counter = ModelCallCounter(patched)
    out = sample(patched, family, steps=4, cfg=1.2)
    assert counter.rows == passes and torch.isfinite(out).all()
    assert report(patched)[0]["saved_passes"] == 8 - passes
    assert (out - sample(tiny(family), family, steps=4, cfg=1.2)).abs().max() > 1e-3


def test_autoguidance_with_an_identical_guide_is_the_conditional_prediction(tiny, family):
    guided = two_model(tiny(family), tiny(family).clone())
    assert torch.equal(sample(guided, family, cfg=3.0), sample(tiny(family), family, cfg=1.0))


def test_negative_model_with_identical_weights_is_cfg(tiny, family):
    close(sample(two_model(tiny(family), tiny(family).clone(), NEGATIVE), family), sample(tiny(family), family))


def test_two_model_guidance_costs_what_cfg_costs(tiny, family):
    main = tiny(family).clone()
    counter = ModelCallCounter(main)
    guided = two_model(main, tiny_models.make_model(family, seed=7))
    out = sample(guided, family, steps=4)
    assert counter.rows == 4 and report(guided)[0]["guide_passes"] == 4
    assert (out - sample(tiny(family), family, steps=4)).abs().max() > 1e-3


def test_two_model_guidance_refuses_a_guide_of_another_family(tiny):
    with pytest.raises(ValueError, match="same family"):
        two_model(tiny("sd15"), tiny("flux"))
    with pytest.raises(ValueError, match="main model itself"):
        two_model(tiny("sd15"), tiny("sd15"))


def _patches(family):
    other = tiny_models.make_model(family, seed=7)
    return {"pag": pag, "apg": apg, "fdg": fdg, "interval": lambda m: interval(m, 0.5, 3.0),
            "damped": lambda m: damped(m, other), "residual": residual, "two_model": lambda m: two_model(m, other)}


def test_every_pair_composes_in_both_orders_and_each_member_acts(tiny, family):
    patches = _patches(family)
    alone = {name: sample(patch(tiny(family)), family, steps=6) for name, patch in patches.items()}
    for (a, patch_a), (b, patch_b) in itertools.permutations(patches.items(), 2):
        both = sample(patch_b(patch_a(tiny(family))), family, steps=6)
        assert torch.isfinite(both).all(), (a, b)
        assert (both - alone[a]).abs().max() > 1e-4, f"{b} after {a} did nothing"
        assert (both - alone[b]).abs().max() > 1e-4, f"{a} before {b} did nothing"


def test_sine_mixes_the_fine_tuned_model_in_early_steps_only(tiny, family):
    prompt = tiny_models.conditioning(family, tokens=8, seed=1)  # sample()'s positive prompt
    same = two_model(tiny(family), tiny(family).clone(), SINE, sine_prompt=prompt)
    close(sample(same, family, steps=6), sample(tiny(family), family, steps=6))  # identical guide and prompt: CFG
    guided = two_model(tiny(family), tiny_models.make_model(family, seed=7), SINE,
                       sine_prompt=tiny_models.conditioning(family, tokens=8, seed=5))
    out = sample(guided, family, steps=6)
    assert 0 < report(guided)[0]["guide_passes"] < 6, "only steps with timestep above K=400"
    assert (out - sample(tiny(family), family, steps=6)).abs().max() > 1e-3


def test_sine_is_the_papers_equation_with_the_fine_tuned_model_on_its_own_prompt(tiny, family):
    """One Euler step from sigma_max (timestep 1000 > K) to 0 returns the step's denoised prediction, so each
    prediction the paper's equation needs comes from a plain one-step run at cfg 1: eps(z_t, c) and eps(z_t) from
    the pretrained model, eps_hat(z_t, c_hat) from the fine-tuned one on its own prompt c_hat."""
    fine = tiny_models.make_model(family, seed=7)
    c, c_hat, negative = (tiny_models.conditioning(family, tokens=8, seed=s) for s in (1, 5, 2))

    def one_step(model, positive, cfg=1.0):
        return sample(model, family, steps=1, cfg=cfg, pos=positive, neg=negative)
    eps_c, eps_u, eps_hat = one_step(tiny(family), c), one_step(tiny(family), negative), one_step(fine, c_hat)
    for w, v in ((4.0, 0.7), (2.0, 0.0)):
        expected = w * (v * eps_c + (1 - v) * eps_hat) + (1 - w) * eps_u  # techniques.md 18b, t > K
        guided = two_model(tiny(family), fine, SINE, sine_weight=v, sine_prompt=c_hat)
        close(one_step(guided, c, cfg=w), expected)
        on_main_prompt = two_model(tiny(family), fine, SINE, sine_weight=v, sine_prompt=c)
        assert (one_step(on_main_prompt, c, cfg=w) - expected).abs().max() > 1e-3  # c_hat is what the guide sees


def test_sine_asks_for_the_fine_tuned_models_prompt_and_only_in_sine_mode(tiny):
    fine = tiny_models.make_model("sd15", seed=7)
    with pytest.raises(ValueError, match="SINE needs the fine-tuned model's own prompt: connect to sine_prompt"):
        run_node("TrainFreeTwoModelGuidance", model=tiny("sd15"), guide_model=fine, mode=SINE)
    with pytest.raises(ValueError, match="sine_prompt is only used in SINE mode.*disconnect it or choose"):
        two_model(tiny("sd15"), fine, AUTO, sine_prompt=tiny_models.conditioning("sd15"))


@pytest.mark.parametrize("patch", [interval, residual], ids=["interval", "residual"])
def test_patches_that_set_cfg_per_step_refuse_a_guider_that_does_not_read_it(tiny, patch):
    """DualCFGGuider combines its passes with its own two scales; a per-step cfg would be silently ignored."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    model = patch(tiny("sd15"))
    guider = Guider_DualCFG(model)
    cond = tiny_models.conditioning("sd15", tokens=8, seed=1)
    guider.set_conds(cond, tiny_models.conditioning("sd15", tokens=8, seed=3),
                     tiny_models.conditioning("sd15", tokens=8, seed=2))
    guider.set_cfg(3.0, 2.0)
    latent = torch.zeros(1, 4, 16, 16)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    with pytest.raises(ValueError, match="DualCFG.*does not read.*CFGGuider"):
        guider.sample(comfy.sample.prepare_noise(latent, 0), latent, comfy.samplers.sampler_object("euler"), sigmas,
                      disable_pbar=True, seed=0)


def test_a_latent_of_another_family_is_named_once_however_many_patches(tiny, host):
    import comfy.patcher_extension as pe
    patched = fdg(apg(tiny("sd15")))
    assert len(patched.wrappers[pe.WrappersMP.OUTER_SAMPLE][host.runs._LATENT_GUARD]) == 1
    for model in (fdg(tiny("sd15")), patched):
        with pytest.raises(ValueError, match="16 channels but this model .SD1.5. works on 4-channel"):
            sample(model, "sd3")  # an SD3 latent (16 channels) and conditioning into an SD1.5 model
