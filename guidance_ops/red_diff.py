"""RED-diff (Mardani et al. 2023, "A Variational Perspective on Solving Inverse Problems with Diffusion Models"):
the restored image is the mean ``mu`` of a variational posterior, fitted by Adam with one diffusion timestep per
iteration, from high noise to low. Each iteration noises ``mu`` to ``x_t = alpha mu + sigma eps`` and minimises

    loss = w_t * mean(sg(eps_hat - eps) * mu) + v * mean((y - A(mu))^2) / 2

where ``eps_hat`` is the denoiser's noise prediction at ``x_t`` (no gradient through the denoiser: ``sg`` stops
it), ``w_t = lambda * f(sigma / alpha)`` weighs the denoising regulariser by the inverse signal-to-noise ratio
("linear": f(s) = s, the official default) and ``v`` weighs the measurement. The official code runs in pixels in
[-1, 1]; here the measurement residual is taken in the same units (twice the [0, 1] residual).

The regulariser's residual is computed from the denoised prediction ``D`` instead of the noise prediction: with
``x_t = alpha mu + sigma eps`` and ``eps_hat = (x_t - alpha D) / sigma``, ``eps_hat - eps = (mu - D) / s`` with
``s = sigma / alpha``; so ``w_t (eps_hat - eps) = lambda * f(s) / s * (mu - D)``, which stays finite where
``alpha`` is 0 (a flow model's sigma 1, pure noise: the "linear" weight then pulls ``mu`` to ``D`` with strength
lambda, the limit of the official weights at the last timestep).

Plain torch; ComfyUI's sampling space: ``alpha`` is 1 for eps / v models (ComfyUI's sigma is already the VP
model's sigma / alpha) and ``1 - sigma`` for rectified flow.
"""
import math

import torch

# f(s) / s of the official weightings of the regulariser, s = sigma / alpha (the inverse SNR's square root).
# The official code's "square" is left out: f(s) / s = s is unbounded at a flow model's sigma 1.
_WEIGHT_OVER_S = {
    "linear": lambda s: 1.0,
    "sqrt": lambda s: 0.0 if math.isinf(s) else 1.0 / math.sqrt(s),
    "log": lambda s: 0.0 if math.isinf(s) else math.log1p(s) / s,
    "trunc_linear": lambda s: 0.0 if math.isinf(s) else min(s, 1.0) / s,
    "const": lambda s: 0.0 if math.isinf(s) else 1.0 / s,
}
WEIGHTINGS = tuple(_WEIGHT_OVER_S)
ADAM_BETAS = (0.9, 0.99)  # the official code's (its comment: "original: 0.999")
PIXEL_SCALE = 2.0  # [0, 1] pixels to the official code's [-1, 1]


def inverse_snr(sigma, alpha):
    """s = sigma / alpha (infinite where alpha is 0)."""
    return math.inf if alpha <= 0 else float(sigma) / float(alpha)


def regulariser_weight(strength, sigma, alpha, weighting="linear"):
    """The paper's w_t = lambda * f(sigma / alpha)."""
    if weighting not in _WEIGHT_OVER_S:
        raise ValueError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    s = inverse_snr(sigma, alpha)
    return strength * (s if weighting == "linear" else _WEIGHT_OVER_S[weighting](s) * s)


def weighted_noise_residual(mu, denoised, sigma, alpha, strength, weighting="linear"):
    """w_t * (eps_hat - eps), from the denoised prediction at x_t = alpha mu + sigma eps (see the module text)."""
    if weighting not in _WEIGHT_OVER_S:
        raise ValueError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    factor = strength * _WEIGHT_OVER_S[weighting](inverse_snr(sigma, alpha))
    return factor * (mu.detach() - denoised.detach())


def regulariser_loss(mu, weighted_residual):
    """mean(sg(w_t (eps_hat - eps)) * mu): its gradient in mu is the weighted residual over mu's size."""
    return (weighted_residual.detach() * mu).mean()


def observation_loss(residual):
    """mean(r^2) / 2 of the pixel residual y - A(x), in the official code's [-1, 1] units."""
    return (PIXEL_SCALE * residual).square().mean() / 2


def iteration_steps(sigmas):
    """The schedule's steps that get an iteration: every sigma above 0, from high to low (the final 0 is where the
    result is read)."""
    return [i for i in range(len(sigmas) - 1) if float(sigmas[i]) > 0]


def rms(residual):
    return float(residual.detach().float().square().mean().sqrt())
