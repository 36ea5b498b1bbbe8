"""CFG++: manifold-constrained classifier-free guidance (Chung, Kim, Park, Nam, Ye, ICLR 2025, arXiv 2406.08070;
official code github.com/CFGpp-diffusion/CFGpp).

A CFG++ step takes the clean estimate from the guided prediction D_lambda = D_u + lambda (D_c - D_u), with a small
lambda in [0, 1], but renoises with the unconditional noise estimate, so the iterate stays near the data manifold.
DDIM (paper, eps form): x0 = (x_t - sqrt(1 - a_t) eps_lambda) / sqrt(a_t); x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 -
a_{t-1}) eps_u.

Here every sampler works on ComfyUI's latent x = alpha(sigma) x0 + sigma eps (alpha = 1 for eps and v models, 1 -
sigma for rectified flow), given ``predict(x, sigma) -> (guided, uncond)`` denoised predictions and ``alpha_of``.
On eps models the deterministic DDIM step is exactly the Euler step in sigma (the two samplers coincide); the
multistep solver keeps the history of the *unconditional* predictions, as the official code does.
"""
import math


def noise_part(x, sigma, alpha, denoised):
    """The noise estimate a denoised prediction implies: eps = (x - alpha x0) / sigma."""
    return (x - alpha * denoised) / sigma


def ddim_step(x, sigma, sigma_next, guided, uncond, alpha, alpha_next, eta=0.0, noise=None):
    """One DDIM CFG++ step from ``sigma`` to ``sigma_next``. With ``eta`` > 0 part of the renoising is fresh noise
    (DDIM's stochastic step; eta = 1 is ancestral sampling): sigma_down of the deterministic part and sigma_up of
    ``noise`` (a standard normal draw), both in the variance-exploding sigma sigma / alpha, as ComfyUI's ancestral
    samplers compute them."""
    if sigma_next == 0:
        return guided
    eps_u = noise_part(x, sigma, alpha, uncond)
    if eta == 0:
        return alpha_next * guided + sigma_next * eps_u
    ve = sigma / alpha if alpha > 0 else math.inf  # pure noise (a flow model's sigma 1)
    down, up = ancestral_split(ve, sigma_next / alpha_next, eta)
    return alpha_next * (guided + down * eps_u + up * noise)


def ancestral_split(sigma, sigma_next, eta):
    """(sigma_down, sigma_up) of an ancestral step between variance-exploding sigmas (k-diffusion's rule)."""
    kept = 1.0 if math.isinf(sigma) else (sigma ** 2 - sigma_next ** 2) / sigma ** 2
    up = min(sigma_next, eta * math.sqrt(max(sigma_next ** 2 * kept, 0.0)))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def sample_ddim(predict, x, sigmas, alpha_of, eta=0.0, noise=None, callback=None):
    """DDIM (= Euler) CFG++ over ``sigmas``; ``noise(i)`` gives the standard normal draw of step i when eta > 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        guided, uncond = predict(x, sigmas[i])
        if callback is not None:
            callback(i, x, guided)
        draw = noise(i) if eta > 0 and sigma_next > 0 else None
        x = ddim_step(x, sigma, sigma_next, guided, uncond, alpha_of(sigma), alpha_of(sigma_next), eta, draw)
    return x


def half_log_snr(sigma, alpha):
    return math.log(alpha / sigma) if alpha > 0 else -math.inf  # pure noise: a flow model's sigma 1


def sample_dpmpp_2m(predict, x, sigmas, alpha_of, callback=None):
    """DPM-Solver++(2M) CFG++: x_{i+1} = (s_{i+1} / s_i)(x_i - a_i u_i) + a_{i+1} (D_i + (1 - e^-h) / (2 r)
    (D_i - u_{i-1})), with D the guided and u the unconditional prediction, h the step in half log-SNR and r the
    ratio of the previous step to this one. The first and the last step are DDIM CFG++ steps."""
    previous_uncond, previous_h = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        guided, uncond = predict(x, sigmas[i])
        if callback is not None:
            callback(i, x, guided)
        alpha, alpha_next = alpha_of(sigma), alpha_of(sigma_next)
        x_next = ddim_step(x, sigma, sigma_next, guided, uncond, alpha, alpha_next)
        h = None
        if sigma_next > 0:
            h = half_log_snr(sigma_next, alpha_next) - half_log_snr(sigma, alpha)
            if previous_uncond is not None:
                r = previous_h / h
                x_next = x_next + alpha_next * (-math.expm1(-h)) / (2 * r) * (guided - previous_uncond)
        x, previous_uncond, previous_h = x_next, uncond, h
    return x


