"""Scorers: the reward that inference-time search (tree sampling, beam search, best-of-N) maximises and that
classifier guidance (EluCD) climbs. A scorer maps images ``[B, 3, H, W]`` in 0..1 to one number per image, higher
is better; every scorer here returns a log-probability (of the prompted digit and colour, or of a judge's target
label), so scores of different images compare, and a perfect image scores 0.

``differentiable`` says whether ``score`` can be differentiated with respect to the pixels (classifier guidance
needs it; search does not).
"""
import re

import torch
import torch.nn.functional as F

from . import judges
from .digit_oracle import COLOURS, DIGITS, ink_map, network_logits
from .digit_oracle import load as load_digit_oracle

# Chromaticity cosines lie in [-1, 1]; at 0.1 a colour 20 degrees of hue away from the prompted one costs about
# one nat, and the palette's neighbours (red / purple, yellow / green) stay distinguishable.
COLOUR_TEMPERATURE = 0.1
INK_THRESHOLD = 0.5


class ScorerError(ValueError):
    """A scorer set up or used in a way it cannot work; the message names the fix."""


class Scorer:
    """The base of every scorer; each one defines ``score(pixels) -> [B]``."""
    differentiable = False
    reads = "pixels"

    def describe(self):
        return type(self).__name__


def digit_and_colour(prompt):
    """``(digit index or None, colour name or None)`` named in ``prompt`` (the reference models' captions: "a red
    digit seven on a dark background"); a clear error when it names neither, or more than one of either."""
    words = re.findall(r"[a-z]+", prompt.lower())
    digits = sorted({DIGITS.index(w) for w in words if w in DIGITS})
    colours = sorted({w for w in words if w in COLOURS})
    if len(digits) > 1 or len(colours) > 1:
        raise ScorerError(f"the prompt '{prompt}' names several digits or colours ({', '.join(DIGITS[d] for d in digits)}"
                          f"{'; ' if digits and colours else ''}{', '.join(colours)}): the digit scorer rewards one "
                          f"digit and one colour, so name at most one of each")
    if not digits and not colours:
        raise ScorerError(f"the prompt '{prompt}' names no digit word ({', '.join(DIGITS)}) and no colour "
                          f"({', '.join(COLOURS)}): the digit scorer has nothing to reward")
    return (digits[0] if digits else None), (colours[0] if colours else None)


def foreground_colour(images, threshold=INK_THRESHOLD):
    """Mean RGB of each image's ink (pixels whose distance from the background is above ``threshold`` of the
    largest); the whole image's mean where there is no ink."""
    with torch.no_grad():
        weight = (ink_map(images) > threshold).to(images.dtype)
    total = weight.sum(dim=(2, 3))
    mean = (images * weight).sum(dim=(2, 3)) / total.clamp_min(1)
    return torch.where(total > 0, mean, images.mean(dim=(2, 3)))


def colour_logits(rgb, temperature=COLOUR_TEMPERATURE):
    """``[B, len(COLOURS)]``: the cosine between chromaticities (RGB with the grey level taken out) of the ink and
    each palette colour, divided by ``temperature``."""
    palette = torch.tensor(list(COLOURS.values()), dtype=rgb.dtype, device=rgb.device)
    centred = lambda x: F.normalize(x - x.mean(dim=-1, keepdim=True), dim=-1)  # noqa: E731
    return centred(rgb) @ centred(palette).T / temperature


def colour_log_probs(rgb, temperature=COLOUR_TEMPERATURE):
    """``[B, len(COLOURS)]``: log-softmax over the palette of ``colour_logits``."""
    return torch.log_softmax(colour_logits(rgb, temperature), dim=1)


class DigitColourScorer(Scorer):
    """The reference models' built-in scorer: log p(digit) from the pack's digit oracle plus log p(colour) of the
    ink's colour among the reference palette; either part is left out when the prompt does not name it."""
    differentiable = True

    def __init__(self, prompt):
        self.digit, self.colour = digit_and_colour(prompt)
        self.network = load_digit_oracle() if self.digit is not None else None

    def score(self, pixels):
        pixels = pixels.float()
        total = pixels.new_zeros(pixels.shape[0])
        if self.digit is not None:
            network = self.network.to(pixels.device)
            total = total + torch.log_softmax(network_logits(network, pixels), dim=1)[:, self.digit]
        if self.colour is not None:
            total = total + colour_log_probs(foreground_colour(pixels))[:, list(COLOURS).index(self.colour)]
        return total

    def logit_terms(self, pixels):
        """The classifiers the score sums, as ``[(logits [B, K], target index)]`` (classifier guidance calibrates
        each); the score is the sum of their log-softmax at the target."""
        pixels = pixels.float()
        terms = []
        if self.digit is not None:
            terms.append((network_logits(self.network.to(pixels.device), pixels).float(), self.digit))
        if self.colour is not None:
            terms.append((colour_logits(foreground_colour(pixels)), list(COLOURS).index(self.colour)))
        return terms

    def describe(self):
        parts = [f"digit {DIGITS[self.digit]}"] if self.digit is not None else []
        return "digit oracle: " + " + ".join(parts + ([f"colour {self.colour}"] if self.colour else []))


class JudgeScorer(Scorer):
    """A judge's log-probability of one of its labels (a Digit Oracle Judge, a CLIP Judge). Judges that read the
    sampled model (the Prompt Judge) cannot score finished images, and are refused."""

    def __init__(self, judge, target):
        if judge.reads != "pixels":
            raise ScorerError(f"this judge ({type(judge).__name__}) reads the sampled model, not images, so it cannot "
                              f"score a finished sample: use a judge that reads pixels (TrainFree Digit Oracle Judge, "
                              f"TrainFree CLIP Judge) or TrainFree Digit Scorer")
        self.judge = judge
        self.target = judges.target_index(judge, target)
        self.differentiable = bool(getattr(judge, "differentiable", False))

    def score(self, pixels):
        return self.judge.log_probs(pixels)[:, self.target]

    def logit_terms(self, pixels):
        """The judge's logits where it has them, else its log-probabilities (its logits up to one constant per
        image)."""
        logits = getattr(self.judge, "logits", None)
        return [((logits or self.judge.log_probs)(pixels), self.target)]

    def describe(self):
        return f"{type(self.judge).__name__}: {self.judge.labels[self.target]}"
