"""CycleDiffusion on the real ComfyUI with tiny models of the four families: the DPM-Encoder's latent replayed
through SamplerCustomAdvanced retraces the encoding with the source prompt, equals ComfyUI's own ancestral sampler
(eps and rectified-flow branches) and ddpm fed the stored noises, translates with another prompt; refusals of
deterministic and unsupported samplers, mismatched schedules, shapes and models; files; progress and interrupt."""
import pytest
import torch

from conftest import FAMILIES, EveryEvaluation, run_node
from harness import tiny_models

STEPS = 4


def engine_node(class_type, **inputs):
    """A node run as ComfyUI's engine runs it: inside inference mode."""
    with torch.inference_mode():
        out = run_node(class_type, **inputs)
    return out["result"] if isinstance(out, dict) and "result" in out else out


def prompts(family):
    return tiny_models.conditioning(family, seed=1), tiny_models.conditioning(family, seed=2)


def latent(family, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, tiny_models.LATENT_CHANNELS[family], size, size, generator=g)}


def schedule(model, steps=STEPS, denoise=1.0):
    return engine_node("BasicScheduler", model=model, scheduler="normal", steps=steps, denoise=denoise)[0]


def comfy_sampler(name, **options):
    if options:
        return engine_node("SamplerEulerAncestral", **options)[0]
    return engine_node("KSamplerSelect", sampler_name=name)[0]


# (sampler name, SamplerEulerAncestral options, cfg, denoise): plain, with eta / s_noise and guidance, ddpm partial
VARIANTS = {"euler_ancestral": ("euler_ancestral", {}, 1.0, 1.0),
            "euler_ancestral_eta": ("euler_ancestral", {"eta": 0.7, "s_noise": 1.1}, 3.0, 0.7),
            "ddpm": ("ddpm", {}, 3.0, 0.6)}


def encode(model, family, sampler, sigmas, cfg=1.0, lat=None, positive=None, seed=0):
    pos, neg = prompts(family)
    return engine_node("TrainFreeDPMEncoder", model=model, positive=positive or pos, cfg=cfg,
                       latent=lat or latent(family), sampler=sampler, sigmas=sigmas, seed=seed,
                       negative=neg if cfg != 1.0 else None)[0]


def sample_advanced(model, family, sampler, sigmas, cfg=1.0, positive=None, lat=None):
    """SamplerCustomAdvanced with a CFGGuider, as a workflow runs it; returns the output latent."""
    pos, neg = prompts(family)
    guider = engine_node("CFGGuider", model=model, positive=positive or pos, negative=neg, cfg=cfg)[0]
    noise = engine_node("RandomNoise", noise_seed=123)[0]
    return engine_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                       latent_image=lat or latent(family))[0]["samples"]


def replay(model, family, dpm, sigmas, cfg=1.0, positive=None, lat=None):
    sampler = engine_node("TrainFreeCycleDiffusionSampler", dpm_latent=dpm)[0]
    return sample_advanced(model, family, sampler, sigmas, cfg, positive, lat)


@pytest.fixture(scope="module")
def encoded(tiny):
    """``(model with an evaluation recorder, sigmas, dpm latent, the encoder's evaluations)`` per family and
    variant, made once."""
    cache = {}

    def get(family, variant):
        if (family, variant) not in cache:
            name, options, cfg, denoise = VARIANTS[variant]
            model = tiny(family).clone()
            recorder = EveryEvaluation(model, keys=("input", "denoised"))
            sigmas = schedule(model, STEPS, denoise)
            dpm = encode(model, family, comfy_sampler(name, **options), sigmas, cfg)
            cache[family, variant] = model, recorder, sigmas, dpm, list(recorder.args)
            recorder.args.clear()
        return cache[family, variant]
    return get


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


# ---------------------------------------------------------------- reconstruction and the reference sampler

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_replay_with_the_source_prompt_retraces_the_encoding(encoded, family, variant):
    """Every x the replay evaluates is the encoder's x at that step, and the output is the model's one-step
    denoise of the last noisy x (schedule to 0) or the encoded x at the last sigma (partial schedule)."""
    model, recorder, sigmas, dpm, encoding = encoded(family, variant)
    cfg = VARIANTS[variant][2]
    out = replay(model, family, dpm, sigmas, cfg)
    replaying = list(recorder.args)
    recorder.args.clear()
    assert len(replaying) == len(encoding) == STEPS
    for seen, made in zip(replaying, encoding):
        close(seen["input"], made["input"])
        close(seen["denoised"], made["denoised"])
    last = replaying[-1]["denoised"] if float(sigmas[-1]) == 0 else None
    if last is not None:  # ddpm's last step is the denoise only algebraically (float32 cancellation at low sigma)
        close(out, model.model.process_latent_out(last), tol=1e-4 if variant != "ddpm" else 1e-3)
    else:
        assert dpm.noises.abs().sum(dim=tuple(range(1, dpm.noises.ndim))).min() > 0  # every step carries noise
    assert dpm.start.shape == latent(family)["samples"].shape and dpm.noises.shape[0] == STEPS


def comfy_reference(dpm, name, options):
    """ComfyUI's own sampler function (sample_euler_ancestral, which takes its rectified-flow branch on flow
    models, or sample_ddpm) started at the stored x and fed the stored noises by its noise_sampler."""
    import comfy.k_diffusion.sampling
    import comfy.samplers
    function = getattr(comfy.k_diffusion.sampling, f"sample_{name}")

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        def noise_sampler(sigma, sigma_next):
            i = int((sigmas == sigma).nonzero()[0])
            return dpm.noises[i].to(x)
        return function(model, dpm.start.to(x), sigmas, extra_args=extra_args, callback=callback, disable=disable,
                        noise_sampler=noise_sampler, **options)
    return comfy.samplers.KSAMPLER(sample)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_replay_equals_comfyuis_own_sampler_fed_the_stored_noises(encoded, family, variant):
    model, recorder, sigmas, dpm, _ = encoded(family, variant)
    name, options, cfg, _ = VARIANTS[variant]
    target = tiny_models.conditioning(family, seed=9)  # a translation, not only the reconstruction
    ours = replay(model, family, dpm, sigmas, cfg, positive=target)
    reference = sample_advanced(model, family, comfy_reference(dpm, name, options), sigmas, cfg, positive=target)
    recorder.args.clear()
    close(ours, reference, tol=1e-5)


def test_the_flow_branch_is_comfyuis_rectified_flow_step(encoded):
    """On flow models ComfyUI's euler_ancestral runs sample_euler_ancestral_RF: fed the same noises, it and the
    eps-form step disagree, and the replay agrees with the former."""
    import comfy.k_diffusion.sampling as k
    import comfy.samplers
    model, recorder, sigmas, dpm, _ = encoded("flux", "euler_ancestral_eta")
    options = VARIANTS["euler_ancestral_eta"][1]
    ours = replay(model, "flux", dpm, sigmas, 3.0)
    rf = sample_advanced(model, "flux", comfy_reference(dpm, "euler_ancestral_RF", options), sigmas, 3.0)
    close(ours, rf, tol=1e-5)

    def eps_form(model_k, x, sigmas_, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        x = dpm.start.to(x)
        for i in range(len(sigmas_) - 1):
            denoised = model_k(x, sigmas_[i] * s_in, **extra_args)
            down, up = k.get_ancestral_step(sigmas_[i], sigmas_[i + 1], eta=options["eta"])
            x = denoised if down == 0 else x + (x - denoised) / sigmas_[i] * (down - sigmas_[i]) + \
                dpm.noises[i].to(x) * options["s_noise"] * up
        return x
    other = sample_advanced(model, "flux", comfy.samplers.KSAMPLER(eps_form), sigmas, 3.0)
    recorder.args.clear()
    assert (other - ours).abs().max() > 1e-2 * ours.abs().max()


def test_the_sampler_node_gives_the_encoded_sigmas_and_an_empty_latent_of_the_encoded_shape(encoded):
    model, recorder, sigmas, dpm, _ = encoded("sd3", "ddpm")
    sampler, given_sigmas, empty = engine_node("TrainFreeCycleDiffusionSampler", dpm_latent=dpm)
    assert torch.equal(given_sigmas, sigmas.float()) and empty["samples"].shape == dpm.start.shape
    assert torch.equal(sample_advanced(model, "sd3", sampler, given_sigmas, 3.0, lat=empty),
                       replay(model, "sd3", dpm, sigmas, 3.0))
    recorder.args.clear()


def test_a_target_prompt_translates(encoded):
    model, recorder, sigmas, dpm, encoding = encoded("sd15", "euler_ancestral")
    source = replay(model, "sd15", dpm, sigmas)
    recorder.args.clear()
    translated = replay(model, "sd15", dpm, sigmas, positive=tiny_models.conditioning("sd15", seed=9))
    starts = [a["input"] for a in recorder.args]
    recorder.args.clear()
    close(starts[0], encoding[0]["input"])  # the same start
    assert (translated - source).abs().max() > 0.05 * source.abs().max()


def test_the_encoder_draws_a_new_latent_per_seed_and_the_same_for_the_same_seed(tiny):
    model = tiny("sd15")
    sigmas = schedule(model)
    sampler = comfy_sampler("euler_ancestral")
    a, b = (encode(model, "sd15", sampler, sigmas, seed=s) for s in (0, 0))
    c = encode(model, "sd15", sampler, sigmas, seed=1)
    assert torch.equal(a.start, b.start) and torch.equal(a.noises, b.noises)
    assert not torch.allclose(a.start, c.start)
    assert a.report["reconstruction_error"] >= 0


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m", "heun", "uni_pc", "dpm_fast"])
def test_deterministic_samplers_are_refused(tiny, name):
    model = tiny("sd15")
    with pytest.raises(ValueError, match=f"'{name if name != 'ddim' else 'euler'}'.*deterministic sampler has no "
                                         f"per-step noise.*euler_ancestral"):
        encode(model, "sd15", comfy_sampler(name), schedule(model))


def test_eta_zero_and_unsupported_stochastic_samplers_are_refused(tiny):
    model = tiny("sd15")
    with pytest.raises(ValueError, match="eta 0.0.*deterministic"):
        encode(model, "sd15", comfy_sampler("euler_ancestral", eta=0.0, s_noise=1.0), schedule(model))
    for name in ("dpmpp_2m_sde", "dpm_2_ancestral", "lcm"):
        with pytest.raises(ValueError, match=f"'{name}' is not supported.*euler_ancestral, ddpm"):
            encode(model, "sd15", comfy_sampler(name), schedule(model))
    pack_sampler = engine_node("TrainFreeCFGPPSampler", solver="ddim (= euler)", eta=1.0)[0]
    with pytest.raises(ValueError, match="not one of ComfyUI's own.*euler_ancestral, ddpm"):
        encode(model, "sd15", pack_sampler, schedule(model))


def test_mismatches_get_clear_errors(encoded, tiny):
    model, recorder, sigmas, dpm, _ = encoded("sd15", "euler_ancestral")
    with pytest.raises(ValueError, match="sigmas differ.*same scheduler settings"):
        replay(model, "sd15", dpm, schedule(model, STEPS + 1))
    with pytest.raises(ValueError, match="sigmas differ"):
        replay(model, "sd15", dpm, schedule(model, STEPS, 0.5))
    with pytest.raises(ValueError, match=r"latent image is \[1, 4, 16, 16\].*\[2, 4, 16, 16\]"):
        replay(model, "sd15", dpm, sigmas, lat=latent("sd15", batch=1))
    with pytest.raises(ValueError, match="latent image is"):
        replay(model, "sd15", dpm, sigmas, lat=latent("sd15", size=24))
    with pytest.raises(ValueError, match="another checkpoint"):
        replay(tiny_models.make_model("sd15", seed=5), "sd15", dpm, sigmas)
    flux = tiny("flux")
    with pytest.raises(ValueError, match="another kind of model"):
        replay(flux, "flux", dpm, schedule(flux), lat=latent("flux"))
    with pytest.raises(ValueError, match="channels"):
        encode(model, "sd15", comfy_sampler("euler_ancestral"), sigmas, lat=latent("sd3"))
    with pytest.raises(ValueError, match="connect a negative prompt"):
        pos, _ = prompts("sd15")
        engine_node("TrainFreeDPMEncoder", model=model, positive=pos, cfg=3.0, latent=latent("sd15"),
                    sampler=comfy_sampler("euler_ancestral"), sigmas=sigmas, seed=0)
    with pytest.raises(ValueError, match="must decrease"):
        encode(model, "sd15", comfy_sampler("euler_ancestral"), sigmas.flip(0))
    recorder.args.clear()


# ---------------------------------------------------------------- files, progress, interrupt, half precision

def test_dpm_latents_save_and_load_through_comfyui_folders(encoded, folders):
    model, recorder, sigmas, dpm, _ = encoded("sdxl", "euler_ancestral_eta")
    saved = engine_node("TrainFreeSaveDPMLatent", dpm_latent=dpm, filename_prefix="digit")
    assert saved["ui"]["text"] == ["dpm_latents/digit_00001.safetensors"]
    assert (folders / "output" / "dpm_latents" / "digit_00001.safetensors").is_file()
    loaded = engine_node("TrainFreeLoadDPMLatent", dpm_latent_file="digit_00001.safetensors")[0]
    for name in ("start", "noises", "sigmas"):
        assert torch.equal(getattr(loaded, name), getattr(dpm, name))
    for name in ("sampler", "eta", "s_noise", "flow", "model", "report"):
        assert getattr(loaded, name) == getattr(dpm, name)
    assert torch.equal(replay(model, "sdxl", loaded, sigmas, 3.0), replay(model, "sdxl", dpm, sigmas, 3.0))
    recorder.args.clear()
    for bad in ("../digit_00001.safetensors", "other.safetensors"):
        with pytest.raises(FileNotFoundError, match="output/dpm_latents"):
            engine_node("TrainFreeLoadDPMLatent", dpm_latent_file=bad)
    with pytest.raises(ValueError, match="plain name"):
        engine_node("TrainFreeSaveDPMLatent", dpm_latent=dpm, filename_prefix="../escape")


def test_progress_and_interrupt(tiny):
    import comfy.model_management
    import comfy.utils
    model = tiny("sd15")
    sigmas = schedule(model, 5)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: seen.append((value, total)))
    try:
        dpm = encode(model, "sd15", comfy_sampler("euler_ancestral"), sigmas)
        assert seen[-1] == (5, 5)
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            replay(model, "sd15", dpm, sigmas)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


@pytest.mark.parametrize("family,dtype", [("sd15", torch.float16), ("flux", torch.bfloat16)])
def test_half_precision_models(family, dtype):
    """As GPUs run them: the encoding and its replay stay finite and the replay retraces the encoding to the
    model's rounding (an x that differs in its last float32 bits can round to another half-precision input, and
    the prediction error is multiplied by sigma up to 14.6: 2 % of the range)."""
    model = tiny_models.make_model(family, dtype=dtype)
    recorder = EveryEvaluation(model, keys=("input",))
    sigmas = schedule(model, 3)
    dpm = encode(model, family, comfy_sampler("euler_ancestral"), sigmas)
    encoding = list(recorder.args)
    recorder.args.clear()
    out = replay(model, family, dpm, sigmas)
    assert torch.isfinite(out).all() and torch.isfinite(dpm.noises).all()
    for seen, made in zip(recorder.args, encoding):
        close(seen["input"], made["input"], tol=2e-2)
