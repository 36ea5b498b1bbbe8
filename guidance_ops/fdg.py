"""Frequency-Decoupled Guidance (Sadat, Vontobel, Salehi, Weber 2025, arXiv 2506.19713, Algorithm 2).

Split the denoised predictions into Laplacian-pyramid bands psi_b and guide each band with its own scale:

    G_b = psi_b[D_c] + (w_b - 1) * Delta_b,   Delta_b = psi_b[D_c] - psi_b[D_u]
    D_FDG = psi^-1[{G_b}]

The pyramid is linear and its reconstruction exact, so equal scales give CFG. The paper's FDG + APG variant
replaces Delta_b by Delta_b_perp + eta_b * Delta_b_par, projected onto psi_b[D_c] (its ``parallel_weights``).

Inputs are denoised (x0) predictions, as the paper asks. A 5-D video latent gets a spatial pyramid per frame; the
FDG + APG projection still runs per sample, over all of its frames. Sides are reflect-padded at the bottom and
right to a multiple of 2**(levels - 1) and the result is cropped back.
"""
import torch
import torch.nn.functional as F
from kornia.geometry.transform import pyrdown, pyrup

from .apg import parallel_component

# Table 8 of the paper, (w_low, w_high) used in place of CFG's w for its FID numbers; the human-preference table
# uses (3, 12) for SD2.1 and SDXL and (1.5, 12) for SD3.
PRESETS = {"sd2.1": (3.0, 7.0), "sdxl": (5.0, 10.0), "sd3": (3.0, 7.0)}
DEFAULT_LEVELS = 2  # the paper's default: one detail band at full resolution and one low band at half


def band_scales(w_low, w_high, levels=DEFAULT_LEVELS):
    """Per-band values, finest first: every detail band gets ``w_high``, the coarse residual ``w_low``."""
    return [w_high] * (levels - 1) + [w_low]


def _to_images(x):
    """[B, C, H, W] as is; [B, C, T, H, W] with the frames folded into the batch (frames of a sample adjacent)."""
    if x.ndim == 4:
        return x
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w)
    raise ValueError(f"FDG takes 4-D or 5-D latents, got shape {tuple(x.shape)}")


def _from_images(images, like):
    if like.ndim == 4:
        return images
    b, c, t, h, w = like.shape
    return images.reshape(b, t, c, h, w).transpose(1, 2)


def _pad(images, levels):
    """Reflect-pad bottom and right to a multiple of 2**(levels - 1), so every pyramid level halves exactly."""
    h, w = images.shape[-2:]
    stride = 2 ** (levels - 1)
    if min(h, w) <= stride:
        raise ValueError(f"a {h}x{w} latent is too small for a {levels}-level pyramid (needs sides > {stride})")
    return F.pad(images, (0, -w % stride, 0, -h % stride), mode="reflect")


def laplacian_pyramid(images, levels):
    """Bands of [N, C, H, W] images, finest first; the last is the coarse Gaussian level. Sides must halve evenly."""
    gaussian = [images]
    for _ in range(levels - 1):
        gaussian.append(pyrdown(gaussian[-1]))
    return [fine - pyrup(coarse) for fine, coarse in zip(gaussian, gaussian[1:])] + [gaussian[-1]]


def reconstruct(bands):
    image = bands[-1]
    for band in reversed(bands[:-1]):
        image = pyrup(image) + band
    return image


def frequency_guidance(cond, uncond, scales, parallel_weights=None):
    """FDG with one scale (and optionally one parallel weight) per band, finest first; 4-D or 5-D latents.

    Computed as CFG at the coarse band's scale w_L plus the pyramid of what each band adds to it,
    psi^-1[{(w_b - 1) Delta'_b - (w_L - 1) Delta_b}]: the same sum (the pyramid is linear), but with equal scales and
    parallel weights 1 every band of the correction is exactly zero, so the result is bit for bit ComfyUI's CFG
    ``uncond + (cond - uncond) * w`` in the input dtype. The pyramid runs in float32 (float64 for float64 input); the
    result is in the input dtype.
    """
    levels = len(scales)
    parallel_weights = [1.0] * levels if parallel_weights is None else list(parallel_weights)
    if levels < 2 or len(parallel_weights) != levels:
        raise ValueError("FDG needs at least two bands and one parallel weight per band")
    work = torch.float64 if cond.dtype == torch.float64 else torch.float32
    h, w = cond.shape[-2:]
    reference = scales[-1]
    pyramids = [laplacian_pyramid(_pad(_to_images(x.to(work)), levels), levels) for x in (cond, uncond)]
    corrections = []
    for c, u, scale, eta in zip(*pyramids, scales, parallel_weights):
        delta = c - u
        guided = delta
        if eta != 1.0:
            guided = (delta - (1.0 - eta) * parallel_component(delta, c, samples=cond.shape[0])).to(work)
        corrections.append((scale - 1.0) * guided - (reference - 1.0) * delta)
    correction = _from_images(reconstruct(corrections)[..., :h, :w], cond)
    return (uncond + (cond - uncond) * reference + correction).to(cond.dtype)


def fdg(cond, uncond, w_low, w_high, levels=DEFAULT_LEVELS, eta_low=1.0, eta_high=1.0):
    """FDG on denoised predictions with ``w_low`` for the coarse band and ``w_high`` for the detail band(s).

    ``eta_low`` / ``eta_high`` are the FDG + APG parallel weights (1: plain FDG).
    """
    return frequency_guidance(cond, uncond, band_scales(w_low, w_high, levels),
                              band_scales(eta_low, eta_high, levels))
