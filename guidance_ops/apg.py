"""Adaptive Projected Guidance (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416, Algorithm 1).

On the denoised (x0) predictions D_c, D_u, with Delta = D_c - D_u:

1. reverse momentum (optional): m_t = Delta_t + beta * m_{t+1}, then Delta <- m_t   (beta < 0)
2. norm clip per sample: Delta <- Delta * min(1, r / ||Delta||)                    (r = inf: off)
3. projection onto D_c: Delta_par = (<Delta, D_c> / ||D_c||^2) D_c, Delta_perp = Delta - Delta_par
4. D_APG = D_c + (w - 1) * (Delta_perp + eta * Delta_par)

With eta = 1, r = inf and no momentum this is CFG with scale w. Norms and inner products run per sample over
every non-batch dim, so [B, C, H, W] images and [B, C, T, H, W] videos are treated alike. The paper asks for x0
space: at high noise the eps predictions are both close to the noise and the projection means nothing.
"""
import math

import torch

# The paper recommends eta = 0; (r, beta) come from its per-model table, of which techniques.md §2 quotes the
# SDXL row.
PRESETS = {"sdxl": {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}}


def wide_dtype(device):
    """float64 for reductions, except on Apple MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _per_row(values, like):
    """Shape per-row factors ``[rows]`` to broadcast against ``like``, repeating them if ``like`` has more rows."""
    values = values.repeat_interleave(like.shape[0] // values.shape[0])
    return values.view(-1, *([1] * (like.ndim - 1)))


class MomentumBuffer:
    """The running average of step 1; one per sampling run (call ``reset`` or make a new one between runs).

    ``beta = 0`` is memoryless: ``update`` hands back its input.
    """

    def __init__(self, beta):
        self.beta = float(beta)
        self.average = None

    def update(self, delta):
        if self.average is None or self.beta == 0.0:
            self.average = delta
        elif self.average.shape != delta.shape:
            raise ValueError(f"momentum holds a {tuple(self.average.shape)} average but got {tuple(delta.shape)}; "
                             "reset it between runs whose batch or latent size differ")
        else:
            self.average = delta + self.beta * self.average
        return self.average

    def reset(self):
        self.average = None


def clip_norm(delta, threshold):
    """Step 2: scale each sample of ``delta`` down to L2 norm ``threshold`` if it is longer (``inf``: untouched).

    When it clips, the result is in float64 (float32 on MPS).
    """
    if math.isinf(threshold):
        return delta
    if not threshold > 0:
        raise ValueError(f"the norm threshold must be positive (inf disables it), got {threshold}")
    wide = delta.to(wide_dtype(delta.device))
    norm = wide.reshape(delta.shape[0], -1).norm(dim=1)
    return wide * _per_row((threshold / norm).clamp(max=1.0), wide)


def parallel_component(v, onto, samples=None):
    """Step 3: the part of ``v`` parallel to ``onto``, per sample, in float64 (float32 on MPS).

    ``samples`` is the number of independent samples when rows are not samples (FDG folds video frames into the
    batch): each sample's rows must be consecutive. A sample whose ``onto`` is zero has no parallel part.
    """
    samples = v.shape[0] if samples is None else samples
    wide = wide_dtype(v.device)
    v, onto = v.to(wide), onto.to(wide)
    dot = (v * onto).reshape(samples, -1).sum(dim=1)
    length2 = onto.reshape(samples, -1).square().sum(dim=1)
    return onto * _per_row(dot / length2.clamp_min(torch.finfo(wide).tiny), onto)


def apg(cond, uncond, scale, eta=0.0, norm_threshold=math.inf, momentum=None):
    """D_APG of Algorithm 1 for denoised predictions ``cond`` (D_c) and ``uncond`` (D_u); ``scale`` is w.

    ``momentum`` is the run's ``MomentumBuffer`` (None: no momentum). The result is in the input dtype. It is
    computed as CFG plus the correction (w - 1)(Delta' - Delta), which equals D_c + (w - 1) Delta' and is bit for
    bit ComfyUI's CFG ``uncond + (cond - uncond) * scale`` whenever Delta' = Delta.
    """
    delta = cond - uncond
    guided = uncond + delta * scale
    update = momentum.update(delta) if momentum is not None else delta
    update = clip_norm(update, norm_threshold)
    if eta != 1.0:
        update = update - (1.0 - eta) * parallel_component(update, cond)
    return (guided + (scale - 1.0) * (update - delta)).to(cond.dtype)


def comfy_core_apg(cond, uncond, scale, eta=1.0, norm_threshold=5.0, momentum=None):
    """The denoised result ComfyUI's core ``APG`` node (comfy_extras/nodes_apg.py) leads to at CFG scale ``scale``.

    Core rewrites the positive prediction before CFG to D_u + Delta' + Delta / w, so CFG returns D_c + w Delta':
    one guidance unit more than the paper, i.e. ``apg(.., w, ..)`` equals ``comfy_core_apg(.., w - 1, ..)``.
    Core also differs in detail: its norms and projection reduce over the last three dims (all non-batch dims
    of a 4-D latent, but per channel of a 5-D one), run in the input dtype, and a threshold of 0 disables the clip.
    Core restarts its momentum when sigma rises; here the caller owns ``momentum``.
    """
    dims = (-3, -2, -1)
    delta = cond - uncond
    update = momentum.update(delta) if momentum is not None else delta
    if norm_threshold > 0:
        norm = update.norm(p=2, dim=dims, keepdim=True)
        update = update * torch.clamp(norm_threshold / norm, max=1.0)
    unit = cond / cond.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (update * unit).sum(dim=dims, keepdim=True) * unit
    return cond + scale * (update - parallel + eta * parallel)
