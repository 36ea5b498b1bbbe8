"""The reductions of guidance_ops on float16 / bfloat16 latents whose float16 sums of squares overflow.

Values around 300 over 4 x 64 x 64 elements per sample: a sum of squares near 1.5e9, far above float16's largest
value 65504. Norms, projections, pyramids and statistics must run in float32 (or wider) and hand back the input
dtype; each result is compared with a float64 reference computed from the same (rounded) inputs.
"""
import pytest
import torch

from guidance_ops import apg, fdg, pag

HALF = [torch.float16, torch.bfloat16]
SHAPE = (2, 4, 64, 64)


def large_pair(dtype, seed=0):
    """cond ~ 300 +- 50 and uncond 20 +- 20 away from it, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    cond = 300.0 + 50.0 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    uncond = cond - 20.0 - 20.0 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return cond.to(dtype), uncond.to(dtype)


def assert_near(out, reference, dtype, ulps=4):
    """Within a few units of ``dtype``'s last place at the reference's magnitude."""
    assert out.dtype == dtype and torch.isfinite(out).all()
    atol = ulps * torch.finfo(dtype).eps * reference.abs().max().item()
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=atol)


def test_the_inputs_overflow_a_float16_sum_of_squares():
    cond, uncond = large_pair(torch.float16)
    for x in (cond, cond - uncond):
        assert torch.isinf(x[0].square().sum())  # a float16 result, as a naive norm would hold it
        assert x[0].double().square().sum() > 65504


def per_sample(x):
    return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("dtype", HALF)
def test_apg_clips_and_projects_in_wide_precision(dtype):
    cond, uncond = large_pair(dtype)
    scale, eta, threshold = 5.0, 0.25, 15.0
    out = apg.apg(cond, uncond, scale, eta, threshold)
    # Algorithm 1 of the paper, in float64: clip the difference to norm r, split it along D_c, reweight.
    c, u = cond.double(), uncond.double()
    delta = per_sample(c - u)
    delta = delta * (threshold / delta.norm(dim=1, keepdim=True)).clamp(max=1.0)
    unit = per_sample(c) / per_sample(c).norm(dim=1, keepdim=True)
    parallel = (delta * unit).sum(dim=1, keepdim=True) * unit
    reference = c + (scale - 1.0) * (delta - parallel + eta * parallel).reshape(SHAPE)
    assert_near(out, reference, dtype)
    clipped = apg.clip_norm(cond - uncond, threshold)
    torch.testing.assert_close(per_sample(clipped).norm(dim=1).double(), torch.full((2,), threshold,
                               dtype=torch.float64))


@pytest.mark.parametrize("dtype", HALF)
def test_fdg_pyramid_and_projection_in_wide_precision(dtype):
    cond, uncond = large_pair(dtype, seed=1)
    out = fdg.fdg(cond, uncond, 5.0, 10.0, levels=3, eta_low=0.3, eta_high=0.6)
    reference = fdg.fdg(cond.double(), uncond.double(), 5.0, 10.0, levels=3, eta_low=0.3, eta_high=0.6)
    assert_near(out, reference, dtype)


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64])
def test_fdg_with_equal_scales_is_comfyuis_cfg_bit_for_bit_in_every_dtype(dtype):
    cond, uncond = large_pair(dtype, seed=2)
    out = fdg.fdg(cond, uncond, 4.0, 4.0, levels=3)
    assert out.dtype == dtype and torch.equal(out, uncond + (cond - uncond) * 4.0)


@pytest.mark.parametrize("dtype", HALF)
def test_pag_rescale_statistics_in_wide_precision(dtype):
    guided, cond = large_pair(dtype, seed=3)
    guided = guided * 1.5
    out = pag.rescale_to_reference(guided, cond, 0.7)
    g, c = per_sample(guided.double()), per_sample(cond.double())
    # the standard deviation written out: root of the mean squared distance to the mean, with Bessel's n - 1
    std = [((x - x.mean(dim=1, keepdim=True)).square().sum(dim=1) / (x.shape[1] - 1)).sqrt() for x in (g, c)]
    ratio = (std[1] / std[0]).view(-1, 1, 1, 1)
    reference = 0.7 * guided.double() * ratio + 0.3 * guided.double()
    assert_near(out, reference, dtype)
