"""Diffusion sampling with momentum (Wizadwongsa et al., ICLR 2024, arXiv 2307.11118; official code
github.com/sWizad/momentum-diffusion): Polyak's heavy ball (HB) on PLMS and DPM-Solver++(2M), and the generalised
heavy ball (GHVB), against the divergence artefacts of few-step high-order solvers at high guidance.

The PLMS family integrates dx/dsigma = eps with eps = (x - D) / sigma, which is DDIM's ODE in its own coordinates
(x / sqrt(abar), sigma = sqrt(1 - abar) / sqrt(abar)) and ComfyUI's latent for eps models; on ComfyUI's flow latent it
is the flow ODE. ``denoise(x, sigma)`` gives the denoised prediction; beta = 1 is the solver without momentum.
"""
import math

from .cfgpp import half_log_snr


def adams_bashforth(history, order, beta=1.0):
    """The official ``AdamBmixer``: Adams-Bashforth of up to ``order`` past values (newest last), generalised by
    beta for GHVB and divided by it; beta = 1 gives the classic coefficients (3, -1) / 2, (23, -16, 5) / 12, ..."""
    b = beta
    e = history[::-1]  # e[0] newest
    order = min(order, len(e))
    if order == 1:
        mixed = b * e[0]
    elif order == 2:
        mixed = ((2 + b) * e[0] - (2 - b) * e[1]) / 2
    elif order == 3:
        mixed = ((18 + 5 * b) * e[0] - (24 - 8 * b) * e[1] + (6 - b) * e[2]) / 12
    elif order == 4:
        mixed = ((46 + 9 * b) * e[0] - (78 - 19 * b) * e[1] + (42 - 5 * b) * e[2] - (10 - b) * e[3]) / 24
    elif order == 5:
        mixed = ((1650 + 251 * b) * e[0] - (3420 - 646 * b) * e[1] + (2880 - 264 * b) * e[2]
                 - (1380 - 106 * b) * e[3] + (270 - 19 * b) * e[4]) / 720
    else:
        raise ValueError(f"order {order} is not supported: choose 1 to 5")
    return mixed / b


def check(order, beta):
    if order not in range(1, 6):
        raise ValueError(f"order {order} is not supported: choose 1 to 5")
    if not 0 < beta <= 1:
        raise ValueError(f"beta {beta} is outside (0, 1]: 1 is the solver without momentum, the paper uses 0.7-0.9")


def sample_plms(denoise, x, sigmas, order=4, beta=1.0, generalised=False, callback=None):
    """PLMS with heavy-ball momentum: e_n = AB(eps history), v_n = (1 - beta) v_{n-1} + beta e_n (v_0 = eps_0),
    x_{n+1} = x_n + (sigma_{n+1} - sigma_n) v_n. ``generalised`` (GHVB): the momentum acts on eps, v_n =
    (1 - beta) v_{n-1} + beta eps_n, and the update is AB over the v history with beta's coefficients."""
    check(order, beta)
    history, velocity = [], None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        eps = (x - denoised) / sigma
        if generalised:
            velocity = eps if velocity is None else (1 - beta) * velocity + beta * eps
            history = (history + [velocity])[-order:]
            update = adams_bashforth(history, order, beta)
        else:
            history = (history + [eps])[-order:]
            mixed = adams_bashforth(history, order)
            velocity = eps if velocity is None else velocity
            velocity = update = (1 - beta) * velocity + beta * mixed
        x = x + (sigma_next - sigma) * update
    return x


def sample_dpmpp_2m(denoise, x, sigmas, alpha_of, beta=1.0, callback=None):
    """DPM-Solver++(2M) with heavy-ball momentum on its data-prediction combination (the official
    ``MomentumDPMSolverMultistepScheduler``): v = (1 - beta) v + beta (D_0 + (D_0 - D_-1) / (2 r)) from the first
    second-order step on, x' = (s' / s) x - a' (e^-h - 1) v, with h the step in half log-SNR. The first step and the
    last (to sigma 0) are first order, as ComfyUI's dpmpp_2m takes them."""
    check(2, beta)
    previous, previous_h, velocity = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            return denoised
        alpha, alpha_next = alpha_of(sigma), alpha_of(sigma_next)
        h = half_log_snr(sigma_next, alpha_next) - half_log_snr(sigma, alpha)
        combined = denoised
        if previous is not None:
            combined = denoised + (denoised - previous) / (2 * previous_h / h)
            velocity = combined if velocity is None else (1 - beta) * velocity + beta * combined
            combined = velocity
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * combined
        previous, previous_h = denoised, h
    return x
