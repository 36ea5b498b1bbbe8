"""RED-diff's per-iteration terms against the official code's statement (NVlabs/RED-diff, algos/reddiff.py): the
regulariser's weighted residual is w_t (eps_hat - eps) with eps_hat = (x_t - alpha D) / sigma and w_t = lambda
f(1 / sqrt(SNR)) for each official weighting, and its surrogate loss has gradient w_t (eps_hat - eps) / N in mu;
the observation loss is mean((y - A x)^2) / 2 on pixels in [-1, 1]."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import red_diff

OFFICIAL = {  # the official weightings of snr_inv = sqrt(1 - abar) / sqrt(abar)
    "linear": lambda s: s,
    "sqrt": math.sqrt,
    "log": lambda s: math.log(s + 1.0),
    "trunc_linear": lambda s: min(s, 1.0),
    "const": lambda s: 1.0,
}


def _tensors(seed, shape=(2, 4, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), sigma=st.floats(0.02, 0.98), flow=st.booleans(),
       weighting=st.sampled_from(red_diff.WEIGHTINGS), strength=st.floats(0.0, 2.0))
def test_weighted_residual_is_the_official_w_times_eps_residual(seed, sigma, flow, weighting, strength):
    mu, eps, denoised = _tensors(seed)
    if not flow:
        sigma = sigma * 14.0  # a VP model's sigma in ComfyUI: sqrt(1 - abar) / sqrt(abar), up to ~14.6 for SD
    alpha = 1.0 - sigma if flow else 1.0
    x_t = alpha * mu + sigma * eps
    eps_hat = (x_t - alpha * denoised) / sigma
    w = strength * OFFICIAL[weighting](sigma / alpha)
    expected = w * (eps_hat - eps)
    got = red_diff.weighted_noise_residual(mu, denoised, sigma, alpha, strength, weighting)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * (1 + float(expected.abs().max())))
    assert red_diff.regulariser_weight(strength, sigma, alpha, weighting) == pytest.approx(w)


def test_eps_models_weight_is_comfyuis_sigma_which_is_the_official_snr_inverse():
    alphas_cumprod = torch.linspace(0.9991, 0.0047, 50, dtype=torch.float64)
    for abar in alphas_cumprod:
        official = float((1 - abar).sqrt() / abar.sqrt())
        comfy_sigma = float(((1 - abar) / abar) ** 0.5)  # ModelSamplingDiscrete's sigmas
        assert red_diff.regulariser_weight(0.25, comfy_sigma, 1.0) == pytest.approx(0.25 * official)


def test_surrogate_loss_gradient_is_the_weighted_residual_over_n():
    mu, eps, denoised = _tensors(3)
    mu.requires_grad_(True)
    weighted = red_diff.weighted_noise_residual(mu, denoised, 0.7, 1.0, 0.25)
    loss = red_diff.regulariser_loss(mu, weighted)
    grad, = torch.autograd.grad(loss, mu)
    x_t = mu.detach() + 0.7 * eps
    eps_hat = (x_t - denoised) / 0.7
    torch.testing.assert_close(grad, 0.25 * 0.7 * (eps_hat - eps) / mu.numel())


def test_flow_pure_noise_limit():
    """At a flow model's sigma 1 (alpha 0) the official terms are inf * 0; the weighted residual is their limit:
    lambda (mu - D) for the linear weighting (w (eps_hat - eps) = lambda f(s) / s (mu - D), f(s) / s -> 1), 0 for
    the bounded weightings."""
    mu, _, denoised = _tensors(5)
    torch.testing.assert_close(red_diff.weighted_noise_residual(mu, denoised, 1.0, 0.0, 0.25), 0.25 * (mu - denoised))
    for weighting in ("sqrt", "log", "trunc_linear", "const"):
        assert red_diff.weighted_noise_residual(mu, denoised, 1.0, 0.0, 0.25, weighting).abs().max() == 0
    for s in (1e3, 1e6):  # and the limit is approached continuously
        alpha = 1.0 / (1.0 + s)
        near = red_diff.weighted_noise_residual(mu, denoised, 1.0 - alpha, alpha, 0.25)
        torch.testing.assert_close(near, 0.25 * (mu - denoised))


def test_observation_loss_is_the_official_one_on_minus_one_to_one_pixels():
    g = torch.Generator().manual_seed(1)
    y, ax = torch.rand(1, 8, 8, 3, generator=g, dtype=torch.float64), torch.rand(1, 8, 8, 3, generator=g,
                                                                               dtype=torch.float64)
    official = (((2 * y - 1) - (2 * ax - 1)) ** 2).mean() / 2
    assert float(red_diff.observation_loss(y - ax)) == pytest.approx(float(official))


def test_iterations_are_the_sigmas_above_zero_high_to_low():
    assert red_diff.iteration_steps(torch.tensor([14.6, 3.0, 0.5, 0.0])) == [0, 1, 2]
    assert red_diff.iteration_steps([1.0, 0.5, 0.0, 0.0]) == [0, 1]


def test_unknown_weighting_is_refused():
    mu, _, d = _tensors(0)
    with pytest.raises(ValueError, match="unknown weighting 'square'"):
        red_diff.weighted_noise_residual(mu, d, 0.5, 1.0, 0.25, "square")
