import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import interval

SCHEDULE = [14.61, 9.0, 5.42, 3.1, 1.2, 0.28, 0.1, 0.0]


@st.composite
def latent_shapes(draw):
    b, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    return (b, c, draw(st.integers(1, 3)), h, w) if draw(st.booleans()) else (b, c, h, w)


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       scale=st.floats(0, 20), seed=st.integers(0, 2**16))
def test_interval_covering_the_schedule_is_cfg_bit_for_bit(shape, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    expected = uncond + (cond - uncond) * scale
    for sigma in SCHEDULE[:-1]:
        s = torch.full((shape[0],), sigma)
        out = interval.interval_cfg(cond, uncond, s, scale, 0.0, math.inf)
        assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(interval.interval_cfg(cond, uncond, 14.61, scale, 0.0, 14.61), expected)


def test_interval_is_closed_and_outside_it_only_cond_is_used():
    cond = torch.randn(2, 4, 3, 3)
    assert interval.guidance_active(0.28, 0.28, 5.42) and interval.guidance_active(torch.tensor([5.42]), 0.28, 5.42)
    assert not interval.guidance_active(0.2799, 0.28, 5.42) and not interval.guidance_active(5.4201, 0.28, 5.42)
    # ComfyUI's sigmas are float32: 5.42 in float32 is 5.42000008, and still counts as the bound 5.42
    assert interval.guidance_active(torch.tensor([5.42, 5.42], dtype=torch.float32), 0.28, 5.42)
    assert not interval.guidance_active(torch.tensor([5.4201]), 0.28, 5.42)
    assert interval.interval_cfg(cond, None, 9.0, 16.0, 0.28, 5.42) is cond
    assert interval.interval_cfg(cond, None, 0.1, 16.0, 0.28, 5.42) is cond
    inside = interval.interval_cfg(cond, torch.zeros_like(cond), 1.2, 16.0, 0.28, 5.42)
    assert torch.equal(inside, cond * 16.0)


def test_unguided_steps_counts_the_saved_uncond_passes():
    # evaluated sigmas 14.61 and 9.0 lie above the SDXL interval, 0.1 below; the final 0.0 is never evaluated
    assert interval.unguided_steps(SCHEDULE, 0.28, 5.42) == 3
    assert interval.unguided_steps(torch.tensor(SCHEDULE), 0.0, math.inf) == 0


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_flow_sigma_conversion_round_trips(t):
    s = interval.edm_sigma(t, flow=True)
    assert s == pytest.approx(math.inf if t == 1.0 else t / (1 - t))
    assert interval.comfy_sigma(s, flow=True) == pytest.approx(t)
    assert interval.edm_sigma(t * 10, flow=False) == interval.comfy_sigma(t * 10, flow=False) == t * 10


def edm_schedule(steps, sigma_min, sigma_max, rho=7.0):
    """The EDM sampler's noise levels (Karras et al. 2022, eq. 5) and the final 0."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


def test_the_papers_intervals_guide_the_share_of_steps_the_paper_reports():
    # EDM2-XXL, 32 Heun steps from sigma 80 to 0.002: "guidance on 6 of 32 steps" with sigma in (0.19, 1.61]
    assert interval.unguided_steps(edm_schedule(32, 0.002, 80.0), 0.19, 1.61) == 32 - 6
    # SD-XL, 32 Heun steps from its sigma_max 14.61 (sigma_min 0.0292): (0.28, 5.42] is about half of the steps
    assert interval.unguided_steps(edm_schedule(32, 0.0292, 14.61), 0.28, 5.42) == 32 - 16
