"""The reference model's data: scikit-learn's 1,797 real handwritten digit scans (``load_digits``, 8x8 pixels,
16 grey levels, shipped inside the scikit-learn wheel), upscaled to 128x128 and rendered in a foreground colour
on a dark or light background with a small random shift, captioned like "a red digit seven on a dark background".

Everything is a pure function of a seed, so training, the quality harness and the tests see the same data.
"""
import torch
import torch.nn.functional as F

from guidance_ops.digit_oracle import COLOURS
from guidance_ops.digit_oracle import DIGITS as WORDS

SIZE = 128          # image side; latents are SIZE / 8 = 16
GLYPH = 88          # side of the upscaled 8x8 scan inside the canvas
MAX_SHIFT = 10      # pixels, each axis
BACKGROUNDS = {"dark": (0.03, 0.15), "light": (0.80, 0.95)}  # grey-level ranges
TEST_FRACTION = 0.2


def load_scans():
    """``(scans [1797, 8, 8] in 0..1, labels [1797])`` from scikit-learn."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32) / 16.0, torch.tensor(digits.target, dtype=torch.long)


def split(labels, seed=0):
    """Stratified train / held-out test indices (the test split is never trained on)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for digit in range(10):
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def caption(digit, colour, background):
    return f"a {colour} digit {WORDS[digit]} on a {background} background"


def all_captions():
    return [caption(d, c, b) for d in range(10) for c in COLOURS for b in BACKGROUNDS]


def ink(scans, shifts):
    """The digits' ink maps on the canvas: ``[N, 1, SIZE, SIZE]`` in 0..1."""
    glyph = F.interpolate(scans[:, None], size=(GLYPH, GLYPH), mode="bicubic", align_corners=False).clamp(0, 1)
    pad = (SIZE - GLYPH) // 2
    canvas = F.pad(glyph, (pad, SIZE - GLYPH - pad, pad, SIZE - GLYPH - pad))
    return torch.stack([torch.roll(c, shifts=(int(dy), int(dx)), dims=(1, 2)) for c, (dy, dx) in zip(canvas, shifts)])


def render(scans, colours, background_levels, shifts):
    """RGB images ``[N, 3, SIZE, SIZE]`` in 0..1: background grey blended with the colour through the ink map."""
    alpha = ink(scans, shifts)
    fg = torch.as_tensor(colours, dtype=torch.float32)[:, :, None, None]
    bg = torch.as_tensor(background_levels, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 1, 1)
    return bg * (1 - alpha) + fg * alpha


def examples(scans, labels, indices, count, seed):
    """``count`` random renderings of the scans at ``indices``: (images, captions, digits, colours, backgrounds)."""
    g = torch.Generator().manual_seed(seed)
    pick = indices[torch.randint(len(indices), (count,), generator=g)]
    colour_names = list(COLOURS)
    colour_idx = torch.randint(len(colour_names), (count,), generator=g)
    bg_names = list(BACKGROUNDS)
    bg_idx = torch.randint(len(bg_names), (count,), generator=g)
    levels = [BACKGROUNDS[bg_names[i]][0] + float(torch.rand((), generator=g)) *
              (BACKGROUNDS[bg_names[i]][1] - BACKGROUNDS[bg_names[i]][0]) for i in bg_idx]
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (count, 2), generator=g)
    images = render(scans[pick], [COLOURS[colour_names[i]] for i in colour_idx], levels, shifts)
    digits = labels[pick]
    colours = [colour_names[i] for i in colour_idx]
    backgrounds = [bg_names[i] for i in bg_idx]
    captions = [caption(int(d), c, b) for d, c, b in zip(digits, colours, backgrounds)]
    return images, captions, digits, colours, backgrounds
