import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from guidance_ops import redilation


def conv_inputs(seed, channels=3, out=4, k=3, size=12):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, channels, size, size, generator=g), torch.randn(out, channels, k, k, generator=g),
            torch.randn(out, generator=g))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), factor=st.integers(1, 4), k=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]))
def test_integer_factor_is_torch_dilated_conv_with_size_keeping_padding(seed, factor, k, stride):
    x, w, b = conv_inputs(seed, k=k)
    expected = F.conv2d(x, w, b, stride=stride, padding=factor * (k - 1) // 2, dilation=factor)
    out = redilation.redilated_conv(x, w, b, factor, stride)
    assert out.shape[-2:] == (12 // stride, 12 // stride)
    torch.testing.assert_close(out, expected)


def zero_interleaved(weight, d):
    """The dilated kernel written out: d - 1 zeros between the taps (the textbook definition of dilation)."""
    out, cin, k, _ = weight.shape
    big = torch.zeros(out, cin, d * (k - 1) + 1, d * (k - 1) + 1)
    big[:, :, ::d, ::d] = weight
    return big


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_equals_a_plain_conv_with_the_zero_interleaved_kernel(factor):
    x, w, b = conv_inputs(factor)
    big = zero_interleaved(w, factor)
    expected = F.conv2d(x, big, b, padding=big.shape[-1] // 2)
    torch.testing.assert_close(redilation.redilated_conv(x, w, b, factor), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor,stride,size", [(1.5, 1, 12), (2.5, 1, 16), (1.5, 2, 16), (3.7, 2, 10)])
def test_fractional_factor_resizes_around_the_next_integer_dilation(factor, stride, size):
    x, w, b = conv_inputs(7, size=size)
    out = redilation.redilated_conv(x, w, b, factor, stride)
    assert out.shape == (2, 4, size // stride, size // stride)
    # the official order: input resized by ceil(f)/f, conv dilated by ceil(f), output back to the plain size
    d = math.ceil(factor)
    big = F.interpolate(x, size=(round(size * d / factor),) * 2, mode="bilinear")
    inner = F.conv2d(big, w, b, stride=stride, padding=d, dilation=d)
    torch.testing.assert_close(out, F.interpolate(inner, size=(size // stride,) * 2, mode="bilinear"))


@pytest.mark.parametrize("d,tau", [(4, 35), (3, 35), (2, 35), (4, 37), (3, 37)])
def test_progressive_rule_at_the_papers_step_indices(d, tau):
    # text2image.py: dilate = max(ceil(dilate * (tau - i) / tau), 2) for steps i < tau of 50, vanilla after
    for i in range(50):
        paper = max(math.ceil(d * (tau - i) / tau), 2) if i < tau else None
        assert redilation.step_factor(d, i / 50, tau / 50, progressive=True) == paper, i
        assert redilation.step_factor(d, i / 50, tau / 50, progressive=False) == (d if i < tau else None)


def test_progressive_hand_values():
    values = [redilation.step_factor(4, i / 50, 0.7, True) for i in (0, 8, 9, 17, 18, 34, 35)]
    assert values == [4, 4, 3, 3, 2, 2, None]


def test_schedule_position_is_comfys_percent():
    assert redilation.schedule_position(999) == 0.0 and redilation.schedule_position(0) == 1.0
    assert abs(redilation.schedule_position(499.5) - 0.5) < 1e-12


def official(lines):
    """A settings file of the official repository (name:factor per line) as a table of sites."""
    table = {}
    for line in lines.split():
        name, factor = line.split(":")
        parts = name.split(".")
        site = ".".join(parts[:2]) if parts[0] != "mid_block" else "mid_block"
        if parts[-3] in ("downsamplers", "upsamplers"):
            site += "." + parts[-3]
        assert table.setdefault(site, int(factor)) == int(factor)
    return table


SD15_2048_WEAK = """down_blocks.2.resnets.0.conv1:3 down_blocks.2.resnets.1.conv2:3 down_blocks.2.downsamplers.0.conv:3
down_blocks.3.resnets.0.conv1:4 up_blocks.0.resnets.2.conv2:4 up_blocks.0.upsamplers.0.conv:4
up_blocks.1.resnets.0.conv1:3 up_blocks.1.upsamplers.0.conv:3 mid_block.resnets.1.conv2:4"""
SD21_2048 = """down_blocks.2.resnets.0.conv1:3 down_blocks.2.downsamplers.0.conv:4 down_blocks.3.resnets.1.conv2:4
up_blocks.0.resnets.0.conv1:4 up_blocks.0.upsamplers.0.conv:4 up_blocks.1.resnets.2.conv1:4
up_blocks.1.upsamplers.0.conv:4 up_blocks.2.resnets.0.conv1:3 up_blocks.2.upsamplers.0.conv:3
up_blocks.3.resnets.2.conv2:2 mid_block.resnets.0.conv1:4"""
SDXL_4096 = """down_blocks.2.resnets.0.conv1:4 up_blocks.0.resnets.0.conv1:4 up_blocks.0.upsamplers.0.conv:4
up_blocks.1.resnets.1.conv2:3 up_blocks.1.upsamplers.0.conv:3 up_blocks.2.resnets.2.conv2:2 mid_block.resnets.0.conv1:4"""


def test_presets_follow_the_official_settings_files():
    p = redilation.PRESETS
    assert p["SD1.5 2048x2048 (16x pixels)"].weak_table == official(SD15_2048_WEAK)
    assert p["SD2.1 2048x2048 (16x pixels)"].table == official(SD21_2048)
    assert p["SDXL 4096x4096 (16x pixels)"].table == official(SDXL_4096)
    assert p["SDXL 2048x2048 (4x pixels)"].table == official("mid_block.resnets.0.conv1:2 up_blocks.0.resnets.0."
                                                               "conv1:2 up_blocks.0.upsamplers.0.conv:2")
    taus = {name: round(preset.tau * 50) for name, preset in p.items() if preset.levels}
    assert list(taus.values()) == [30, 35, 20, 37, 30, 35]
    assert [preset.progressive for preset in p.values() if preset.levels] == [False, True, False, True, False, True]


def test_generic_presets_are_sd15s_tables_on_four_levels():
    p = redilation.PRESETS
    assert redilation.generic_table(4, 4) == p["SD1.5 1024x1024 (4x pixels)"].table
    assert redilation.generic_table(4, 16) == p["SD1.5 2048x2048 (16x pixels)"].table
    assert redilation.generic_table(4, 16, weak=True) == p["SD1.5 2048x2048 (16x pixels)"].weak_table


def test_generic_presets_on_the_reference_and_tiny_unets():
    # 3 levels (the reference digit model): outermost vanilla, depth 1/2 -> ceil(2.5) = 3, deepest 4
    assert redilation.generic_table(3, 16) == {"down_blocks.1": 3, "down_blocks.1.downsamplers": 3,
                                               "down_blocks.2": 4, "mid_block": 4, "up_blocks.0": 4,
                                               "up_blocks.0.upsamplers": 4, "up_blocks.1": 3,
                                               "up_blocks.1.upsamplers": 3}
    assert redilation.generic_table(2, 4) == {"down_blocks.1": 2, "mid_block": 2, "up_blocks.0": 2,
                                              "up_blocks.0.upsamplers": 2}
    assert redilation.generic_table(2, 16, weak=True) == {"mid_block": 4}
    with pytest.raises(redilation.PresetMismatch, match="single resolution level"):
        redilation.generic_table(1, 4)


def test_a_table_for_another_architecture_is_refused_naming_the_presets_that_fit():
    sd15 = redilation.PRESETS["SD1.5 1024x1024 (4x pixels)"]
    sites = {s: [s] for s in redilation.generic_table(3, 4)}
    with pytest.raises(redilation.PresetMismatch, match=r"down_blocks\.3.*SDXL 2048x2048.*generic 4x pixels"):
        redilation.conv_factors(sd15, sd15.table, sites, 3)


# transforms/R20to1_new.mat of the official repository (the transform its *_disperse configs load): R @ ones (the
# dispersed kernel of an all-ones 3x3 kernel, what kernel_disperse.m's verbose plot shows) and R's first column
OFFICIAL_R_ONES = [[0.591317, 0.331472, 0.55416, 0.331472, 0.591317],
                   [0.331472, 0.186095, 0.3139, 0.186095, 0.331472],
                   [0.55416, 0.3139, 0.518635, 0.3139, 0.55416],
                   [0.331472, 0.186095, 0.3139, 0.186095, 0.331472],
                   [0.591317, 0.331472, 0.55416, 0.331472, 0.591317]]
OFFICIAL_R_FIRST = [[0.64879, 0.275788, -0.107225, 0.061662, -0.02628],
                    [0.275788, 0.132799, -0.054891, 0.032346, -0.013887],
                    [-0.107225, -0.054891, 0.022974, -0.013492, 0.005764],
                    [0.061662, 0.032346, -0.013492, 0.007849, -0.003331],
                    [-0.02628, -0.013887, 0.005764, -0.003331, 0.001407]]


def test_dispersion_transform_is_the_official_r20to1_new():
    R = redilation.dispersion_transform()
    assert R.shape == (25, 9)
    torch.testing.assert_close((R @ torch.ones(9, dtype=R.dtype)).reshape(5, 5),
                               torch.tensor(OFFICIAL_R_ONES, dtype=R.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(R[:, 0].reshape(5, 5), torch.tensor(OFFICIAL_R_FIRST, dtype=R.dtype), atol=1e-6,
                               rtol=0)
    centre = torch.zeros(25, dtype=R.dtype)
    centre[12] = 1
    torch.testing.assert_close(R[:, 4], centre, atol=1e-12, rtol=0)  # a centre tap stays a centre tap


def test_dispersed_conv_is_the_spread_kernel_dilated():
    x, w, b = conv_inputs(11, size=16)
    R = redilation.dispersion_transform().float()
    spread = (w.flatten(2) @ R.T).reshape(4, 3, 5, 5)  # model.py inflate_kernels: einsum("mn, ion -> iom")
    for factor, stride in ((1, 1), (2, 1), (2, 2)):
        expected = F.conv2d(x, spread, b, stride=stride, padding=2 * factor, dilation=factor)
        torch.testing.assert_close(redilation.dispersed_conv(x, w, b, factor, stride), expected)
    with pytest.raises(ValueError, match="3x3"):
        redilation.dispersed_conv(x, torch.zeros(4, 3, 1, 1), b, 1)


def test_dispersion_sites_follow_the_official_settings():
    p = redilation.PRESETS
    sd15 = official(" ".join(f"{name}:1" for name in (
        "down_blocks.2.downsamplers.0.conv down_blocks.3.resnets.0.conv1 up_blocks.0.resnets.0.conv1 "
        "up_blocks.0.upsamplers.0.conv up_blocks.1.resnets.2.conv2 up_blocks.1.upsamplers.0.conv "
        "mid_block.resnets.0.conv1").split()))
    assert set(redilation.preset_tables(p["SD1.5 2048x2048 (16x pixels)"], 4)[2]) == set(sd15)
    assert set(redilation.preset_tables(p["generic 16x pixels"], 4)[2]) == set(sd15)
    # SDXL 4096: down_blocks.2 resnets, up_blocks.0 (+ upsampler), mid (its down_blocks.2.downsamplers: absent)
    assert set(redilation.preset_tables(p["SDXL 4096x4096 (16x pixels)"], 3)[2]) == {
        "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.0.upsamplers"}
    assert redilation.preset_tables(p["SD1.5 1024x1024 (4x pixels)"], 4)[2] == ()
    # two levels: only what the generic table dilates (the outermost up level stays vanilla)
    assert set(redilation.preset_tables(p["generic 16x pixels"], 2)[2]) == {
        "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.0.upsamplers"}
