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


def test_paper_default_is_one_detail_band_and_one_half_resolution_band():
    assert fdg.DEFAULT_LEVELS == 2 and fdg.band_scales(5.0, 10.0) == [10.0, 5.0]
    assert fdg.band_scales(5.0, 10.0, 4) == [10.0, 10.0, 10.0, 5.0]
    bands = fdg.laplacian_pyramid(torch.zeros(1, 4, 16, 16), 2)
    assert [b.shape[-1] for b in bands] == [16, 8]
    assert fdg.PRESETS["sdxl"] == (5.0, 10.0)


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
