"""RED-diff on the real ComfyUI and tiny models: with no weight on either term the result is the start latent; the
regulariser alone follows the paper's update (Adam on w_t (eps_hat - eps) / N, written here independently from the
model's own predictions, with eps the draws of ComfyUI's noise sampler for the seed); the measurement alone drives the residual down; every family
runs; progress, interrupt, determinism, refusals and nothing kept after a run."""
import math

import pytest
import torch

from conftest import EveryEvaluation, ModelCallCounter, run_node
from harness import leak_probe, tiny_models

SIZE = 64  # pixels: 8 x 8 latents


def digit_like(seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, size // 8, size // 8, 3, generator=g)
    return torch.nn.functional.interpolate(image.movedim(-1, 1), size=(size, size), mode="bilinear").movedim(1, -1)


def measure(kind="super-resolution", noise_level=0.0, image=None, mask=None):
    image = digit_like() if image is None else image
    inputs = {"degradation": kind, "factor": 4, "noise_level": noise_level}
    if mask is not None:
        inputs["mask"] = mask
    observed = run_node("TrainFreeDegrade", image=image, seed=0, **inputs)[0]
    return run_node("TrainFreeMeasurement", image=observed, **inputs)


def red_diff(measurement, vae, lr=0.5, lam=0.25, obs=1.0, weighting="linear"):
    return run_node("TrainFreeREDDiff", measurement=measurement, vae=vae, learning_rate=lr, observation_weight=obs,
                    weighting=weighting, **{"lambda": lam})[0]


def restore(model, family, sampler, sigmas, latent, seed=3, cfg=1.0, callback=None, noise_mask=None):
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, tiny_models.conditioning(family, seed=1),
                                      tiny_models.conditioning(family, seed=2), latent, noise_mask=noise_mask,
                                      callback=callback, disable_pbar=True, seed=seed)


def setup(family, kind="super-resolution"):
    vae = tiny_models.make_vae(tiny_models.LATENT_CHANNELS[family])
    measurement, start = measure(kind)
    return vae, measurement, vae.encode(start)


def schedule(model, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).float()


def round_trip(model, latent):
    return model.model.process_latent_out(model.model.process_latent_in(latent))


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_no_weight_on_either_term_returns_the_start_latent_without_evaluations(tiny, family):
    model = tiny(family).clone()
    counter = ModelCallCounter(model)
    vae, measurement, latent = setup(family)
    sampler = red_diff(measurement, vae, lam=0.0, obs=0.0)
    out = restore(model, family, sampler, schedule(model, 4), latent)
    torch.testing.assert_close(out, round_trip(model, latent), rtol=0, atol=1e-6)
    assert counter.calls == 0
    assert sampler.trainfree_report["iterations"] == 4 and sampler.trainfree_report["model_evaluations"] == 0
    # learning rate 0: both terms act but Adam does not move
    out = restore(model, family, red_diff(measurement, vae, lr=0.0), schedule(model, 2), latent)
    torch.testing.assert_close(out, round_trip(model, latent), rtol=0, atol=1e-6)


# sigmas below a flow model's 1 (where eps_hat - eps is 0 / 0 in the paper's form)
PAPER_SIGMAS = {"sd15": [8.0, 2.0, 0.5, 0.0], "sdxl": [8.0, 2.0, 0.5, 0.0], "sd3": [0.9, 0.6, 0.3, 0.0],
                "flux": [0.9, 0.6, 0.3, 0.0]}


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
def test_regulariser_alone_is_the_papers_adam_update_on_w_eps_residual(tiny, family):
    """Observation weight 0: each iteration noises mu with the seed's draw, asks the guider, and Adam steps on the
    gradient w_t (eps_hat - eps) / N with w_t = lambda sigma / alpha (VP: sqrt(1 - abar) / sqrt(abar), which is
    ComfyUI's sigma; flow: sigma / (1 - sigma)) and eps_hat = (x_t - alpha D) / sigma, the official formula."""
    model = tiny(family).clone()
    seen = EveryEvaluation(model, keys=("input", "sigma", "denoised"))
    vae, measurement, latent = setup(family)
    lam, lr, seed = 0.25, 0.1, 11
    sigmas = torch.tensor(PAPER_SIGMAS[family])
    out = restore(model, family, red_diff(measurement, vae, lr=lr, lam=lam, obs=0.0), sigmas, latent, seed=seed,
                  cfg=2.0)
    assert len(seen.args) == 3

    flow = family in ("sd3", "flux")
    import comfy.k_diffusion.sampling
    draws = comfy.k_diffusion.sampling.default_noise_sampler(torch.zeros(latent.shape), seed=seed)  # ComfyUI's own
    mu = model.model.process_latent_in(latent)

    def gradients():
        for k, args in enumerate(seen.args):
            sigma = float(sigmas[k])
            assert float(args["sigma"][0]) == pytest.approx(sigma)
            alpha = 1 - sigma if flow else 1.0
            x_t, d = args["input"], args["denoised"]
            eps = (x_t - alpha * current[0]) / sigma  # the noise that made x_t from this iterate of mu
            torch.testing.assert_close(eps, draws(sigma, 0.0), rtol=0, atol=1e-4)
            eps_hat = (x_t - alpha * d) / sigma
            yield lam * (sigma / alpha) * (eps_hat - eps) / mu.numel()

    current = [mu]
    for current[0] in adam_iterates(mu, gradients(), lr):
        pass
    expected = model.model.process_latent_out(current[0])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, round_trip(model, latent), atol=1e-3)


def adam_iterates(start, grads, lr):
    """Adam's iterates from ``start``; the next gradient is asked for only after the previous iterate is out (it
    depends on it)."""
    yield start
    m = torch.zeros_like(start)
    v = torch.zeros_like(start)
    params = start
    for t, grad in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * grad
        v = 0.99 * v + 0.01 * grad * grad
        params = params - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.99 ** t)).sqrt() + 1e-8)
        yield params


@torch.no_grad()
def decoded_residual_rms(model, vae, measurement, latent):
    pixels = vae.decode(latent)  # ComfyUI's own decode of the (output space) latent, clamped
    return float(measurement.residual(pixels.float()).square().mean().sqrt())


@pytest.mark.parametrize("kind", ("super-resolution", "inpainting"))
def test_measurement_alone_drives_the_residual_down(tiny, kind):
    model = tiny("sd15")
    vae = tiny_models.make_vae(4)
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, SIZE // 2:] = 1.0
    # a clean image this VAE can make, so that a latent measuring exactly to the observation exists
    with torch.no_grad():
        clean = vae.decode(torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4)))
    measurement, start = measure(kind, image=clean, mask=mask if kind == "inpainting" else None)
    latent = vae.encode(start)
    sampler = red_diff(measurement, vae, lr=0.1, lam=0.0, obs=1.0)
    sigmas = schedule(model, 40)
    rms = []

    def follow(i, denoised, x, total):
        rms.append(decoded_residual_rms(model, vae, measurement, model.model.process_latent_out(x)))
    out = restore(model, "sd15", sampler, sigmas, latent, callback=follow)
    report = sampler.trainfree_report
    start_rms = decoded_residual_rms(model, vae, measurement, latent)
    final_rms = decoded_residual_rms(model, vae, measurement, out)
    assert report["start_residual_rms"] == pytest.approx(start_rms, rel=1e-2, abs=1e-4)
    assert report["final_residual_rms"] == pytest.approx(final_rms, rel=1e-2, abs=1e-4)
    assert final_rms < 0.6 * start_rms, (start_rms, final_rms, rms)
    assert sum(b > a * 1.05 for a, b in zip(rms, rms[1:])) <= len(rms) // 5  # mostly decreasing
    assert report["model_evaluations"] == 0 and report["iterations"] == 40


def test_both_terms_together_fit_the_measurement_better_than_the_start(tiny):
    model = tiny("sd15")
    vae, measurement, latent = setup("sd15")
    sampler = red_diff(measurement, vae, lr=0.05)
    restore(model, "sd15", sampler, schedule(model, 20), latent)
    report = sampler.trainfree_report
    assert report["final_residual_rms"] < report["start_residual_rms"]
    assert report["model_evaluations"] == 20


def test_all_families_run_with_progress(tiny, family):
    model = tiny(family)
    vae, measurement, latent = setup(family)
    sampler = red_diff(measurement, vae)
    sigmas = schedule(model, 3)
    steps = []
    out = restore(model, family, sampler, sigmas, latent, cfg=2.0,
                  callback=lambda i, denoised, x, total: steps.append((i, total)))
    assert torch.isfinite(out).all() and out.shape == latent.shape
    assert steps == [(i, 3) for i in range(3)]
    report = sampler.trainfree_report
    assert report["iterations"] == 3 and report["model_evaluations"] == 3
    assert report["degradation"] == "super-resolution"
    assert math.isfinite(report["final_residual_rms"])
    assert not torch.allclose(out, round_trip(model, latent), atol=1e-3)


def test_a_seed_gives_one_result(tiny):
    model = tiny("sd3")
    vae, measurement, latent = setup("sd3")
    sigmas = schedule(model, 3)
    a = restore(model, "sd3", red_diff(measurement, vae), sigmas, latent, seed=1)
    b = restore(model, "sd3", red_diff(measurement, vae), sigmas, latent, seed=1)
    c = restore(model, "sd3", red_diff(measurement, vae), sigmas, latent, seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_interrupt_stops_between_iterations(tiny):
    import comfy.model_management
    model = tiny("sd15")
    vae, measurement, latent = setup("sd15")
    steps = []

    def interrupt(i, denoised, x, total):
        steps.append(i)
        if i == 1:
            comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            restore(model, "sd15", red_diff(measurement, vae), schedule(model, 5), latent, callback=interrupt)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert steps == [0, 1]


def test_bad_inputs_are_refused_by_name(tiny):
    model = tiny("sd15")
    vae, measurement, latent = setup("sd15")
    sigmas = schedule(model, 2)
    with pytest.raises(ValueError, match="connect VAE Encode of TrainFree Measurement's start_image"):
        restore(model, "sd15", red_diff(measurement, vae), sigmas, torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="connect the model's VAE"):
        red_diff(measurement, None)
    with pytest.raises(ValueError, match="input 'lambda' is nan"):
        red_diff(measurement, vae, lam=float("nan"))
    with pytest.raises(ValueError, match="input 'learning_rate'"):
        red_diff(measurement, vae, lr=-1.0)
    with pytest.raises(ValueError, match="must come from TrainFree Measurement"):
        red_diff(torch.zeros(1, 8, 8, 3), vae)
    with pytest.raises(ValueError, match="unknown weighting"):
        red_diff(measurement, vae, weighting="square")
    with pytest.raises(ValueError, match="end at 0"):
        restore(model, "sd15", red_diff(measurement, vae), sigmas[:-1], latent)
    with pytest.raises(ValueError, match="cannot take a latent noise mask"):
        restore(model, "sd15", red_diff(measurement, vae), sigmas, latent, noise_mask=torch.ones(1, 1, 64, 64))
    with pytest.raises(ValueError, match="connect this model's VAE"):
        restore(model, "sd15", red_diff(measurement, tiny_models.make_vae(16)), sigmas, latent)
    broken, _ = measure()
    broken.observed = broken.observed.clone()
    broken.observed[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        restore(model, "sd15", red_diff(broken, vae), sigmas, latent)
    with pytest.raises(ValueError, match="NaN"):
        restore(model, "sd15", red_diff(measurement, vae), sigmas, latent * float("nan"))


def test_nothing_is_kept_after_a_run(tiny):
    model = tiny("flux")
    vae, measurement, latent = setup("flux")
    before = leak_probe.probe()
    sampler = red_diff(measurement, vae)
    restore(model, "flux", sampler, schedule(model, 2), latent)
    after = leak_probe.probe()
    assert after["tensors_held_by_pack"] == before["tensors_held_by_pack"]
    assert after["model_hooks"] == before["model_hooks"]
    assert all(not torch.is_tensor(v) for v in sampler.trainfree_report.values())
