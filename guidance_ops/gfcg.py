"""Gradient-Free Classifier Guidance (Shenoy, Pan, Balakrishnan, Cheng, Jeon, Yang, Kim, WACV 2026, arXiv
2411.15393). A classifier reads the current clean estimate in inference mode only; the class it most confuses
the sample with becomes the reference, and the conditional prediction is pushed away from that class's
prediction: D = D_guided + s (D(c) - D(c_ref)), with CFG's unconditional reference replaced by a conditional one.

What the paper states (abstract and method summary): the classifier runs without gradients on the x0 estimate at
each step; a time-adaptive reference class and an adaptive scale from the classifier's confidence; the
extrapolation away from the reference class's prediction; complementary to CFG and autoguidance. The exact
reference rule and scale schedule were not readable here, so these are this pack's choices: the reference is the
most probable class other than the target, and the scale is s = scale * p_ref / (p_target + p_ref), which is 0 when
the classifier is sure of the target against its strongest rival, scale / 2 when it cannot tell them apart, and
approaches scale when the rival wins.
"""
import torch


def reference_classes(log_probs, target):
    """Per row: the most probable class other than ``target``, and the probabilities of the target and of it."""
    others = log_probs.clone()
    others[:, target] = -torch.inf
    reference = others.argmax(dim=1)
    probs = log_probs.exp()
    return reference, probs[:, target], probs.gather(1, reference[:, None])[:, 0]


def adaptive_scale(p_target, p_reference, scale):
    return scale * p_reference / (p_target + p_reference).clamp_min(torch.finfo(p_target.dtype).tiny)


def guide(denoised, cond, reference_prediction, scales):
    """The guided prediction, one scale per row."""
    shape = (-1,) + (1,) * (cond.ndim - 1)
    return denoised + scales.to(cond.dtype).reshape(shape) * (cond - reference_prediction)
