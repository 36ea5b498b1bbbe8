"""CycleDiffusion's math alone: the forward-process posterior against the DDPM paper's alpha-bar form (eps models)
and against Bayes' rule on the rectified-flow forward process (flow models), the DPM-Encoder's noises with a
perfect denoiser (the ancestral step is then the posterior itself, so the noises are the draws), the replay
retracing the encoding, and the sampler classification."""
import math

import pytest
import torch

from guidance_ops import cycle_diffusion as ops


def tensors(seed, count, shape=(2, 4, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


@pytest.mark.parametrize("sigma,sigma_next", [(14.6, 9.0), (3.0, 1.1), (0.5, 0.08)])
def test_posterior_is_the_ddpm_posterior_in_alpha_bar_form(sigma, sigma_next):
    """Ho et al. 2020 eq. 7: q(x_{t-1} | x_t, x_0) = N(mu, beta~) with
    mu = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t and
    beta~ = (1 - abar_{t-1}) / (1 - abar_t) beta_t, on the VP latent; ComfyUI's x is that latent / sqrt(abar)
    with abar = 1 / (1 + sigma^2)."""
    x0, x_t = tensors(0, 2)
    abar_t, abar_s = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    alpha_t = abar_t / abar_s
    beta_t = 1 - alpha_t
    vp_t = x_t * math.sqrt(abar_t)
    mu = math.sqrt(abar_s) * beta_t / (1 - abar_t) * x0 + math.sqrt(alpha_t) * (1 - abar_s) / (1 - abar_t) * vp_t
    variance = (1 - abar_s) / (1 - abar_t) * beta_t
    mean, std = ops.posterior(x_t, x0, sigma, sigma_next, flow=False)
    torch.testing.assert_close(mean, mu / math.sqrt(abar_s), rtol=1e-5, atol=1e-5)
    assert std == pytest.approx(math.sqrt(variance / abar_s), rel=1e-9)


@pytest.mark.parametrize("sigma,sigma_next", [(0.9, 0.6), (0.5, 0.2), (0.99, 0.02), (1.0, 0.7)])
def test_flow_posterior_is_bayes_rule_on_the_rectified_flow_process(sigma, sigma_next):
    """x_s = (1 - s) x0 + s eps; the Markov transition to t keeps the marginal: x_t | x_s ~ N(k x_s, t^2 - k^2 s^2)
    with k = (1 - t) / (1 - s). The Gaussian prior N((1 - s) x0, s^2) times that likelihood gives the posterior."""
    x0, x_t = tensors(1, 2)
    k = (1 - sigma) / (1 - sigma_next)
    noise_var = sigma ** 2 - k ** 2 * sigma_next ** 2
    prior_mean, prior_var = (1 - sigma_next) * x0, sigma_next ** 2
    precision = 1 / prior_var + k ** 2 / noise_var
    expected_mean = (prior_mean / prior_var + k * x_t / noise_var) / precision
    mean, std = ops.posterior(x_t, x0, sigma, sigma_next, flow=True)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-5)
    assert std == pytest.approx(math.sqrt(1 / precision), rel=1e-6)


def test_posterior_draws_have_the_posterior_moments():
    """A statistical check of the draw itself (fixed seed, 20 000 draws: 3 % tolerance is > 4 standard errors)."""
    x0, x_t = torch.full((20000,), 0.5), torch.full((20000,), 2.0)
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(3))
    drawn = ops.posterior_draw(x_t, x0, 2.0, 1.0, False, noise)
    # VE posterior: mean x0 + (1/4)(x_t - x0) = 0.875, variance 1 * (4 - 1) / 4 = 0.75
    assert float(drawn.mean()) == pytest.approx(0.875, abs=0.03)
    assert float(drawn.var()) == pytest.approx(0.75, rel=0.03)


@pytest.mark.parametrize("kind", ops.SAMPLERS)
def test_with_a_perfect_denoiser_the_encoders_noises_are_the_posterior_draws(kind):
    """On eps models both ancestral samplers at eta 1 step exactly to the posterior when the denoiser returns the
    true x0 (k-diffusion: sigma_down = s^2 / t, sigma_up^2 = s^2 (t^2 - s^2) / t^2), so the solved noises must be
    the standard normal draws the encoder made."""
    x0 = tensors(4, 1)[0]
    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.7, 0.0])
    draws = tensors(5, 5)
    pool = iter(draws)
    start, noises, trajectory = ops.encode(lambda x, sigma: x0, x0, sigmas, kind, 1.0, 1.0, False,
                                           lambda: next(pool))
    torch.testing.assert_close(start, x0 + 14.6 * draws[0])
    for i in range(3):
        torch.testing.assert_close(noises[i], draws[i + 1], rtol=1e-4, atol=1e-4)
    assert torch.equal(noises[3], torch.zeros_like(x0))  # the last step to sigma 0 adds no noise
    torch.testing.assert_close(trajectory[-1], x0)


def rough_denoiser(x, sigma):
    """A denoiser with no closed-form relation to any x0 (a nonlinear function of x and sigma)."""
    return torch.tanh(0.8 * x) * (1 + 0.1 * sigma) - 0.2 * x.roll(1, -1) / (1 + sigma)


@pytest.mark.parametrize("kind,eta,s_noise,flow,sigmas", [
    (ops.EULER_ANCESTRAL, 1.0, 1.0, False, [14.6, 6.0, 2.0, 0.7, 0.0]),
    (ops.EULER_ANCESTRAL, 0.6, 1.3, False, [3.0, 2.0, 1.0, 0.4]),
    (ops.EULER_ANCESTRAL, 1.0, 1.0, True, [1.0, 0.8, 0.5, 0.2, 0.0]),
    (ops.EULER_ANCESTRAL, 0.5, 0.9, True, [0.7, 0.5, 0.3, 0.1]),
    (ops.DDPM, 1.0, 1.0, False, [14.6, 6.0, 2.0, 0.7, 0.0]),
])
def test_replay_retraces_the_encoding(kind, eta, s_noise, flow, sigmas):
    sigmas = torch.tensor(sigmas)
    x0 = tensors(6, 1)[0]
    g = torch.Generator().manual_seed(7)
    start, noises, trajectory = ops.encode(rough_denoiser, x0, sigmas, kind, eta, s_noise, flow,
                                           lambda: torch.randn(x0.shape, generator=g))
    seen = []
    out = ops.replay(rough_denoiser, start, noises, sigmas, kind, eta, s_noise, flow,
                     lambda i, x, denoised: seen.append(x))
    for replayed, encoded in zip(seen + [out], trajectory):
        torch.testing.assert_close(replayed, encoded, rtol=1e-4, atol=1e-4)
    if float(sigmas[-1]) == 0:  # the last step is the denoiser's prediction at the last noisy x
        torch.testing.assert_close(out, rough_denoiser(trajectory[-2], sigmas[-2]), rtol=1e-4, atol=1e-4)
    else:  # the encoded end is a draw of q(x at the last sigma | x0)
        assert ops.relative_error(out, x0) > 0.05


def test_sampler_classification():
    assert ops.sampler_kind("euler_ancestral", {}) == ("euler_ancestral", 1.0, 1.0)
    assert ops.sampler_kind("euler_ancestral", {"eta": 0.5, "s_noise": 1.2}) == ("euler_ancestral", 0.5, 1.2)
    assert ops.sampler_kind("ddpm", {}) == ("ddpm", 1.0, 1.0)
    for name in ("euler", "ddim", "dpmpp_2m", "uni_pc", "heun"):
        with pytest.raises(ops.UnsupportedSampler, match="deterministic sampler has no per-step noise"):
            ops.sampler_kind(name, {})
    with pytest.raises(ops.UnsupportedSampler, match="eta 0.0 .* deterministic"):
        ops.sampler_kind("euler_ancestral", {"eta": 0.0})
    for name in ("dpmpp_2m_sde", "dpm_2_ancestral", "lcm", None):
        with pytest.raises(ops.UnsupportedSampler, match="not supported .*euler_ancestral, ddpm"):
            ops.sampler_kind(name, {})
