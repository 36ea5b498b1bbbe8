"""Dynamic classifier-free guidance from online feedback (Papalampidi, Wiles, Ktena, Shtedritski, Bugliarello,
Kajic, Albuquerque, Nematzadeh, ICLR 2026, arXiv 2509.16131; no public code).

At each sampling step a set of candidate guidance scales is tried on the conditional and unconditional
predictions the sampler already has (no extra model pass): each candidate gives a guided one-step estimate of the
clean image, evaluators score the estimates, and the best-scoring scale is used for that step, greedily. The
choice is made per sample, so every image of a batch gets its own schedule, as in the paper.

The paper's evaluators are small networks trained on latents (CLIP alignment, a fidelity discriminator, a
human-preference reward, task-specific ones) with adaptive weights. Here the evaluators are judges
(``judges.py``): fixed classifiers whose log-probability of a target label is the score, combined with fixed
weights.

On ComfyUI's post-CFG arguments the two predictions are denoised estimates, so candidate ``w`` gives the clean
estimate ``uncond + w (cond - uncond)`` directly; for the eps / v / flow outputs the same combination holds
because the denoised estimate is affine in the network output with the same coefficients for both passes.
"""
import math

import torch

MAX_CANDIDATES = 16


class CandidateError(ValueError):
    """Candidate scales or scoring weights that cannot work; the message names the fix."""


def parse_scales(text):
    """``"1, 3, 5"`` -> ``(1.0, 3.0, 5.0)``: finite, non-negative, distinct, in ascending order."""
    parts = [part.strip() for part in str(text).replace(";", ",").split(",") if part.strip()]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise CandidateError(f"candidate_scales must be a comma-separated list of guidance scales, e.g. "
                             f"'1, 3, 5, 7.5' (got {text!r})") from None
    if not values:
        raise CandidateError("candidate_scales is empty: give at least one guidance scale, e.g. '1, 3, 5, 7.5'")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise CandidateError(f"candidate_scales holds {bad[0]!r}: every scale must be a finite number >= 0")
    scales = tuple(sorted(set(values)))
    if len(scales) > MAX_CANDIDATES:
        raise CandidateError(f"candidate_scales holds {len(scales)} distinct scales; at most {MAX_CANDIDATES} "
                             f"(each one is decoded and judged at every step)")
    return scales


def candidate_estimates(cond, uncond, scales):
    """``[S * B, ...]``: the guided clean estimate of every candidate scale, candidate-major (rows
    ``s * B .. s * B + B - 1`` belong to ``scales[s]``), in ComfyUI's own CFG operation order."""
    return torch.cat([uncond + (cond - uncond) * float(w) for w in scales], dim=0)


def weighted_score(log_probs, targets, weights, candidates):
    """``[S, B]``: per candidate and row, ``sum_i weights[i] * log_probs[i][:, targets[i]]``.

    ``log_probs`` holds one ``[S * B, K_i]`` tensor per judge (rows candidate-major, as
    ``candidate_estimates`` lays them out)."""
    if not len(log_probs) == len(targets) == len(weights):
        raise CandidateError("give one target and one weight per judge")
    total = None
    for lp, target, weight in zip(log_probs, targets, weights):
        term = float(weight) * lp[:, target].float().reshape(candidates, -1)
        total = term if total is None else total + term
    return total


def choose(scores, scales, preferred):
    """Index (into ``scales``) of the best-scoring candidate per row of ``scores[S, B]``.

    Exact ties (a judge that is certain gives log p = 0 to several candidates) go to the ``preferred`` scale
    (the sampler's own cfg) when it is among the tied, else to the smallest tied scale: without evidence for a
    change, guide as the user asked, or as little as the evidence allows."""
    scores = scores.float()
    best = scores.max(dim=0).values
    tied = scores == best  # [S, B]
    preferred_at = [i for i, w in enumerate(scales) if w == preferred]
    picks = tied.float().argmax(dim=0)  # the first tied candidate: the smallest scale (scales ascend)
    if preferred_at:
        picks = torch.where(tied[preferred_at[0]], torch.full_like(picks, preferred_at[0]), picks)
    return picks


def guided(cond, uncond, row_scales):
    """CFG with one scale per row (``row_scales[B]``), in ComfyUI's own operation order."""
    # a half-precision product with a Python scale is computed in float32 and rounded once: do the same per row
    opmath = torch.float64 if cond.dtype == torch.float64 else torch.float32
    w = row_scales.to(cond.device, opmath).reshape(-1, *([1] * (cond.ndim - 1)))
    return uncond + ((cond - uncond).to(opmath) * w).to(cond.dtype)
