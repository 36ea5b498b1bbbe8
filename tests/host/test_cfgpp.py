"""CFG++ samplers on the real ComfyUI against core's own CFG++ samplers on the same weights, noise and prompts, and
against the paper's DDIM statement; with MODEL patches upstream; refusals."""
import pytest
import torch

from conftest import run_node
from harness import tiny_models

STEPS = 6
LAMBDA = 0.6


def cfgpp(solver="ddim (= euler)", eta=0.0):
    return run_node("TrainFreeCFGPPSampler", solver=solver, eta=eta)[0]


def run(model, family, sampler, cfg=LAMBDA, seed=5, steps=STEPS, scheduler="normal", pos=None, neg=None):
    import comfy.sample
    import comfy.samplers
    latent = torch.zeros(1, tiny_models.LATENT_CHANNELS[family], 16, 16)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float()
    return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, seed), cfg, sampler, sigmas,
                                      pos or tiny_models.conditioning(family, seed=1),
                                      neg or tiny_models.conditioning(family, seed=2), latent, seed=seed,
                                      disable_pbar=True)


def core(name):
    import comfy.samplers
    return comfy.samplers.sampler_object(name)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
def test_ddim_equals_core_euler_cfg_pp(tiny, family):
    close(run(tiny(family), family, cfgpp()), run(tiny(family), family, core("euler_cfg_pp")))


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_ancestral_ddim_equals_core_euler_ancestral_cfg_pp(tiny, family):
    close(run(tiny(family), family, cfgpp(eta=1.0)), run(tiny(family), family, core("euler_ancestral_cfg_pp")))


@pytest.mark.parametrize("family", ("sd15", "sdxl"))
def test_dpmpp_2m_equals_core_dpmpp_2m_cfg_pp_on_eps_models(tiny, family):
    close(run(tiny(family), family, cfgpp("dpmpp_2m")), run(tiny(family), family, core("dpmpp_2m_cfg_pp")))


@torch.no_grad()
def dpm_solver_pp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) as Lu et al. state it (data prediction, steps in lambda = log(alpha / sigma)), on ComfyUI's
    flow latent x = (1 - sigma) x0 + sigma eps: x' = (s' / s) x - a' (e^-h - 1) (D + (D - D_prev) / (2 r))."""
    import math
    ones = x.new_ones([x.shape[0]])
    previous, previous_h = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = model(x, sigmas[i] * ones, **extra_args)
        if s_next == 0:
            return d
        lam = -math.inf if s >= 1 else math.log((1 - s) / s)
        h = math.log((1 - s_next) / s_next) - lam
        blend = d if previous is None else d + (d - previous) / (2 * previous_h / h)
        x = (s_next / s) * x + (1 - s_next) * (-math.expm1(-h)) * blend
        previous, previous_h = d, h
    return x


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_dpmpp_2m_on_flow_models_is_the_papers_solver_and_differs_from_core(tiny, family):
    """With the guided and unconditional predictions equal (one prompt twice) CFG++ is its base solver: ours is
    DPM-Solver++(2M) in half log-SNR, the paper's variable. Core's dpmpp_2m_cfg_pp steps in log sigma and renoises
    without alpha, treating x as x0 + sigma eps, the latent of eps models only; with two prompts the two differ."""
    import comfy.samplers
    model = tiny(family)
    same = tiny_models.conditioning(family, seed=1)
    close(run(model, family, cfgpp("dpmpp_2m"), pos=same, neg=same),
          run(model, family, comfy.samplers.KSAMPLER(dpm_solver_pp_2m), pos=same, neg=same))
    ours, theirs = run(model, family, cfgpp("dpmpp_2m")), run(model, family, core("dpmpp_2m_cfg_pp"))
    assert (ours - theirs).abs().max() > 1e-3 * theirs.abs().max()


def test_one_step_is_the_papers_ddim_cfgpp_step(tiny):
    """The paper's DDIM CFG++ in its own (variance-preserving, eps) terms, on the predictions the sampler saw."""
    model = tiny("sd15")
    seen = []

    def keep(args):
        seen.append({k: args[k] for k in ("input", "sigma", "cond_denoised", "uncond_denoised")})
        return args["denoised"]
    spy = model.clone()
    spy.set_model_sampler_post_cfg_function(keep)
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas[[999, 700]].float()  # one step, ending at a noisy latent
    out = run_sigmas(spy, sigmas, cfgpp())
    first = seen[0]
    x, s, s_next = first["input"], float(sigmas[0]), float(sigmas[1])
    a, a_next = 1 / (1 + s ** 2), 1 / (1 + s_next ** 2)  # alpha-bar of the VE sigmas
    x_vp = x * a ** 0.5
    eps = {k: (x - first[f"{k}_denoised"]) / s for k in ("cond", "uncond")}
    eps_lambda = eps["uncond"] + LAMBDA * (eps["cond"] - eps["uncond"])
    x0 = (x_vp - (1 - a) ** 0.5 * eps_lambda) / a ** 0.5
    x_next_vp = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps["uncond"]
    close(out, model.model.process_latent_out(x_next_vp / a_next ** 0.5))  # the sampler hands back latent units


def run_sigmas(model, sigmas, sampler):
    import comfy.sample
    latent = torch.zeros(1, 4, 16, 16)
    return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 5), LAMBDA, sampler, sigmas,
                                      tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2),
                                      latent, seed=5, disable_pbar=True)


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_model_patches_upstream_act(tiny, family):
    model = tiny(family)
    patched = run_node("TrainFreePAG", model=model, scale=3.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]
    for solver in ("ddim (= euler)", "dpmpp_2m"):
        assert not torch.equal(run(patched, family, cfgpp(solver)), run(model, family, cfgpp(solver)))


def test_eta_on_the_deterministic_solver_is_refused():
    with pytest.raises(ValueError, match="set eta to 0"):
        cfgpp("dpmpp_2m", eta=0.5)


def test_a_guider_without_an_unconditional_prediction_is_refused(tiny):
    import comfy.sample
    import comfy.samplers
    model = tiny("sd15")
    guider = run_node("BasicGuider", model=model, conditioning=tiny_models.conditioning("sd15", seed=1))[0]
    latent = torch.zeros(1, 4, 16, 16)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3).float()
    with pytest.raises(ValueError, match="needs the unconditional prediction"):
        guider.sample(comfy.sample.prepare_noise(latent, 0), latent, cfgpp(), sigmas, seed=0, disable_pbar=True)
