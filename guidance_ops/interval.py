"""Guidance interval (Kynkaanniemi, Aittala, Karras, Laine, Aila, Lehtinen, NeurIPS 2024, arXiv 2404.07724).

Guide only at mid-range noise levels and use the conditional prediction alone elsewhere:

    w(sigma) = w  if sigma_low <= sigma <= sigma_high,  else 1

Outside the interval the unconditional pass is not needed at all. The paper writes the interval half-open,
(sigma_low, sigma_high]; it is closed here so that a node's bounds are both reachable, which only matters when a
step lands exactly on sigma_low. The paper also rounds the bounds to step boundaries so that w stays constant
within one solver step (Heun, RK): callers should pick bounds between the schedule's sigmas.
"""
import math

import torch

# Paper values in EDM sigma units: (w, sigma_low, sigma_high). ComfyUI's sigma for EPS models is already the EDM
# (VE) sigma; convert flow-model bounds with ``comfy_sigma``.
PRESETS = {
    "sdxl": (16.0, 0.28, 5.42),        # 32-step Heun, chosen visually
    "edm2-s": (2.1, 0.28, 2.90),       # best FID
    "edm2-xxl": (2.0, 0.19, 1.61),     # best FID
    "dit-xl-2": (2.5, 0.34, 1.02),     # best FID
}


def guidance_active(sigma, sigma_low, sigma_high):
    """True when ``sigma`` (a float, or a tensor of per-row sigmas, which ComfyUI makes all equal) lies in the closed
    interval [sigma_low, sigma_high].

    For a tensor the bounds are rounded to its dtype first (on its device), so a bound typed in as a schedule's
    float32 sigma matches it.
    """
    if isinstance(sigma, (int, float)):
        return sigma_low <= sigma <= sigma_high
    s = torch.as_tensor(sigma).flatten()[0]
    return bool(s.new_tensor(float(sigma_low)) <= s) and bool(s <= s.new_tensor(float(sigma_high)))


def cfg(cond, uncond, scale):
    """Classifier-free guidance in ComfyUI's own operation order."""
    return uncond + (cond - uncond) * scale


def interval_cfg(cond, uncond, sigma, scale, sigma_low, sigma_high):
    """CFG inside the interval, ``cond`` outside it (where ``uncond`` may be None: it was never computed)."""
    if guidance_active(sigma, sigma_low, sigma_high):
        return cfg(cond, uncond, scale)
    return cond


def edm_sigma(sigma, flow):
    """The EDM sigma of a ComfyUI sigma: the same for EPS/V models, t / (1 - t) for flow models (t = sigma)."""
    sigma = float(sigma)
    if not flow:
        return sigma
    return math.inf if sigma >= 1.0 else sigma / (1.0 - sigma)


def comfy_sigma(sigma_edm, flow):
    """Inverse of ``edm_sigma``: the model's own sigma for an EDM sigma (s / (1 + s) for flow models)."""
    sigma_edm = float(sigma_edm)
    if not flow:
        return sigma_edm
    return 1.0 if math.isinf(sigma_edm) else sigma_edm / (1.0 + sigma_edm)


def unguided_steps(sigmas, sigma_low, sigma_high):
    """How many steps of a schedule (model evaluated at every sigma but the last) fall outside the interval:
    the unconditional passes a first-order sampler saves."""
    return sum(not guidance_active(s, sigma_low, sigma_high) for s in torch.as_tensor(sigmas).flatten()[:-1])
