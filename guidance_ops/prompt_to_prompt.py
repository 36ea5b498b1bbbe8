"""Prompt-to-Prompt (Hertz et al. 2022, arXiv 2208.01626): edit an image by editing its prompt, with the
source image's attention maps injected into the edited (target) generation.

Two generations share their starting noise: the source prompt's and the target prompt's. During the first
``cross_replace`` fraction of the steps, the target's cross-attention maps (image tokens -> text tokens) are taken
from the source (paper eq. 4 via ``Edit``); during the first ``self_replace`` fraction its self-attention maps too,
on the coarse layers only. Modes (paper sec. 3.2):

- word swap: the prompts differ in swapped words of equal token count, so the whole map is injected;
- refinement: words added or removed; tokens the target shares with the source (found by a global alignment of
  the two token sequences) take the source's map, new tokens keep their own (``alphas``);
- reweight: the target's attention on chosen tokens is scaled (the paper's "attention re-weighting"). As in the
  official code, the scale multiplies the map after the replacement, within the cross-replacement steps, and the
  map is not renormalised.

Local blend (official ``LocalBlend``): after each step the target latent keeps the source latent outside a mask
made from the cross-attention maps of chosen words (summed over those tokens, averaged over heads and layers at a
coarse resolution, accumulated over the steps so far, 3x3 max-pooled, upsampled, divided by its max,
thresholded), the union of the source words' and the target words' masks.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("word swap", "refinement", "reweight")


@dataclass(frozen=True)
class PromptToPromptPlan:
    """What to inject, for a target prompt of ``len(mapper)`` tokens.

    ``mapper[j]``: the source token whose attention map target token ``j`` takes; ``alphas[j]``: 1 where it does,
    0 for a new token that keeps its own map. ``cross_replace`` / ``self_replace``: fractions of the steps, from
    the first, with cross- / self-attention replacement. Self-attention is replaced only in layers of at most
    ``self_max_fraction`` of the latent's pixels (the official code: maps of at most 16x16 tokens on SD's 64x64
    latents, i.e. 1/16). ``reweight_tokens`` (target positions) get their attention multiplied by
    ``reweight_scale``. ``blend_source_tokens`` / ``blend_target_tokens``: positions of the local-blend words.
    """
    mode: str
    mapper: tuple
    alphas: tuple
    cross_replace: float = 0.8
    self_replace: float = 0.4
    self_max_fraction: float = 1 / 16
    reweight_tokens: tuple = ()
    reweight_scale: float = 1.0
    blend_source_tokens: tuple = ()
    blend_target_tokens: tuple = ()
    blend_threshold: float = 0.3

    @property
    def tokens(self):
        return len(self.mapper)

    @property
    def reweights(self):
        return bool(self.reweight_tokens) and self.reweight_scale != 1.0

    @property
    def injects_whole_map(self):
        """True when the target's cross-attention map becomes the source's as it is (no alignment, no reweight):
        the attention can then run on the source's queries and keys, with no explicit map."""
        return (all(a == 1.0 for a in self.alphas) and self.mapper == tuple(range(len(self.mapper)))
                and not self.reweights)

    @property
    def blends(self):
        return bool(self.blend_source_tokens or self.blend_target_tokens)


def make_plan(source_ids, target_ids, mode, cross_replace=0.8, self_replace=0.4, self_max_fraction=1 / 16,
              reweight_tokens=(), reweight_scale=1.0, blend_source_tokens=(), blend_target_tokens=(),
              blend_threshold=0.3):
    """A plan from the two prompts' token ids, as the text encoder sees them (start, end and padding included;
    both lists must have the same length, that of the conditioning's token axis)."""
    source_ids, target_ids = [int(i) for i in source_ids], [int(i) for i in target_ids]
    if mode not in MODES:
        raise ValueError(f"unknown prompt-to-prompt mode '{mode}': use one of {', '.join(MODES)}")
    if len(source_ids) != len(target_ids):
        raise ValueError(f"the source prompt encodes to {len(source_ids)} tokens and the target to "
                         f"{len(target_ids)}: their conditionings must have the same length to be batched together; "
                         f"shorten the longer prompt so both fit the same number of 77-token chunks")
    for name, value in (("cross_replace", cross_replace), ("self_replace", self_replace),
                        ("self_max_fraction", self_max_fraction), ("blend_threshold", blend_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is {value}; it must lie in [0, 1]")
    for name, positions in (("reweight_tokens", reweight_tokens), ("blend_target_tokens", blend_target_tokens),
                            ("blend_source_tokens", blend_source_tokens)):
        bad = [p for p in positions if not 0 <= p < len(target_ids)]
        if bad:
            raise ValueError(f"{name} holds positions {bad} outside the prompt's {len(target_ids)} tokens")
    if mode == "refinement":
        mapper, alphas = align_tokens(source_ids, target_ids)
    else:
        _check_same_positions(source_ids, target_ids, mode)
        mapper, alphas = tuple(range(len(target_ids))), (1.0,) * len(target_ids)
    if mode == "reweight" and not reweight_tokens:
        raise ValueError("reweight mode needs the tokens to reweight: name at least one word of the target prompt")
    return PromptToPromptPlan(mode, mapper, alphas, cross_replace, self_replace, self_max_fraction,
                              tuple(reweight_tokens), float(reweight_scale), tuple(blend_source_tokens),
                              tuple(blend_target_tokens), blend_threshold)


def _check_same_positions(source_ids, target_ids, mode):
    """Word swap (and reweight without refinement) inject the map token by token, so every replaced word must take
    as many tokens as its replacement: each gap between the aligned common tokens has equal length in both."""
    previous = (-1, -1)
    for i, j in _matches(source_ids, target_ids) + [(len(source_ids), len(target_ids))]:
        dropped, added = i - previous[0] - 1, j - previous[1] - 1
        if dropped != added:
            raise ValueError(
                f"{mode} needs every changed word to take as many tokens as the word it replaces, but "
                f"{dropped} source token(s){_at(previous[0] + 1, i)} became {added} target token(s)"
                f"{_at(previous[1] + 1, j)}: use refinement mode for edits that add or remove words")
        previous = (i, j)


def _at(start, stop):
    if stop <= start:
        return ""
    return f" at position {start}" if stop == start + 1 else f" at positions {start}-{stop - 1}"


def align_tokens(source_ids, target_ids):
    """``(mapper, alphas)`` of a refinement: a global alignment of the token sequences (match +1, gap 0, as the
    official seq_aligner scores it, so only equal tokens pair up); a target token paired with a source token
    takes that token's map (alpha 1), an unpaired one is new (alpha 0, mapper 0)."""
    mapper, alphas = [0] * len(target_ids), [0.0] * len(target_ids)
    for i, j in _matches(source_ids, target_ids):
        mapper[j], alphas[j] = i, 1.0
    return tuple(mapper), tuple(alphas)


def _matches(source, target):
    """Pairs (source index, target index) of a longest common subsequence. In ties the trace back (from the end)
    skips a target token first, then a source token, as the official aligner does, so runs of equal tokens (the
    padding) pair up from their start."""
    n, m = len(source), len(target)
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            best[i][j] = max(best[i][j - 1], best[i - 1][j],
                             best[i - 1][j - 1] + 1 if source[i - 1] == target[j - 1] else -1)
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if best[i][j] == best[i][j - 1]:
            j -= 1
        elif best[i][j] == best[i - 1][j]:
            i -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    return pairs[::-1]


def word_positions(prompt_ids, word_ids):
    """Positions in ``prompt_ids`` of every occurrence of the word, given as its token ids (a list of ints) or as
    several spellings (a list of such lists)."""
    spellings = [word_ids] if word_ids and isinstance(word_ids[0], int) else list(word_ids)
    found = set()
    for spelling in spellings:
        size = len(spelling)
        for start in range(len(prompt_ids) - size + 1) if size else ():
            if list(prompt_ids[start:start + size]) == list(spelling):
                found.update(range(start, start + size))
    if not found:
        raise ValueError(f"the word (tokens {spellings}) does not occur in the prompt; name a word of that prompt")
    return tuple(sorted(found))


def in_window(fraction, step, steps):
    """Whether ``step`` (0-based, of ``steps``) lies in the first ``fraction`` of the steps: step < int(fraction *
    steps), as the official code counts (with a tolerance for fractions like 0.29 that float arithmetic puts just
    below the integer)."""
    return step < int(fraction * steps + 1e-9)


def replace_cross(source_probs, target_probs, plan):
    """The target's cross-attention probabilities in a replacement step; [..., query tokens, key tokens]."""
    index = torch.tensor(plan.mapper, device=source_probs.device)
    alphas = torch.tensor(plan.alphas, dtype=target_probs.dtype, device=target_probs.device)
    out = source_probs.index_select(-1, index) * alphas + target_probs * (1 - alphas)
    return reweight(out, plan.reweight_tokens, plan.reweight_scale) if plan.reweights else out


def reweight(probs, tokens, scale):
    """Scale the attention given to the key tokens ``tokens`` (the official equalizer; no renormalisation)."""
    factor = torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    factor[list(tokens)] = scale
    return probs * factor


def map_size(tokens, height, width):
    """(h, w) of a UNet level holding ``tokens`` image tokens for a latent of height x width (each level halves,
    rounding up)."""
    h, w = height, width
    while h * w > tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} attention tokens are no UNet level of a {height}x{width} latent")
    return h, w


def blend_level(token_counts, height, width):
    """The level whose maps make the blend mask: the one nearest a quarter of the latent's side (the official
    16x16 maps of SD's 64x64 latents)."""
    goal = height * width / 16
    return min(token_counts, key=lambda n: (abs(math.log(n / goal)), -n))


def word_mask(maps, tokens, size, threshold):
    """Mask [rows, 1, H, W] of the words at ``tokens``: ``maps`` [rows, h, w, key tokens] are the cross-attention
    maps averaged over heads and layers; they are summed over the word's tokens, max-pooled 3x3, upsampled
    (nearest) to ``size``, divided by their max and thresholded."""
    if not tokens:
        return torch.zeros((maps.shape[0], 1) + tuple(size), dtype=torch.bool, device=maps.device)
    word = maps[..., list(tokens)].sum(-1).unsqueeze(1)
    word = F.max_pool2d(word, 3, stride=1, padding=1)
    word = F.interpolate(word, size=tuple(size))
    peak = word.amax(dim=(2, 3), keepdim=True)
    return (word > threshold * peak) & (peak > 0)


def blend_mask(source_maps, target_maps, plan, size):
    """The local-blend mask [rows, 1, H, W] (float 0 / 1): the source words' mask on the source maps united with
    the target words' mask on the target maps."""
    mask = (word_mask(source_maps, plan.blend_source_tokens, size, plan.blend_threshold)
            | word_mask(target_maps, plan.blend_target_tokens, size, plan.blend_threshold))
    return mask.to(source_maps.dtype)


def blend(source_x, target_x, mask):
    """The target latent kept equal to the source latent outside ``mask``: source + mask * (target - source), by
    torch.lerp, which is exact at both ends (mask 0 gives the source, 1 the target, bit for bit)."""
    return torch.lerp(source_x, target_x, mask.to(target_x.dtype).expand_as(target_x))
