"""FreCaS on the real ComfyUI with the tiny models of every family: one stage is ordinary sampling, the stages run
at their sizes, the transition keeps the clean estimate and noises it by the forward process, FA-CFG and the
cross-attention fusion act only after the first stage, patches act inside the cascade, progress covers every step,
an interrupt stops it, and bad settings get clear errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import run_node
from harness import tiny_models

TRANSITION = {"vae": "vae (decode, upsample, encode)", "latent": "latent (bilinear)"}
UNETS = ("sd15", "sdxl")
DITS = ("sd3", "flux")


def frecas(model, family, steps="4, 2", ends="200, 0", width=128, base=64, batch=1, fa=True, high=20.0, ca=None,
           transition="latent", vae=None, sampler="euler", gamma=1.5):
    import comfy.samplers
    ca = (0.6 if family in UNETS else 0.0) if ca is None else ca
    return run_node("TrainFreeFreCaS", model=model, sampler=comfy.samplers.sampler_object(sampler), width=width,
                    height=width, batch_size=batch, base_width=base, base_height=base, stage_steps=steps,
                    stage_end_timesteps=ends, gamma=gamma, fa_cfg=fa, fa_cfg_high=high, ca_fusion=ca,
                    transition=TRANSITION[transition], vae=vae)


def guided(model, family, sampler, sigmas, latent, cfg=3.0, seed=0, callback=None):
    import comfy.sample
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tiny_models.conditioning(family, batch=latent.shape[0], seed=1),
                     tiny_models.conditioning(family, batch=latent.shape[0], seed=2))
    guider.set_cfg(cfg)
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider.sample(noise, latent, sampler, sigmas, seed=seed, callback=callback, disable_pbar=True)


class ShapeCounter:
    """APPLY_MODEL wrapper: the latent sizes the model is evaluated at, in order."""

    def __init__(self, model):
        import comfy.patcher_extension as pe
        self.sizes = []
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_shapes", self)

    def __call__(self, executor, x, *args, **kwargs):
        self.sizes.append(tuple(x.shape[-2:]))
        return executor(x, *args, **kwargs)


@pytest.mark.parametrize("family", UNETS + DITS)
def test_one_stage_is_ordinary_sampling(tiny, family):
    import comfy.samplers
    model = tiny(family)
    sampler, sigmas, latent = frecas(model, family, steps="5", ends="0", width=128, base=128)
    # the paper's stage timesteps, int(linspace(999, 0, 5)), on the model's own schedule
    sampling = model.get_model_object("model_sampling")
    if family in UNETS:
        expected = [float(sampling.sigmas[t]) for t in (999, 749, 499, 249, 0)] + [0.0]
        assert torch.allclose(sigmas, torch.tensor(expected))
    assert sigmas[-1] == 0 and len(sigmas) == 6
    ours = guided(model, family, sampler, sigmas, latent["samples"])
    plain = guided(model, family, comfy.samplers.sampler_object("euler"), sigmas, latent["samples"])
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("family", UNETS + DITS)
def test_stages_run_at_their_sizes(tiny, family):
    model = tiny(family).clone()
    shapes = ShapeCounter(model)
    sampler, sigmas, latent = frecas(model, family, steps="3, 2", width=128, base=64, batch=2)
    out = guided(model, family, sampler, sigmas, latent["samples"])
    assert out.shape == (2, tiny_models.LATENT_CHANNELS[family], 16, 16) and torch.isfinite(out).all()
    assert shapes.sizes == [(8, 8)] * 3 + [(16, 16)] * 2
    assert sampler.trainfree_report["stages"] == ["64x64 px, 3 steps", "128x128 px, 2 steps"]
    assert sampler.trainfree_report["pixel_weighted_cost"] == pytest.approx((3 / 4 + 2) / 5)


def test_three_stages(tiny):
    model = tiny("sd15").clone()
    shapes = ShapeCounter(model)
    sampler, sigmas, latent = frecas(model, "sd15", steps="2, 2, 2", ends="400, 200, 0", width=256, base=64)
    assert guided(model, "sd15", sampler, sigmas, latent["samples"]).shape[-2:] == (32, 32)
    assert shapes.sizes == [(8, 8)] * 2 + [(16, 16)] * 2 + [(32, 32)] * 2


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_transition_keeps_the_clean_estimate_and_noises_it_forward(tiny, family):
    model = tiny(family)
    sampler, sigmas, latent = frecas(model, family, steps="3, 2", width=256, base=128, batch=2, fa=False, ca=0.0)
    seen = {}
    guided(model, family, sampler, sigmas, latent["samples"],
           callback=lambda i, denoised, x, total: seen.setdefault(i, (denoised.clone(), x.clone())))
    x0 = seen[2][0]  # the estimate at stage 0's last step, where its step to sigma 0 lands
    clean, x = seen[3]  # the transition
    # kept up to the float32 rounding of the Euler step x + (x - x0) / s * (0 - s)
    assert torch.allclose(clean, F.interpolate(x0, size=(32, 32), mode="bilinear"), rtol=1e-5, atol=1e-4)
    start = float(sigmas[4])
    keep = 1.0 - start if family in DITS else 1.0  # q(x_t | x0): x0 + s eps (SD), (1 - s) x0 + s eps (flow)
    eps = (x - keep * clean) / start
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05


def test_vae_transition_goes_through_pixels(tiny):
    model = tiny("sd15")
    vae = tiny_models.make_vae(4)
    sampler, sigmas, latent = frecas(model, "sd15", steps="3, 2", width=128, base=64, transition="vae", vae=vae)
    seen = {}
    guided(model, "sd15", sampler, sigmas, latent["samples"],
           callback=lambda i, denoised, x, total: seen.setdefault(i, denoised.clone()))
    pixels = vae.decode(model.model.process_latent_out(seen[2]))
    up = F.interpolate(pixels.movedim(-1, 1), scale_factor=2, mode="nearest").movedim(1, -1)
    assert torch.allclose(seen[3], model.model.process_latent_in(vae.encode(up)), atol=1e-5)


@pytest.mark.parametrize("family", ("sd15", "sd3"))
def test_fa_cfg_acts_after_the_first_stage_only(tiny, family):
    model = tiny(family)
    latent = None
    results = {}
    for fa in (False, True):
        sampler, sigmas, latent = frecas(model, family, steps="3, 2", fa=fa, ca=0.0)
        seen = {}
        results[fa] = guided(model, family, sampler, sigmas, latent["samples"],
                             callback=lambda i, denoised, x, total, seen=seen: seen.setdefault(i, x.clone()))
        results[fa, "stage0"] = seen[2]
        assert sampler.trainfree_report["fa_cfg_evaluations"] == (2 if fa else 0)
    assert torch.equal(results[False, "stage0"], results[True, "stage0"])
    assert not torch.allclose(results[False], results[True])


def test_fa_cfg_needs_an_unconditional_pass(tiny):
    sampler, sigmas, latent = frecas(tiny("sd15"), "sd15", ca=0.0)
    with pytest.raises(ValueError, match="cfg above 1"):
        guided(tiny("sd15"), "sd15", sampler, sigmas, latent["samples"], cfg=1.0)


@pytest.mark.parametrize("family", UNETS)
def test_attention_fusion_records_at_stage_ends_and_fuses_later(tiny, host, family):
    model = tiny(family)
    sites = sum(host.attention_layers(model).values())
    outs = {}
    for ca in (0.0, 0.6):
        sampler, sigmas, latent = frecas(model, family, steps="3, 2", fa=False, ca=ca)
        outs[ca] = guided(model, family, sampler, sigmas, latent["samples"])
    assert sampler.trainfree_report["fused_attention_calls"] == sites * 2  # every site, both stage-1 evaluations
    assert not torch.allclose(outs[0.0], outs[0.6])


def test_patches_act_inside_the_cascade(tiny):
    model = tiny("sd15")
    sampler, sigmas, latent = frecas(model, "sd15", steps="3, 2", batch=2)
    plain = guided(model, "sd15", sampler, sigmas, latent["samples"])
    clip = tiny_models.make_clip()
    judge = run_node("TrainFreePromptJudge", clip=clip, prompts="a cat\na dog", timesteps=2, seed=0)[0]
    patched = {
        "pag": run_node("TrainFreePAG", model=model, scale=3.0, layers="auto", start_percent=0.0, end_percent=1.0)[0],
        "apg": run_node("TrainFreeAPG", model=model, eta=0.0, norm_threshold=15.0, momentum=-0.5)[0],
        "interval": run_node("TrainFreeGuidanceInterval", model=model, sigma_low=0.5, sigma_high=5.0)[0],
        # one-time negative: an anchor per stage size; self-negative: the source latent resized to each stage
        "residual one-time": run_node("TrainFreeResidualCFG", model=model, mode="one-time negative", delta=1.0)[0],
        "residual self": run_node("TrainFreeResidualCFG", model=model, mode="self-negative", delta=1.0)[0],
        "two-model": run_node("TrainFreeTwoModelGuidance", model=model,
                              guide_model=tiny_models.make_model("sd15", seed=1), mode="autoguidance")[0],
        "nasa": run_node("TrainFreeNASA", model=model, negative=tiny_models.conditioning("sd15", seed=3), alpha=0.5,
                         start_percent=0.0, end_percent=1.0)[0],
        # their judges' and reference prompts' passes run beside the cascade's rows and stay out of the fusion
        "gfcg": run_node("TrainFreeGFCG", model=model, clip=clip, class_prompts="a cat\na dog", target_class="1",
                         scale=2.0, start_percent=0.0, end_percent=1.0)[0],
        "dynamic cfg": run_node("TrainFreeDynamicCFG", model=model, candidate_scales="1, 3, 5", judge=judge,
                                target="1", weight=1.0, start_percent=0.0, end_percent=1.0)[0]}
    for name, m in patched.items():
        out = guided(m, "sd15", sampler, sigmas, latent["samples"])
        assert torch.isfinite(out).all() and not torch.allclose(out, plain), name


def test_pag_acts_inside_a_flux_cascade(tiny):
    model = tiny("flux")
    sampler, sigmas, latent = frecas(model, "flux", steps="3, 2")
    pag = run_node("TrainFreePAG", model=model, scale=3.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]
    assert not torch.allclose(guided(pag, "flux", sampler, sigmas, latent["samples"]),
                              guided(model, "flux", sampler, sigmas, latent["samples"]))


def test_progress_covers_every_step_and_interrupt_stops_between_stages(tiny):
    import comfy.model_management
    model = tiny("sd15")
    sampler, sigmas, latent = frecas(model, "sd15", steps="3, 2")
    steps = []
    guided(model, "sd15", sampler, sigmas, latent["samples"], callback=lambda i, d, x, total: steps.append((i, total)))
    assert steps == [(i, len(sigmas) - 1) for i in range(len(sigmas) - 1)]

    def interrupt(i, denoised, x, total):
        if i == 2:
            comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            guided(model, "sd15", sampler, sigmas, latent["samples"], callback=interrupt)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_bad_settings_are_refused(tiny):
    import comfy.samplers
    sd15, flux = tiny("sd15"), tiny("flux")
    with pytest.raises(ValueError, match="use a valid height nearby: 144 px or 256 px"):
        frecas(sd15, "sd15", steps="2, 2, 2", ends="400, 200, 0", width=200, base=64)
    with pytest.raises(ValueError, match="ca_fusion to 0"):
        frecas(flux, "flux", ca=0.6)
    with pytest.raises(ValueError, match="gamma"):
        frecas(flux, "flux", gamma=2.0)
    with pytest.raises(ValueError, match="needs the model's VAE"):
        frecas(sd15, "sd15", transition="vae")
    with pytest.raises(ValueError, match="multiple of 8"):
        frecas(sd15, "sd15", width=130)
    with pytest.raises(ValueError, match="not above its end"):
        frecas(sd15, "sd15", ends="100, 150, 0", steps="2, 2, 2", width=256, gamma=0.0)
    sampler, sigmas, latent = frecas(sd15, "sd15")
    plain = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "normal", 6)
    with pytest.raises(ValueError, match="SIGMAS output"):
        guided(sd15, "sd15", sampler, plain, latent["samples"])
    with pytest.raises(ValueError, match="LATENT output"):
        guided(sd15, "sd15", sampler, sigmas, torch.zeros(1, 4, 24, 24))
    with pytest.raises(ValueError, match="KSamplerSelect"):
        run_node("TrainFreeFreCaS", model=sd15, sampler=object(), width=128, height=128, batch_size=1,
                 base_width=64, base_height=64, stage_steps="3, 2", stage_end_timesteps="200, 0", gamma=1.5,
                 fa_cfg=True, fa_cfg_high=20.0, ca_fusion=0.0, transition=TRANSITION["latent"])
