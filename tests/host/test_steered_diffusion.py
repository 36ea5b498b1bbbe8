"""Steered Diffusion's sampler on the real ComfyUI and tiny models of the four families: at strength 0 it is
ComfyUI's own Euler sampler bit for bit; one steered step moves the clean estimate as an independent float64
statement of the paper's linear-problem step says (the VAE's own Jacobian by autograd, the line search exact);
steering lowers the measurement residual of the result against ordinary sampling; refusals; determinism; the
run's report."""
import copy

import pytest
import torch

from conftest import FirstEvaluation, run_node
from harness import tiny_models
from guidance_ops import degradations as dg

SIZE = 16  # latent cells; 128 pixels
VAES = {}


def vae_for(family):
    channels = tiny_models.LATENT_CHANNELS[family]
    if channels not in VAES:
        VAES[channels] = tiny_models.make_vae(channels)
    return VAES[channels]


def measurement(kind="inpainting", seed=0, size=SIZE * 8, batch=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, size, size, 3, generator=g)
    mask = torch.zeros(size, size)
    mask[:, size // 2:] = 1.0
    observed = run_node("TrainFreeDegrade", image=clean, degradation=kind, factor=4, noise_level=0.0, seed=0,
                        mask=mask if kind == "inpainting" else None)[0]
    return run_node("TrainFreeMeasurement", image=observed, degradation=kind, factor=4, noise_level=0.0,
                    mask=mask if kind == "inpainting" else None)[0]


def steered(meas, family, strength, iterations=1):
    return run_node("TrainFreeSteeredDiffusion", measurement=meas, vae=vae_for(family), strength=strength,
                    iterations=iterations)[0]


def run(model, family, sampler, steps=3, seed=5, sigmas=None, latent=None, batch=1):
    import comfy.sample
    import comfy.samplers
    if latent is None:
        latent = torch.zeros(batch, tiny_models.LATENT_CHANNELS[family], SIZE, SIZE)
    if sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).float()
    pos, neg = tiny_models.conditioning(family, seed=1), tiny_models.conditioning(family, seed=2)
    return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, seed), 2.0, sampler, sigmas, pos, neg,
                                      latent, seed=seed, disable_pbar=True)


def residual(model, family, meas, latent):
    """The RMS measurement residual of a sampled latent (as SamplerCustom returns it) decoded by VAEDecode."""
    with torch.no_grad():
        pixels = vae_for(family).decode(latent.float())
    return float(dg.Measurement(meas.operator, meas.observed).residual(pixels).pow(2).mean().sqrt())


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_zero_strength_is_comfyuis_euler_bit_for_bit(tiny, family):
    import comfy.samplers
    model = tiny(family)
    ours = run(model, family, steered(measurement(), family, 0.0))
    core = run(model, family, comfy.samplers.sampler_object("euler"))
    assert torch.equal(ours, core)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_steering_lowers_the_measurement_residual(tiny, family):
    import comfy.samplers
    model = tiny(family)
    meas = measurement("super-resolution")
    sampler = steered(meas, family, 1.0)
    ours = run(model, family, sampler)
    plain = run(model, family, comfy.samplers.sampler_object("euler"))
    assert torch.isfinite(ours).all()
    assert residual(model, family, meas, ours) < 0.9 * residual(model, family, meas, plain)
    report = sampler.trainfree_report
    assert report["steps"] == 3 and report["steps_steered"] == 3
    assert report["residual_final"][0] == pytest.approx(residual(model, family, meas, ours), rel=1e-3)
    assert all(isinstance(v, (int, float, list)) for v in report.values())


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_one_step_moves_the_estimate_as_the_papers_step_in_float64(tiny, family):
    """One step down to sigma 0 returns the corrected estimate x0' = x0 + tau d, with d = J^T A^T r (minus the
    gradient of 1/2 ||y - A(D(x0))||^2; J the decoder's Jacobian, by autograd on a float64 copy of the VAE) and
    tau = <r, A J d> / ||A J d||^2 (the exact minimiser of the linearised loss, J d by forward-mode autograd)."""
    model = tiny(family)
    meas = measurement("inpainting")
    patched = model.clone()
    first = FirstEvaluation(patched, keys=("denoised",))
    sigmas = torch.tensor([2.0, 0.0]) if family == "sd15" else torch.tensor([0.6, 0.0])
    out = model.model.process_latent_in(run(patched, family, steered(meas, family, 1.0), sigmas=sigmas))
    x0 = first.args["denoised"].double()

    decoder = copy.deepcopy(vae_for(family).first_stage_model).double()
    decode = lambda z: ((decoder.decode(model.model.process_latent_out(z)) + 1) / 2).movedim(1, -1)
    forward = lambda z: meas.operator.forward(decode(z))
    y = meas.observed.double()
    with torch.inference_mode(False), torch.enable_grad():
        z = x0.clone().requires_grad_(True)
        r = y - forward(z)
        direction, = torch.autograd.grad(r, z, grad_outputs=-r)   # -(J^T A^T)(-r): minus the loss's gradient
        _, change = torch.autograd.functional.jvp(forward, (x0.clone(),), (direction.detach(),))
    r = r.detach()
    tau = (r * change).sum() / (change * change).sum()
    expected = x0 + tau * direction
    moved, predicted = (out.double() - x0).flatten(), (expected - x0).flatten()
    cosine = torch.nn.functional.cosine_similarity(moved, predicted, dim=0)
    assert cosine > 0.999, cosine
    assert float(moved.norm() / predicted.norm()) == pytest.approx(1.0, rel=2e-2)


def test_refusals_name_the_problem(tiny):
    import comfy.samplers
    model = tiny("sd15")
    with pytest.raises(ValueError, match="decodes to 64 x 64 pixels but the measurement restores a 128 x 128"):
        run(model, "sd15", steered(measurement(), "sd15", 1.0),
            latent=torch.zeros(1, 4, 8, 8))
    bad = measurement()
    bad.observed = bad.observed.clone()
    bad.observed[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        steered(bad, "sd15", 1.0)
    with pytest.raises(ValueError, match="strength"):
        steered(measurement(), "sd15", float("nan"))
    with pytest.raises(ValueError, match="latent contains NaN"):
        run(model, "sd15", steered(measurement(), "sd15", 1.0), latent=torch.full((1, 4, SIZE, SIZE), float("nan")))
    with pytest.raises(ValueError, match="measurement holds 2 images but the latent 3"):
        run(model, "sd15", steered(measurement(batch=2), "sd15", 1.0), batch=3)
    with pytest.raises(ValueError, match="TrainFree Measurement"):
        run_node("TrainFreeSteeredDiffusion", measurement="not one", vae=vae_for("sd15"), strength=1.0)
    assert comfy.samplers  # the sampler module stays importable after the refusals


def test_deterministic_for_a_seed_and_batched_rows_steer_alone(tiny):
    model = tiny("sd15")
    meas = measurement("super-resolution", batch=2)
    a = run(model, "sd15", steered(meas, "sd15", 1.0), batch=2)
    b = run(model, "sd15", steered(meas, "sd15", 1.0), batch=2)
    assert torch.equal(a, b)
    single = measurement("super-resolution", batch=2)
    single.observed = single.observed[1:]
    import comfy.sample
    latent = torch.zeros(2, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, 5)[1:]
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3).float()
    pos, neg = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2)
    alone = comfy.sample.sample_custom(model, noise, 2.0, steered(single, "sd15", 1.0), sigmas, pos, neg, latent[1:],
                                       seed=5, disable_pbar=True)
    torch.testing.assert_close(a[1:], alone, rtol=1e-4, atol=1e-5)


def test_progress_callback_and_interrupt(tiny):
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    model = tiny("sd15")
    latent = torch.zeros(1, 4, SIZE, SIZE)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3).float()
    seen = []
    pos, neg = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2)
    comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 5), 2.0, steered(measurement(), "sd15", 1.0),
                               sigmas, pos, neg, latent, callback=lambda i, *a: seen.append(i), seed=5,
                               disable_pbar=True)
    assert seen == [0, 1, 2]
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(model, "sd15", steered(measurement(), "sd15", 1.0))
    finally:
        comfy.model_management.interrupt_current_processing(False)


@pytest.mark.parametrize("family, dtype", [("sd15", torch.float16), ("flux", torch.bfloat16)])
def test_half_precision_models(pack, family, dtype):
    """As GPUs run them (float16 UNet, bfloat16 DiT): strength 0 is core euler bit for bit, steering stays finite,
    keeps ComfyUI's dtypes and lowers the residual."""
    import comfy.samplers
    model = tiny_models.make_model(family, dtype=dtype)
    meas = measurement("super-resolution")
    plain = run(model, family, comfy.samplers.sampler_object("euler"))
    assert torch.equal(run(model, family, steered(meas, family, 0.0)), plain)
    ours = run(model, family, steered(meas, family, 1.0))
    assert ours.dtype == plain.dtype and torch.isfinite(ours).all()
    assert residual(model, family, meas, ours) < 0.9 * residual(model, family, meas, plain)
