import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import fdg


@st.composite
def latent_shapes(draw, min_side=3):
    """Odd and non-power-of-two sides included; the pyramid pads them and crops back."""
    b, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(min_side, 13)), draw(st.integers(min_side, 13))
    return (b, c, draw(st.integers(1, 3)), h, w) if draw(st.booleans()) else (b, c, h, w)


def randn(shape, dtype, seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


# Equal scales give CFG up to the pyramid's rounding: it runs in float32 for float32/bfloat16 input.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=st.sampled_from(list(TOLERANCE)), scale=st.floats(0, 15),
       levels=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_equal_scales_are_cfg(shape, dtype, scale, levels, seed):
    if min(shape[-2:]) <= 2 ** (levels - 1):
        levels = 2
    cond, uncond = randn(shape, dtype, seed)
    out = fdg.fdg(cond, uncond, scale, scale, levels=levels)
    assert out.shape == shape and out.dtype == dtype
    expected = (uncond.double() + (cond.double() - uncond.double()) * scale).to(dtype).double()
    tol = TOLERANCE[dtype] * (1 + scale)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@settings(max_examples=20, deadline=None)
@given(shape=latent_shapes(min_side=5), levels=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_pyramid_reconstructs_its_input(shape, levels, seed):
    x, = randn(shape[:2] + shape[-2:], torch.float64, seed, n=1)
    bands = fdg.laplacian_pyramid(fdg._pad(x, levels), levels)
    assert len(bands) == levels and bands[-1].shape[-1] * 2 ** (levels - 1) == bands[0].shape[-1]
    torch.testing.assert_close(fdg.reconstruct(bands)[..., :shape[-2], :shape[-1]], x, rtol=1e-12, atol=1e-12)


def test_a_constant_difference_is_guided_by_w_low_only():
    cond, = randn((2, 4, 9, 12), torch.float64, 0, n=1)
    uncond = cond - torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
    out = fdg.fdg(cond, uncond, w_low=3.0, w_high=11.0)
    torch.testing.assert_close(out, cond + 2.0 * (cond - uncond), rtol=1e-10, atol=1e-10)


def test_a_checkerboard_difference_is_guided_by_w_high_only():
    cond, = randn((1, 2, 8, 8), torch.float64, 1, n=1)
    idx = torch.arange(8)
    checker = ((idx.view(-1, 1) + idx.view(1, -1)) % 2 * 2 - 1).to(torch.float64)
    uncond = cond - checker
    out = fdg.fdg(cond, uncond, w_low=3.0, w_high=11.0)
    torch.testing.assert_close(out, cond + 10.0 * checker, rtol=1e-10, atol=1e-10)


# A two-level Laplacian pyramid built by hand on nested lists, the way the paper's Algorithm 2 builds it with kornia:
# blur with the 5-tap binomial filter (borders mirrored without repeating the edge), halve by averaging 2x2 blocks;
# to go up, double by bilinear interpolation between pixel centres (edges held) and blur again.
TAPS = [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16]


def _mirror(i, n):
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def blur(img):
    h, w = len(img), len(img[0])
    return [[sum(TAPS[a] * TAPS[b] * img[_mirror(y + a - 2, h)][_mirror(x + b - 2, w)]
                 for a in range(5) for b in range(5)) for x in range(w)] for y in range(h)]


def halve(img):
    return [[(img[2 * y][2 * x] + img[2 * y + 1][2 * x] + img[2 * y][2 * x + 1] + img[2 * y + 1][2 * x + 1]) / 4
             for x in range(len(img[0]) // 2)] for y in range(len(img) // 2)]


def _double_line(line):
    n = len(line)
    return [0.75 * line[j // 2] + 0.25 * line[min(max(j // 2 + (1 if j % 2 else -1), 0), n - 1)]
            for j in range(2 * n)]


def double(img):
    rows = [_double_line(row) for row in img]
    columns = [_double_line([row[x] for row in rows]) for x in range(len(rows[0]))]
    return blur([[columns[x][y] for x in range(len(columns))] for y in range(len(columns[0]))])


def combine(a, b, fa=1.0, fb=1.0):
    return [[fa * p + fb * q for p, q in zip(ra, rb)] for ra, rb in zip(a, b)]


def dot(a, b):
    return sum(p * q for ra, rb in zip(a, b) for p, q in zip(ra, rb))


def paper_fdg(cond, uncond, w_low, w_high, eta_low, eta_high):
    """FDG on one image channel: guide each band with its own scale (and parallel weight), then rebuild."""
    low_c, low_u = halve(blur(cond)), halve(blur(uncond))
    high_c, high_u = combine(cond, double(low_c), fb=-1.0), combine(uncond, double(low_u), fb=-1.0)
    guided = []
    for c, u, w, eta in ((high_c, high_u, w_high, eta_high), (low_c, low_u, w_low, eta_low)):
        delta = combine(c, u, fb=-1.0)
        along = dot(delta, c) / dot(c, c)
        delta = combine(delta, c, fb=(eta - 1.0) * along)  # parallel part kept with weight eta
        guided.append(combine(c, delta, fb=w - 1.0))
    return combine(double(guided[1]), guided[0])


@pytest.mark.parametrize("w_low, w_high, eta_low, eta_high", [(5.0, 10.0, 1.0, 1.0), (3.0, 12.0, 1.0, 1.0),
                                                            (5.0, 15.0, 0.0, 0.0), (2.0, 7.0, 0.5, 0.2)])
def test_default_fdg_matches_a_two_level_pyramid_built_by_hand(w_low, w_high, eta_low, eta_high):
    cond, uncond = randn((1, 1, 4, 6), torch.float64, 5)
    expected = paper_fdg(cond[0, 0].tolist(), uncond[0, 0].tolist(), w_low, w_high, eta_low, eta_high)
    out = fdg.fdg(cond, uncond, w_low, w_high, eta_low=eta_low, eta_high=eta_high)
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(shape=latent_shapes(), lam=st.floats(-2, 2), w_low=st.floats(1, 8), w_high=st.floats(1, 15),
       seed=st.integers(0, 2**16))
def test_fdg_apg_drops_a_difference_parallel_to_cond(shape, lam, w_low, w_high, seed):
    cond, = randn(shape, torch.float64, seed, n=1)
    out = fdg.fdg(cond, lam * cond, w_low, w_high, eta_low=0.0, eta_high=0.0)
    torch.testing.assert_close(out, cond, rtol=1e-9, atol=1e-9)


def test_fdg_apg_projects_per_sample_over_all_frames_not_per_frame():
    cond, = randn((1, 4, 3, 8, 8), torch.float64, 2, n=1)
    per_frame = torch.tensor([0.2, 1.0, -1.5], dtype=torch.float64).view(1, 1, 3, 1, 1)
    out = fdg.fdg(cond, per_frame * cond, 3.0, 8.0, eta_low=0.0, eta_high=0.0)
    assert not torch.allclose(out, cond, atol=1e-3)  # a per-frame projection would return cond


@settings(max_examples=20, deadline=None)
@given(shape=latent_shapes(), eta=st.floats(-1, 2), seed=st.integers(0, 2**16))
def test_samples_are_guided_independently(shape, eta, seed):
    cond, uncond = randn(shape, torch.float64, seed)
    out = fdg.fdg(cond, uncond, 2.0, 7.0, eta_low=eta, eta_high=eta)
    alone = torch.cat([fdg.fdg(cond[i:i + 1], uncond[i:i + 1], 2.0, 7.0, eta_low=eta, eta_high=eta)
                       for i in range(shape[0])])
    torch.testing.assert_close(out, alone, rtol=1e-12, atol=1e-12)


def test_video_with_one_frame_matches_the_image_path():
    cond, uncond = randn((2, 4, 1, 7, 10), torch.float32, 3)
    video = fdg.fdg(cond, uncond, 2.0, 9.0, eta_high=0.3)
    image = fdg.fdg(cond[:, :, 0], uncond[:, :, 0], 2.0, 9.0, eta_high=0.3)
    torch.testing.assert_close(video[:, :, 0], image, rtol=0, atol=0)


def test_rejects_latents_too_small_or_of_other_rank():
    with pytest.raises(ValueError):
        fdg.fdg(torch.zeros(1, 4, 4, 9), torch.zeros(1, 4, 4, 9), 1.0, 2.0, levels=3)
    with pytest.raises(ValueError):
        fdg.fdg(torch.zeros(4, 9, 9), torch.zeros(4, 9, 9), 1.0, 2.0)
