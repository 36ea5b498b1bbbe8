"""FreCaS's math against independent statements: the official scheduler's start-timestep rule on SD's
scaled-linear schedule (and techniques.md's worked examples), the stage timesteps, stage sizes and their errors,
FA-CFG's bands, and cross-attention fusion against attention itself."""
import math

import pytest
import torch
import torch.nn.functional as F

from guidance_ops import frecas


def sd_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def official_start(alphas_cumprod, end, side_prev, side_next, gamma):
    """FreCaS's get_next_starttimestep, restated on alphas: alpha' = s alpha / (1 + (s - 1) alpha), s = ratio^g."""
    s = (side_prev / side_next) ** gamma
    a = alphas_cumprod[end]
    target = s * a / (1 + (s - 1) * a)
    return int(len(alphas_cumprod) - torch.searchsorted(torch.flip(alphas_cumprod, (0,)), target, right=True))


@pytest.mark.parametrize("end,ratio,gamma,expected", [(200, 2.0, 1.5, 343), (200, 2.0, 2.0, 395), (100, 2.0, 3.0, 346)])
def test_start_timestep_matches_the_worked_examples(end, ratio, gamma, expected):
    ac = sd_alphas_cumprod()
    sigmas = ((1 - ac) / ac).sqrt()
    assert frecas.shifted_start_discrete(sigmas, end, ratio, gamma) == expected
    assert official_start(ac, end, 1024, 1024 * ratio, gamma) == expected


@pytest.mark.parametrize("end", [20, 50, 150, 300, 500])
@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0, 3.0])
def test_start_timestep_equals_the_official_rule(end, gamma):
    ac = sd_alphas_cumprod()
    sigmas = ((1 - ac) / ac).sqrt()
    assert frecas.shifted_start_discrete(sigmas, end, 2.0, gamma) == official_start(ac, end, 512, 1024, gamma)


def test_start_beyond_the_schedule_is_refused():
    ac = sd_alphas_cumprod()
    with pytest.raises(frecas.StageError, match="lower gamma"):
        frecas.shifted_start_discrete(((1 - ac) / ac).sqrt(), 900, 4.0, 3.0)


def test_flow_start_is_the_resolution_shift():
    # SD3 rule: t' = k t / (1 + (k - 1) t) on t / 1000, k = sqrt(2) for a doubled side; t = 50 -> 69
    k = math.sqrt(2.0)
    assert frecas.shifted_start_flow(50, 2.0) == int(1000 * (k * 0.05 / (1 + (k - 1) * 0.05)))
    assert frecas.shifted_start_flow(0, 2.0) == 0


def test_stage_timesteps_include_both_ends():
    assert frecas.stage_timesteps(999, 200, 4) == [999, 732, 466, 200]
    assert frecas.stage_timesteps(343, 0, 1) == [343]


def test_split_stages_at_interior_zeros():
    assert frecas.split_stages(torch.tensor([3.0, 1.0, 0.0, 2.0, 0.5, 0.0])) == [[3.0, 1.0, 0.0], [2.0, 0.5, 0.0]]
    assert frecas.split_stages(torch.tensor([3.0, 1.0, 0.0])) == [[3.0, 1.0, 0.0]]


def test_stage_sizes_grow_geometrically():
    assert frecas.stage_sizes((64, 64), (256, 256), 3) == [(64, 64), (128, 128), (256, 256)]
    assert frecas.stage_sizes((128, 128), (256, 192), 2) == [(128, 128), (256, 192)]
    assert frecas.stage_sizes((16, 16), (45, 45), 2) == [(16, 16), (45, 45)]


def test_unreachable_sizes_name_valid_ones():
    with pytest.raises(frecas.StageError, match=r"use a valid height nearby: .*512 px"):
        frecas.stage_sizes((16, 16), (63, 64), 3)  # 16 -> ? -> 63 has no whole middle; 64 (middle 32) works
    with pytest.raises(frecas.StageError, match="below the base"):
        frecas.stage_sizes((64, 64), (32, 64), 2)
    with pytest.raises(frecas.StageError, match="set the base width"):
        frecas.stage_sizes((64, 64), (64, 96), 1)


def test_stage_lists_are_checked():
    with pytest.raises(frecas.StageError, match="one of each"):
        frecas.check_stages([40, 10], [200])
    with pytest.raises(frecas.StageError, match="end at timestep 0"):
        frecas.check_stages([40, 10], [200, 100])
    with pytest.raises(frecas.StageError, match="comma-separated"):
        frecas.parse_list("40, ten", "stage_steps", int)


def test_subsample_keeps_the_noise_law():
    noise = torch.randn(4, 4, 96, 96, generator=torch.Generator().manual_seed(0))
    small = frecas.subsample(noise, (64, 64))
    assert small.shape[-2:] == (64, 64)
    # every value is one of the noise's own (a subset of i.i.d. values is i.i.d.): nothing averaged or scaled
    rows = torch.arange(64) * 96 // 64
    assert torch.equal(small[0, 0, 5], noise[0, 0, rows[5], rows])
    assert abs(small.std().item() - 1) < 0.02


def test_fa_cfg_equal_weights_is_cfg():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 4, 32, 32, generator=g)
    assert torch.allclose(frecas.fa_cfg(cond, uncond, 7.5, 7.5, (16, 16)), uncond + 7.5 * (cond - uncond), atol=1e-5)


def test_fa_cfg_bands():
    uncond = torch.zeros(1, 1, 32, 32)
    # a field the previous (half) size holds exactly: constant -> only the low weight acts
    assert torch.allclose(frecas.fa_cfg(torch.ones(1, 1, 32, 32), uncond, 7.5, 35.0, (16, 16)),
                          torch.full((1, 1, 32, 32), 7.5))
    # the finest checkerboard averages out at half size -> only the high weight acts
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]).remainder(2).float() * 2 - 1
    assert torch.allclose(frecas.fa_cfg(board.view(1, 1, 32, 32), uncond, 7.5, 35.0, (16, 16)), 35.0 * board)


def test_fusion_with_the_layers_own_map_is_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 64, 8, generator=g), torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    attention = F.scaled_dot_product_attention(q, k, v)
    probs = frecas.attention_probabilities(q, k, heads=1)
    out = torch.randn(2, 64, 8, generator=g)
    assert torch.allclose(frecas.fuse_attention(out, probs, v, 1, 1.0), attention, atol=1e-5)
    assert torch.equal(frecas.fuse_attention(out, probs, v, 1, 0.0), out)
    half = frecas.fuse_attention(out, probs, v, 1, 0.4)
    assert torch.allclose(half, 0.6 * out + 0.4 * attention, atol=1e-5)


def test_maps_are_probabilities_averaged_over_heads():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 16, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    m = frecas.attention_probabilities(q, k, heads=3)
    per_head = [torch.softmax(q[..., h * 4:(h + 1) * 4] @ k[..., h * 4:(h + 1) * 4].mT / 2.0, -1) for h in range(3)]
    assert torch.allclose(m, sum(per_head) / 3, atol=1e-6)
    assert torch.allclose(m.sum(-1), torch.ones(1, 16))


def test_merge_stretches_along_tokens_and_keeps_rows_stochastic():
    maps = {256: torch.softmax(torch.randn(2, 256, 7), -1), 64: torch.softmax(torch.randn(2, 64, 7), -1)}
    merged = frecas.merge_maps(maps)
    assert merged.shape == (2, 256, 7)
    assert torch.allclose(merged.sum(-1), torch.ones(2, 256), atol=1e-5)
    constant = {16: torch.full((1, 16, 3), 1 / 3), 4: torch.full((1, 4, 3), 1 / 3)}
    assert torch.allclose(frecas.merge_maps(constant), torch.full((1, 16, 3), 1 / 3))


def test_repeated_text_keeps_the_fused_output():
    # ComfyUI repeats a prompt to batch it with a longer one: attention over repeated keys is unchanged
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 16, 8, generator=g), torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    m = frecas.attention_probabilities(q, k, 1)
    out = torch.zeros(1, 16, 8)
    once = frecas.fuse_attention(out, m, v, 1, 1.0)
    assert torch.allclose(frecas.fuse_attention(out, m, v.repeat(1, 3, 1), 1, 1.0), once, atol=1e-6)
    m3 = frecas.attention_probabilities(q, k.repeat(1, 3, 1), 1)
    assert torch.allclose(frecas.fuse_attention(out, m3, v, 1, 1.0), once, atol=1e-6)
    with pytest.raises(frecas.StageError, match="same"):
        frecas.match_keys(m, 7)


def test_relative_cost():
    # the paper's SDXL 2048 plan: 40 steps at 1/4 of the pixels and 10 at full size
    assert frecas.relative_cost([(128, 128), (256, 256)], [40, 10]) == pytest.approx((40 / 4 + 10) / 50)
