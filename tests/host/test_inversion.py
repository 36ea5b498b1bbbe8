"""The inversion family on the real ComfyUI with tiny models of the four families: reconstruction, the papers'
steps stated independently (VP-form DDIM / CFG++ inversion, diffusers' DDIM inverse scheduler), null-text and
negative-prompt inversion, proximal guidance, composition with patches, files, errors, progress and interrupt."""
import pytest
import torch

from conftest import FAMILIES, ModelCallCounter, run_node
from harness import tiny_models

NEGATIVE = "negative prompt"
NULL_TEXT = "null-text (from the inversion)"
NPI = "negative-prompt inversion (source prompt)"
PROXIMAL = "proximal guidance (source prompt + ProxEdit)"


def prompts(family):
    return tiny_models.conditioning(family, seed=1), tiny_models.conditioning(family, seed=2)


def latent(family, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, tiny_models.LATENT_CHANNELS[family], size, size, generator=g)}


def schedule(model, steps=10, denoise=1.0, scheduler="normal"):
    return run_node("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=denoise)[0]


def engine_node(class_type, **inputs):
    """A node run as ComfyUI's engine runs it: inside inference mode."""
    with torch.inference_mode():
        return run_node(class_type, **inputs)


def invert(model, positive, lat, sigmas, sampler="euler", guidance=1.0, iterations=0, negative=None):
    return engine_node("TrainFreeInvert", model=model, positive=positive, latent=lat, sigmas=sigmas, sampler=sampler,
                    guidance=guidance, fixed_point_iterations=iterations, negative=negative)[0]


def replay(model, inversion, positive, cfg=1.0, mode=NEGATIVE, negative=None, **inputs):
    return engine_node("TrainFreeSampleFromInversion", model=model, inversion=inversion, positive=positive, cfg=cfg,
                    unconditional=mode, negative=negative, **inputs)[0]["samples"]


def error(a, b):
    return (a - b).abs().max().item() / b.abs().max().item()


# ---------------------------------------------------------------- reconstruction

@pytest.fixture(scope="module")
def smooth(pack):
    """Tiny models whose noise prediction varies as slowly with the latent as a trained model's does (a random
    network's is far rougher, so fixed-point steps at high noise would not contract): the output layer of the
    eps models is scaled down. The reference-model tests check real trained weights."""
    cache = {}

    def get(family):
        if family not in cache:
            model = tiny_models.make_model(family)
            if family in ("sd15", "sdxl"):
                with torch.no_grad():
                    for name, p in model.model.diffusion_model.named_parameters():
                        if name.startswith("out.") and p.ndim > 1:
                            p.mul_(0.3)
            cache[family] = model
        return cache[family]
    return get


@pytest.mark.parametrize("sampler", ["euler", "cfg++"])
def test_inversion_then_sampling_reconstructs_the_latent(smooth, family, sampler):
    """At guidance 1 (euler) or the same lambda (cfg++), refined inversion and sampling give back the latent.
    CFG++'s guided steps on the random eps models contract too slowly for a tight bound in 16 iterations: there
    the test asks for a clear gain only."""
    model, (pos, neg), lat = smooth(family), prompts(family), latent(family)
    sigmas = schedule(model, 10, denoise=0.5)
    guidance = 1.0 if sampler == "euler" else 0.6
    plain = invert(model, pos, lat, sigmas, sampler, guidance, 0, neg)
    refined = invert(model, pos, lat, sigmas, sampler, guidance, 16, neg)
    plain_error = error(replay(model, plain, pos, guidance, negative=neg), lat["samples"])
    refined_error = error(replay(model, refined, pos, guidance, negative=neg), lat["samples"])
    if sampler == "euler" or family in ("sd3", "flux"):
        assert refined_error < 1e-3
        assert refined_error < plain_error / 100
    else:
        assert refined_error < plain_error / 10


@pytest.mark.parametrize("family", ["sd3"])
def test_flow_inversion_reconstructs_over_the_whole_schedule(tiny, family):
    """From sigma 1 (pure noise). The random tiny Flux's steps near sigma 1 do not contract, so Flux is checked on
    half the schedule above and over the whole one on the Flux-class reference model (tests/quality)."""
    model, (pos, neg), lat = tiny(family), prompts(family), latent(family)
    inversion = invert(model, pos, lat, schedule(model, 10), iterations=16)
    assert error(replay(model, inversion, pos, negative=neg), lat["samples"]) < 1e-3
    assert inversion.pivots.shape == (11, *lat["samples"].shape)


def test_ddim_inversion_matches_diffusers_inverse_scheduler(tiny, host):
    """One step of our DDIM inversion against diffusers' DDIMInverseScheduler on SD1.5's discrete timesteps, with
    the same network noise prediction, in diffusers' (variance-preserving) latent space."""
    from diffusers import DDIMInverseScheduler
    model, (pos, neg), lat = tiny("sd15"), prompts("sd15"), latent("sd15", batch=1)
    sampling = host.model_sampling(model)
    sigmas = schedule(model, 10, scheduler="ddim_uniform")
    inversion = invert(model, pos, lat, sigmas)
    scheduler = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     set_alpha_to_one=False, clip_sample=False, steps_offset=1)
    scheduler.set_timesteps(10)
    timesteps = [int(round(float(sampling.timestep(s)))) for s in sigmas[:-1].flip(0)]

    def vp(x, sigma):
        return x / (1 + float(sigma) ** 2) ** 0.5
    # the step from the second-lowest to the third-lowest sigma: both ends are discrete timesteps
    low, high = sigmas[-2], sigmas[-3]
    x = inversion.pivots[-2]

    def eps_at(sample_vp, t_sigma):
        denoised = host.run_loop(model, pos, neg, 1.0, x.shape, sigmas,
                                 lambda loop: loop.denoise(sample_vp * (1 + float(t_sigma) ** 2) ** 0.5,
                                                           float(t_sigma)))
        return (sample_vp * (1 + float(t_sigma) ** 2) ** 0.5 - denoised) / float(t_sigma)
    t_high = int(round(float(sampling.timestep(high))))
    assert t_high in timesteps
    expected = scheduler.step(eps_at(vp(x, low), high), t_high, vp(x, low)).prev_sample
    torch.testing.assert_close(vp(inversion.pivots[-3], high), expected, rtol=1e-4, atol=1e-4)


def test_cfgpp_inversion_step_is_the_papers(tiny, host):
    """CFG++ inversion in the paper's VP form: x0 from the unconditional noise, renoised with the guided one."""
    model, (pos, neg), lat = tiny("sd15"), prompts("sd15"), latent("sd15", batch=1)
    sigmas, lam = schedule(model, 6, denoise=0.6), 0.6
    inversion = invert(model, pos, lat, sigmas, "cfg++", lam, 0, neg)
    low, high = float(sigmas[-2]), float(sigmas[-3])
    a_low, a_high = 1 / (1 + low ** 2), 1 / (1 + high ** 2)   # alpha-bar of each sigma
    z = inversion.pivots[-2] * a_low ** 0.5                   # the latent in the paper's space
    x = z / a_high ** 0.5                                     # ... as ComfyUI feeds it to the network at t_high
    _, cond, uncond = host.run_loop(model, pos, neg, lam, x.shape, sigmas,
                                    lambda loop: loop.denoise_parts(x, high, lam))
    eps_u, eps_c = (x - uncond) / high, (x - cond) / high   # the network's noise predictions at (z, t_high)
    eps_lam = eps_u + lam * (eps_c - eps_u)
    x0 = (z - (1 - a_low) ** 0.5 * eps_u) / a_low ** 0.5
    expected = a_high ** 0.5 * x0 + (1 - a_high) ** 0.5 * eps_lam
    torch.testing.assert_close(inversion.pivots[-3] * a_high ** 0.5, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the unconditional branch

def test_negative_prompt_inversion_is_sampling_with_the_source_prompt_as_negative(tiny, family):
    model, (pos, neg), lat = tiny(family), prompts(family), latent(family)
    inversion = invert(model, pos, lat, schedule(model, 4))
    edit = tiny_models.conditioning(family, seed=3)
    npi = replay(model, inversion, edit, 5.0, NPI)
    torch.testing.assert_close(npi, replay(model, inversion, edit, 5.0, NEGATIVE, pos), rtol=0, atol=0)
    assert not torch.equal(npi, replay(model, inversion, edit, 5.0, NEGATIVE, neg))


def test_proximal_guidance_neutral_settings_equal_negative_prompt_inversion(tiny, family):
    model, (pos, _), lat = tiny(family), prompts(family), latent(family)
    inversion = invert(model, pos, lat, schedule(model, 4))
    edit = tiny_models.conditioning(family, seed=3)
    npi = replay(model, inversion, edit, 5.0, NPI)
    neutral = replay(model, inversion, edit, 5.0, PROXIMAL, proximal_quantile=0.0, proximal_recon_lr=0.0)
    torch.testing.assert_close(neutral, npi, rtol=0, atol=0)
    assert not torch.equal(replay(model, inversion, edit, 5.0, PROXIMAL), npi)


def test_proximal_guidance_keeps_the_unedited_region(tiny):
    """ProxEdit: late steps pull the latent back to the inversion outside the edited region, so with the
    source prompt the reconstruction is the encoded latent."""
    model, (pos, _), lat = tiny("sd15"), prompts("sd15"), latent("sd15")
    inversion = invert(model, pos, lat, schedule(model, 6))
    torch.testing.assert_close(replay(model, inversion, pos, 7.5, PROXIMAL), lat["samples"], rtol=0, atol=1e-5)


def test_null_text_inversion_beats_plain_inversion_at_guidance_7_5(tiny):
    model, (pos, neg), lat = tiny("sd15"), prompts("sd15"), latent("sd15")
    sigmas = schedule(model, 6, denoise=0.5)
    inversion = invert(model, pos, lat, sigmas, iterations=8)
    counter = ModelCallCounter(model)
    nti = engine_node("TrainFreeNullTextInversion", model=model, inversion=inversion, negative=neg, cfg=7.5,
                   inner_steps=10, learning_rate=0.01, early_stop=True)[0]
    assert 6 * 2 <= counter.calls <= 6 * (10 + 2)   # cond once, <= 10 inner uncond passes, one advance per step
    assert nti.null_embeddings.shape[:2] == (6, 2)
    plain = error(replay(model, inversion, pos, 7.5, NEGATIVE, neg), lat["samples"])
    null_text = error(replay(model, nti, pos, 7.5, NULL_TEXT), lat["samples"])
    assert null_text < plain * 0.8


def test_null_text_inversion_refuses_a_model_it_cannot_differentiate_or_runs(tiny, host):
    """Flux's attention in these ComfyUIs has no gradient (a fused rope kernel, a weight outside ComfyUI's
    layers): a clear refusal naming the alternatives."""
    model, (pos, neg), lat = tiny("flux"), prompts("flux"), latent("flux", batch=1)
    inversion = invert(model, pos, lat, schedule(model, 3, scheduler="simple"))
    with pytest.raises(host.UnsupportedModel, match="negative-prompt inversion.*FlowOpt"):
        engine_node("TrainFreeNullTextInversion", model=model, inversion=inversion, negative=neg, cfg=5.0,
                 inner_steps=2, learning_rate=0.01, early_stop=True)


# ---------------------------------------------------------------- composition, files, errors

def test_patches_act_during_sampling_from_an_inversion(tiny):
    model, (pos, neg), lat = tiny("sd15"), prompts("sd15"), latent("sd15")
    inversion = invert(model, pos, lat, schedule(model, 4))
    base = replay(model, inversion, pos, 5.0, NEGATIVE, neg)
    pag = run_node("TrainFreePAG", model=model, scale=0.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]
    torch.testing.assert_close(replay(pag, inversion, pos, 5.0, NEGATIVE, neg), base, rtol=0, atol=0)
    pag = run_node("TrainFreePAG", model=model, scale=3.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]
    assert not torch.allclose(replay(pag, inversion, pos, 5.0, NEGATIVE, neg), base)


def test_inversions_save_and_load_through_comfyui_folders(tiny, tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    model, (pos, neg), lat = tiny("sd15"), prompts("sd15"), latent("sd15")
    inversion = invert(model, pos, lat, schedule(model, 3))
    nti = engine_node("TrainFreeNullTextInversion", model=model, inversion=inversion, negative=neg, cfg=7.5,
                   inner_steps=2, learning_rate=0.01, early_stop=True)[0]
    saved = engine_node("TrainFreeSaveInversion", inversion=nti, filename_prefix="digit")
    assert saved["ui"]["text"] == ["inversions/digit_00001.safetensors"]
    assert (tmp_path / "output" / "inversions" / "digit_00001.safetensors").is_file()
    loaded = engine_node("TrainFreeLoadInversion", inversion_file="digit_00001.safetensors")[0]
    for name in ("pivots", "sigmas", "null_embeddings"):
        torch.testing.assert_close(getattr(loaded, name), getattr(nti, name), rtol=0, atol=0)
    assert (loaded.sampler, loaded.guidance, loaded.model) == (nti.sampler, nti.guidance, nti.model)
    torch.testing.assert_close(replay(model, loaded, pos, 7.5, NULL_TEXT), replay(model, nti, pos, 7.5, NULL_TEXT),
                               rtol=0, atol=0)
    for bad in ("../digit_00001.safetensors", "other.safetensors"):
        with pytest.raises(FileNotFoundError, match="output/inversions"):
            engine_node("TrainFreeLoadInversion", inversion_file=bad)
    with pytest.raises(ValueError, match="plain name"):
        engine_node("TrainFreeSaveInversion", inversion=nti, filename_prefix="../escape")


def test_mismatches_get_clear_errors(tiny):
    model, (pos, neg), lat = tiny("sd15"), prompts("sd15"), latent("sd15")
    inversion = invert(model, pos, lat, schedule(model, 3))
    flux_pos, _ = prompts("flux")
    with pytest.raises(ValueError, match="another kind of model"):
        replay(tiny("flux"), inversion, flux_pos, 1.0, NEGATIVE, neg)
    with pytest.raises(ValueError, match="another checkpoint"):
        replay(tiny_models.make_model("sd15", seed=5), inversion, pos, 1.0, NEGATIVE, neg)
    with pytest.raises(ValueError, match="no null-text embeddings"):
        replay(model, inversion, pos, 7.5, NULL_TEXT)
    with pytest.raises(ValueError, match="channels"):
        invert(model, pos, latent("sd3"), schedule(model, 3))
    with pytest.raises(ValueError, match="must decrease"):
        invert(model, pos, lat, schedule(model, 3).flip(0))
    with pytest.raises(ValueError, match="connect a negative prompt"):
        invert(model, pos, lat, schedule(model, 3), "cfg++", 0.6)
    cfgpp = invert(model, pos, lat, schedule(model, 3), "cfg++", 0.6, 0, neg)
    with pytest.raises(ValueError, match="same lambda"):
        replay(model, cfgpp, pos, 1.0, NEGATIVE, neg)
    with pytest.raises(ValueError, match="guidance 1"):
        engine_node("TrainFreeNullTextInversion", model=model, inversion=cfgpp, negative=neg, cfg=7.5, inner_steps=2,
                 learning_rate=0.01, early_stop=True)
    with pytest.raises(ValueError, match="disconnect 'negative'"):
        replay(model, inversion, pos, 7.5, NPI, neg)
    with pytest.raises(ValueError, match="needs a negative prompt"):
        replay(model, inversion, pos, 7.5, NEGATIVE)


def test_progress_and_interrupt(tiny):
    import comfy.model_management
    import comfy.utils
    model, (pos, neg), lat = tiny("sd15"), prompts("sd15"), latent("sd15")
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: seen.append((value, total)))
    try:
        inversion = invert(model, pos, lat, schedule(model, 5))
        assert seen[-1] == (5, 5)
        wrappers = {k: dict(v) for k, v in model.wrappers.items()}
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            replay(model, inversion, pos, 5.0, NEGATIVE, neg)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert {k: dict(v) for k, v in model.wrappers.items()} == wrappers
    torch.testing.assert_close(replay(model, inversion, pos, 1.0, NEGATIVE, neg),
                               replay(model, inversion, pos, 1.0, NEGATIVE, neg), rtol=0, atol=0)


def test_null_text_inversion_with_inference_weights_and_an_attached_model_sharing_them(pack):
    """As ComfyUI loads a checkpoint (inside inference mode), with a patch that attaches a model sharing these
    weights (noise-damped CFG whose weak model is the same checkpoint): the attached model must not be loaded
    over the gradient-ready clone."""
    with torch.inference_mode():
        model = tiny_models.make_model("sd15", seed=7)
    (pos, neg), lat = prompts("sd15"), latent("sd15", batch=1)
    patched = engine_node("TrainFreeNoiseDampedCFG", model=model, weak_model=model, damped_percent=0.5)[0]
    inversion = invert(patched, pos, lat, schedule(model, 3))
    nti = engine_node("TrainFreeNullTextInversion", model=patched, inversion=inversion, negative=neg, cfg=7.5,
                      inner_steps=2, learning_rate=0.01, early_stop=True)[0]
    assert nti.null_embeddings.shape[:2] == (3, 1)
