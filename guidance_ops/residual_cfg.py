"""Residual CFG (R-CFG) of StreamDiffusion (Kodaira et al., ICCV 2025, arXiv 2312.12491, "Residual Classifier-Free
Guidance").

R-CFG replaces the negative pass by a virtual residual noise eps_bar: the noise that separates the current latent
from a fixed clean latent X (the "anchor"). With x = alpha * x0 + sigma * eps,

    eps_bar = (x - alpha * X) / sigma,      eps = delta * eps_bar + gamma * (eps_c - delta * eps_bar)

delta moderates the virtual noise (1 by default), gamma is the guidance scale (1.2 in the reference code). The
reference code keeps eps_bar as a "stock noise" that it updates after every step; the update preserves the
relation above with X fixed (exactly when the LCM step's c_skip is 0 and c_out 1, which LCM's timesteps meet to
about 1e-5), so one anchor tensor is the whole state:

- self-negative: X is the clean img2img input that the first step's noise was added to; no extra pass at all.
- one-time negative: X is the negative prediction's x0 at the first step (one real negative pass, n + 1 passes
  for n steps); with delta = 1 that step reproduces ordinary CFG exactly.

ComfyUI hands its guidance hooks denoised (x0) predictions in its own scaled space, where alpha = 1 for EPS/V
models (x = x0 + sigma * eps) and alpha = 1 - sigma for flow (CONST) models (x = (1 - sigma) x0 + sigma * eps).
Turning delta * eps_bar into a denoised prediction, D = (x - sigma * eps) / alpha, gives the virtual negative

    D_bar = delta * X + (1 - delta) * x / alpha

and the guided result D_bar + gamma * (D_c - D_bar), the same as converting the eps formula above. With delta = 1
the model's guidance simply pushes away from the anchor. At sigma = 1 a flow latent holds no x0 at all, so
delta != 1 is undefined there.

The approximation is meant for few-step (LCM / Turbo) img2img streams; on a 20-50 step txt2img run the anchor is
the empty latent and the "negative" is not a negative prompt.
"""
import torch

GAMMA = 1.2  # reference code's default guidance scale
DELTA = 1.0


def _per_row(value, like):
    """A float or per-row tensor ``[B]`` shaped to broadcast against ``like``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value if value.ndim == 0 else value.reshape(-1, *([1] * (like.ndim - 1)))


def signal_scale(sigma, flow, like):
    """alpha in x = alpha * x0 + sigma * eps: 1 for EPS/V models in ComfyUI's space, 1 - sigma for flow models."""
    sigma = _per_row(sigma, like)
    return 1.0 - sigma if flow else torch.ones_like(sigma)


def noise_from_denoised(x, denoised, sigma, flow):
    """eps = (x - alpha * D) / sigma."""
    return (x - signal_scale(sigma, flow, x) * denoised) / _per_row(sigma, x)


def denoised_from_noise(x, noise, sigma, flow):
    """D = (x - sigma * eps) / alpha."""
    return (x - _per_row(sigma, x) * noise) / signal_scale(sigma, flow, x)


class ResidualCFGState:
    """The anchor X of one sampling run; empty until one of the ``keep_*`` methods sets it."""

    def __init__(self):
        self.anchor = None

    @property
    def ready(self):
        return self.anchor is not None

    def keep_source(self, source):
        """Self-negative: the clean input latent, in the same (model-processed) space as the sampler's x."""
        self.anchor = source.detach().clone()

    def keep_noise(self, x, sigma, noise, flow):
        """Self-negative when the first step's latent and the noise it was made with are known."""
        self.anchor = denoised_from_noise(x, noise, sigma, flow).detach()

    def keep_uncond(self, uncond):
        """One-time negative: the real negative prediction's denoised output at the first step."""
        self.anchor = uncond.detach().clone()

    def reset(self):
        self.anchor = None


def resized(latent, size):
    """``latent`` at spatial ``size`` (bilinear; itself when it has that size already)."""
    if tuple(latent.shape[2:]) == tuple(size):
        return latent
    return torch.nn.functional.interpolate(latent, size=tuple(size), mode="bilinear")


def virtual_uncond(x, sigma, anchor, delta=DELTA, flow=False):
    """D_bar, the denoised prediction the virtual residual noise delta * eps_bar stands for."""
    if delta == 1.0:
        return anchor
    if flow and float(torch.as_tensor(sigma).max()) >= 1.0:
        raise ValueError("residual CFG with delta != 1 is undefined at sigma = 1 on a flow model")
    return delta * anchor + (1.0 - delta) * x / signal_scale(sigma, flow, x)


def residual_cfg(cond, x, sigma, scale, anchor, delta=DELTA, flow=False):
    """R-CFG on the denoised conditional prediction ``cond`` at latent ``x`` and noise level ``sigma``."""
    uncond = virtual_uncond(x, sigma, anchor, delta, flow).to(cond.dtype)
    return uncond + (cond - uncond) * scale
