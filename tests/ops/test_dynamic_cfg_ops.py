import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import clip_judge, dynamic_cfg


def test_scales_are_parsed_sorted_and_distinct():
    assert dynamic_cfg.parse_scales("7.5, 1, 3;5, 3") == (1.0, 3.0, 5.0, 7.5)
    assert dynamic_cfg.parse_scales("4") == (4.0,)
    for bad, words in [("", "empty"), ("1, x", "comma-separated"), ("1, -2", ">= 0"), ("nan", "finite"),
                       (", ".join(str(i) for i in range(17)), "at most 16")]:
        with pytest.raises(dynamic_cfg.CandidateError, match=words):
            dynamic_cfg.parse_scales(bad)


def test_candidates_are_cfg_at_each_scale_candidate_major():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    out = dynamic_cfg.candidate_estimates(cond, uncond, (0.0, 1.0, 6.0))
    assert out.shape == (9, 4, 5, 5)
    assert torch.equal(out[0:3], uncond) and torch.allclose(out[3:6], cond)  # w = 0: uncond; w = 1: cond
    # w = 6 extrapolates: the estimate lies on the line through uncond and cond, 6 times as far as cond
    assert torch.allclose(out[6:9] - uncond, 6 * (cond - uncond), atol=1e-5)


def test_weighted_score_sums_weighted_target_log_probs():
    g = torch.Generator().manual_seed(1)
    candidates, batch = 3, 2
    a = torch.log_softmax(torch.randn(candidates * batch, 10, generator=g), 1)
    b = torch.log_softmax(torch.randn(candidates * batch, 4, generator=g), 1)
    score = dynamic_cfg.weighted_score([a, b], [7, 2], [1.0, 0.5], candidates)
    for s in range(candidates):
        for r in range(batch):
            row = s * batch + r
            assert math.isclose(float(score[s, r]), float(a[row, 7] + 0.5 * b[row, 2]), rel_tol=1e-6)
    with pytest.raises(dynamic_cfg.CandidateError):
        dynamic_cfg.weighted_score([a], [7, 2], [1.0], candidates)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(candidates=st.integers(1, 6), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_choice_is_the_best_score_per_row(candidates, batch, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(candidates, batch, generator=g)
    scales = tuple(float(i) for i in range(candidates))
    picks = dynamic_cfg.choose(scores, scales, preferred=99.0)
    for r in range(batch):
        assert all(scores[int(picks[r]), r] >= scores[s, r] for s in range(candidates))


def test_ties_go_to_the_samplers_cfg_else_to_the_smallest_scale():
    scales = (1.0, 3.0, 5.0, 7.5)
    scores = torch.tensor([[0.0, -1.0, -2.0],
                           [0.0, 0.0, -2.0],
                           [-1.0, 0.0, 0.0],
                           [-3.0, -5.0, 0.0]])
    assert dynamic_cfg.choose(scores, scales, preferred=5.0).tolist() == [0, 2, 2]
    assert dynamic_cfg.choose(scores, scales, preferred=7.5).tolist() == [0, 1, 3]
    assert dynamic_cfg.choose(scores, scales, preferred=4.0).tolist() == [0, 1, 2]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(1, 4), scale=st.floats(0, 20), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_per_row_cfg_at_one_scale_is_plain_cfg_bit_for_bit(batch, scale, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = (torch.randn(batch, 4, 3, 3, generator=g).to(dtype) for _ in range(2))
    plain = uncond + (cond - uncond) * scale
    assert torch.equal(dynamic_cfg.guided(cond, uncond, torch.full((batch,), scale, dtype=torch.float64)), plain)


def test_per_row_cfg_uses_each_rows_scale():
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    out = dynamic_cfg.guided(cond, uncond, torch.tensor([1.0, 0.0, 4.0]))
    assert torch.allclose(out[0], cond[0]) and torch.equal(out[1], uncond[1])
    assert torch.allclose(out[2], uncond[2] + 4 * (cond[2] - uncond[2]))


def test_zero_shot_log_probs_are_clips_softmax_over_scaled_cosines():
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g)
    lp = clip_judge.zero_shot_log_probs(image, text, 100.0)
    assert lp.shape == (2, 3) and lp.dtype == torch.float32
    assert torch.allclose(lp.exp().sum(1), torch.ones(2))
    for b in range(2):
        cos = [float(image[b] @ text[k] / (image[b].norm() * text[k].norm())) for k in range(3)]
        z = [100 * c for c in cos]
        log_norm = math.log(sum(math.exp(v - max(z)) for v in z)) + max(z)
        for k in range(3):
            assert math.isclose(float(lp[b, k]), z[k] - log_norm, abs_tol=1e-3)
    # cosines: the embeddings' lengths do not matter
    assert torch.allclose(clip_judge.zero_shot_log_probs(5 * image, 0.1 * text, 100.0), lp, atol=1e-5)


def test_logit_scale_is_clips_capped_temperature():
    assert math.isclose(clip_judge.logit_scale(torch.tensor(math.log(50.0))), 50.0, rel_tol=1e-6)
    assert clip_judge.logit_scale(torch.tensor(4.6055)) == 100.0


def test_untrained_projections_are_recognised():
    g = torch.Generator().manual_seed(4)
    trained = torch.randn(64, 64, generator=g) * 0.02
    assert not clip_judge.looks_untrained(trained)
    assert clip_judge.looks_untrained(torch.zeros(64, 64))
    assert clip_judge.looks_untrained(torch.where(trained > 0, trained, torch.tensor(float("nan"))))
    denormal = trained.clone()
    denormal[:8] = 1e-40
    assert clip_judge.looks_untrained(denormal)
