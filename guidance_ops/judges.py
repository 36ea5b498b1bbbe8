"""Judges: what reads a sampling run's clean estimates and says, as log-probabilities over named labels, what they
show. Guidance that steers by a classifier (GFCG, dynamic CFG) takes one; a judge never gives gradients.

A judge reads either pixels (the estimate decoded by the VAE, [B, 3, H, W] in 0..1) or the sampled model itself
(the Diffusion Classifier over a list of prompts, whose denoising errors the host computes).
"""
import torch

from . import diffusion_classifier as dc
from .digit_oracle import DIGITS, network_logits
from .digit_oracle import load as load_digit_oracle


class JudgeError(ValueError):
    """A judge set up or used in a way it cannot work; the message names the fix."""


class Judge:
    """The base of every judge: ``labels`` and what it ``reads``. A judge that reads pixels also has
    ``log_probs(pixels) -> [B, K]``; one that reads the model is evaluated by the host."""
    labels = ()
    reads = "pixels"


class DigitOracleJudge(Judge):
    """The pack's digit oracle (for the reference models): which digit an image shows."""
    labels = DIGITS
    differentiable = True

    def __init__(self):
        self.network = load_digit_oracle()

    def logits(self, pixels):
        return network_logits(self.network.to(pixels.device), pixels.float()).float()

    def log_probs(self, pixels):
        return torch.log_softmax(self.logits(pixels), dim=1)


class PromptJudge(Judge):
    """The Diffusion Classifier over ``prompts``, evaluated with the sampled model: each estimate is noised at
    ``timesteps`` evenly spaced timesteps with noise shared by every prompt, and a prompt's log-probability is
    its negative denoising error, normalised over the prompts (Li et al. 2023, eq. 5: p(c|x) ∝
    exp(-E_{t,eps} ||eps - eps(x_t, c)||^2)). The node that makes it sets ``conditionings``: the prompts encoded,
    in a holder whose ``value`` is the list."""
    reads = "model"

    def __init__(self, prompts, timesteps, seed):
        if len(prompts) < 2:
            raise JudgeError("write at least two prompts (one per line): a prompt judge chooses between them")
        self.labels = tuple(prompts)
        self.timesteps = dc.timestep_grid(timesteps)
        self.seed = seed
        self._noise = {}

    def noise(self, shape):
        """The (t, eps) pairs' noise for latents of ``shape``, drawn once per shape (every step reuses it)."""
        shape = tuple(shape)
        if shape not in self._noise:
            self._noise[shape] = dc.shared_noise(len(self.timesteps), shape, self.seed)
        return self._noise[shape]


def log_probs_from_errors(errors):
    """``errors[B, K]``: per image and prompt, the squared error summed over the latent's elements and averaged
    over the (t, eps) pairs."""
    return torch.log_softmax(-errors.float(), dim=1)


def summed_squared_error(prediction, target):
    """Per row, the squared error summed over elements (the norm in the paper's eq. 5)."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).sum(1)


def target_index(judge, target):
    """The label ``target`` names: its text (case-insensitive) or its number counted from 1."""
    text = str(target).strip()
    lowered = [label.lower() for label in judge.labels]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.isdigit() and 1 <= int(text) <= len(judge.labels):
        return int(text) - 1
    listing = ", ".join(f"{i + 1}: {label}" for i, label in enumerate(judge.labels))
    raise JudgeError(f"the target '{text}' is none of the judge's labels; name one of them or give its number "
                     f"({listing})")
