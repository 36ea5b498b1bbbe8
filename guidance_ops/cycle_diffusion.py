"""CycleDiffusion's DPM-Encoder and its replay (Wu and De la Torre, "Unifying Diffusion Models' Latent Space, with
Applications to CycleDiffusion and Guidance", 2022, arXiv 2210.05559).

A stochastic sampler is a deterministic map from its Gaussian latent (the starting noise and every step's noise)
to an image. The DPM-Encoder finds a latent for a real image x0: it draws the noisy x at the first sigma from
q(x | x0), then each next x from the forward process posterior q(x_next | x, x0), and solves the sampler's own step
for the noise that makes it land there. Replaying the latent with the same model and prompt retraces every x;
with another prompt it translates the image (CycleDiffusion).

ComfyUI's sampling space: ``x = alpha x0 + sigma eps`` with alpha = 1 for eps / v models and 1 - sigma for flow
models. In ``x / alpha`` the process is variance exploding with noise level ``sigma / alpha``, where the posterior
of the level-s variable given the level-t one and x0 is Gaussian with mean ``x0 + (s^2 / t^2)(x_t - x0)`` and
variance ``s^2 (t^2 - s^2) / t^2`` (the DDPM posterior rewritten in these variables).

Each supported sampler's step is written as ``x_next = (deterministic + coefficient * z) * outer``, the way
ComfyUI's own code computes it (so the replay retraces ComfyUI's sampler to float rounding); a step whose
coefficient is 0 (the last one, to sigma 0) has no noise: its row of the latent is zero and unused.
"""
from dataclasses import dataclass, field

import torch

EULER_ANCESTRAL, DDPM = "euler_ancestral", "ddpm"
SAMPLERS = (EULER_ANCESTRAL, DDPM)
# ComfyUI's samplers without per-step noise (``ddim`` is ComfyUI's euler step).
DETERMINISTIC = frozenset({
    "euler", "euler_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0", "dpm_2", "lms", "dpm_fast", "dpm_adaptive",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "ddim", "uni_pc", "uni_pc_bh2"})
DETERMINISTIC_ADVICE = ("a deterministic sampler has no per-step noise to encode the image into; choose "
                        "euler_ancestral (or use TrainFree Invert for deterministic inversion)")


class UnsupportedSampler(ValueError):
    pass


def sampler_kind(name, options):
    """``(kind, eta, s_noise)`` for ComfyUI's sampler ``name`` with its ``options`` (SamplerEulerAncestral's eta
    and s_noise), or an ``UnsupportedSampler`` naming why and what to choose."""
    eta, s_noise = float(options.get("eta", 1.0)), float(options.get("s_noise", 1.0))
    if name in DETERMINISTIC:
        raise UnsupportedSampler(f"sampler '{name}': {DETERMINISTIC_ADVICE}")
    if name not in SAMPLERS:
        what = f"sampler '{name}'" if name else "this sampler (not one of ComfyUI's own)"
        raise UnsupportedSampler(f"{what} is not supported by the DPM-Encoder; supported: {', '.join(SAMPLERS)} "
                                 f"(from KSamplerSelect, or SamplerEulerAncestral for eta and s_noise)")
    if name == EULER_ANCESTRAL and (eta == 0 or s_noise == 0):
        raise UnsupportedSampler(f"euler_ancestral with eta {eta} and s_noise {s_noise} adds no noise, so it is "
                                 f"deterministic: {DETERMINISTIC_ADVICE.split('; ')[0]}; set eta and s_noise above 0 "
                                 f"(1 and 1 are the ancestral sampler proper)")
    return name, (eta if name == EULER_ANCESTRAL else 1.0), (s_noise if name == EULER_ANCESTRAL else 1.0)


@dataclass
class DPMLatent:
    """A stochastic sampler's Gaussian latent of an image: ``start`` is x at ``sigmas[0]`` in the model's sampling
    space [B, C, ...]; ``noises`` [steps, B, C, ...] the standard normal draw of every step (zero where the step
    adds none); ``model`` the fingerprint of the model it was made with."""
    start: torch.Tensor
    noises: torch.Tensor
    sigmas: torch.Tensor
    sampler: str
    eta: float
    s_noise: float
    flow: bool
    model: str
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the forward process

def scaled(sigma, flow):
    """``(alpha, sigma / alpha)`` of ComfyUI's ``x = alpha x0 + sigma eps``."""
    alpha = 1.0 - sigma if flow else 1.0
    return alpha, (sigma / alpha if alpha > 0 else float("inf"))


def forward_draw(x0, sigma, flow, noise):
    """x at ``sigma`` drawn from q(x | x0)."""
    alpha = 1.0 - sigma if flow else 1.0
    return alpha * x0 + sigma * noise


def posterior(x, x0, sigma, sigma_next, flow):
    """Mean and standard deviation of q(x at ``sigma_next`` | x at ``sigma``, x0)."""
    alpha_t, t = scaled(sigma, flow)
    alpha_s, s = scaled(sigma_next, flow)
    if t == float("inf"):  # x at sigma = 1 of a flow model is pure noise: no information about x0
        return alpha_s * x0, alpha_s * s
    ratio = s ** 2 / t ** 2
    mean = x0 + ratio * (x / alpha_t - x0)
    return alpha_s * mean, alpha_s * (s ** 2 * (t ** 2 - s ** 2) / t ** 2) ** 0.5


def posterior_draw(x, x0, sigma, sigma_next, flow, noise):
    mean, std = posterior(x, x0, sigma, sigma_next, flow)
    return mean + std * noise


# ---------------------------------------------------------------- the samplers' steps

def step_parts(kind, x, denoised, sigma, sigma_next, eta, s_noise, flow):
    """``(deterministic, coefficient, outer)`` of one step: ``x_next = (deterministic + coefficient * z) * outer``.
    ``sigma``, ``sigma_next`` are the schedule's 0-dim tensors (ComfyUI computes with them)."""
    if kind == DDPM:
        return _ddpm_parts(x, denoised, sigma, sigma_next)
    if flow:
        return _euler_ancestral_flow_parts(x, denoised, sigma, sigma_next, eta, s_noise)
    return _euler_ancestral_parts(x, denoised, sigma, sigma_next, eta, s_noise)


def _euler_ancestral_parts(x, denoised, sigma, sigma_next, eta, s_noise):
    """k-diffusion's ancestral Euler step: an Euler step down to sigma_down, then noise sigma_up, with
    sigma_up^2 = eta^2 s^2 (t^2 - s^2) / t^2 (capped at s) and sigma_down^2 + sigma_up^2 = s^2."""
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    if sigma_down == 0:
        return denoised, 0.0, 1.0
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_down - sigma), float(s_noise * sigma_up), 1.0


def _euler_ancestral_flow_parts(x, denoised, sigma, sigma_next, eta, s_noise):
    """The rectified-flow form of the ancestral step (ComfyUI's euler_ancestral on flow models): an Euler step to
    sigma_down = s (1 + (s / t - 1) eta), rescaled to alpha_s and renoised to sigma_next."""
    if sigma_next == 0:
        return denoised, 0.0, 1.0
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    ratio = sigma_down / sigma
    euler = ratio * x + (1 - ratio) * denoised
    return (alpha_next / alpha_down) * euler, float(s_noise * renoise), 1.0


def _ddpm_parts(x, denoised, sigma, sigma_next):
    """The DDPM ancestral step (Ho et al. 2020, eq. 11 with the posterior's variance) in alpha-bar form, as
    ComfyUI's ddpm sampler computes it on x / sqrt(1 + sigma^2) and scales back."""
    alpha_bar = 1 / (sigma * sigma + 1)
    alpha_bar_next = 1 / (sigma_next * sigma_next + 1)
    alpha = alpha_bar / alpha_bar_next
    eps = (x - denoised) / sigma
    mean = (1.0 / alpha).sqrt() * (x / torch.sqrt(1.0 + sigma ** 2.0) - (1 - alpha) * eps / (1 - alpha_bar).sqrt())
    if sigma_next == 0:
        return mean, 0.0, 1.0
    std = float(((1 - alpha) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar)).sqrt())
    return mean, std, torch.sqrt(1.0 + sigma_next ** 2.0)


def take_step(parts, z):
    deterministic, coefficient, outer = parts
    if coefficient == 0:
        return deterministic
    return (deterministic + z * coefficient) * outer


def solve_noise(parts, x_next):
    """The z for which the step lands on ``x_next``."""
    deterministic, coefficient, outer = parts
    return (x_next / outer - deterministic) / coefficient


# ---------------------------------------------------------------- the encoder and the replay

def encode(denoise, x0, sigmas, kind, eta, s_noise, flow, draw, on_step=None):
    """The DPM-Encoder: ``(start, noises, trajectory)`` for the clean ``x0`` (sampling space) on ``sigmas``.
    ``denoise(x, sigma)`` is the sampler's denoised prediction; ``draw()`` a standard normal tensor like x0."""
    x = forward_draw(x0, float(sigmas[0]), flow, draw())
    start, noises, trajectory = x, [], [x]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        parts = step_parts(kind, x, denoise(x, sigma), sigma, sigma_next, eta, s_noise, flow)
        if parts[1] == 0:
            x, z = take_step(parts, None), torch.zeros_like(x0)
        else:
            x = posterior_draw(x, x0, float(sigma), float(sigma_next), flow, draw())
            z = solve_noise(parts, x)
        noises.append(z)
        trajectory.append(x)
        if on_step is not None:
            on_step()
    return start, torch.stack(noises), trajectory


def replay(denoise, start, noises, sigmas, kind, eta, s_noise, flow, on_step=None):
    """Sample with the stored latent: the sampler's steps from ``start`` with the stored noises. ``on_step(i, x,
    denoised)`` is called before each step."""
    x = start
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if on_step is not None:
            on_step(i, x, denoised)
        x = take_step(step_parts(kind, x, denoised, sigmas[i], sigmas[i + 1], eta, s_noise, flow), noises[i])
    return x


def relative_error(x, reference):
    return float((x - reference).float().pow(2).mean().sqrt() / reference.float().pow(2).mean().sqrt().clamp_min(1e-12))
