"""Prompt-to-Prompt's plan and map operations, against hand-worked examples and the paper's statements."""
import pytest
import torch

from guidance_ops import prompt_to_prompt as p2p

# Token ids of a toy tokenizer: start 100, end / padding 99.
S, E = 100, 99
A, CAT, SITS, ON, CAR, RED, DOG, HEDGE, HOG = 1, 2, 3, 4, 5, 6, 7, 8, 9


def pad(*ids, length=10):
    return [S, *ids, E] + [E] * (length - len(ids) - 2)


def test_refinement_alignment_matches_a_hand_worked_example():
    # "a cat sits on a car" -> "a cat sits on a red car": "red" is new, "car" and the end move one place right.
    # By hand: target 0-5 take source 0-5, target 6 (red) is new, target 7 (car) <- source 6, 8 (end) <- 7,
    # 9 (padding) <- 8; the source's last padding token is left over.
    plan = p2p.make_plan(pad(A, CAT, SITS, ON, A, CAR), pad(A, CAT, SITS, ON, A, RED, CAR), "refinement")
    assert plan.mapper == (0, 1, 2, 3, 4, 5, 0, 6, 7, 8)
    assert plan.alphas == (1, 1, 1, 1, 1, 1, 0, 1, 1, 1)


def test_refinement_alignment_with_removed_and_replaced_words():
    # "a red car on a car" -> "a dog on a car": "red car" is dropped, "dog" is new. By hand:
    # source: S a red car on a car E E E;  target: S a dog on a car E E E E
    # target 0, 1 <- source 0, 1; dog new; "on a car" <- source 4-6; its three ends <- the source's three; the
    # target's fourth end has no partner left (new).
    plan = p2p.make_plan(pad(A, RED, CAR, ON, A, CAR), pad(A, DOG, ON, A, CAR), "refinement")
    assert plan.alphas == (1, 1, 0, 1, 1, 1, 1, 1, 1, 0)
    assert [m for m, a in zip(plan.mapper, plan.alphas) if a] == [0, 1, 4, 5, 6, 7, 8, 9]


def test_word_swap_of_equal_token_counts_injects_the_whole_map():
    plan = p2p.make_plan(pad(A, CAT, SITS), pad(A, DOG, SITS), "word swap")
    assert plan.injects_whole_map and plan.mapper == tuple(range(10))


def test_word_swap_with_a_different_token_count_names_the_counts_and_the_fix():
    with pytest.raises(ValueError, match=r"1 source token\(s\) at position 2 became 2 target token\(s\) at "
                                         r"positions 2-3: use refinement mode"):
        p2p.make_plan(pad(A, CAT, SITS), pad(A, HEDGE, HOG, SITS), "word swap")
    with pytest.raises(ValueError, match="use refinement mode for edits that add or remove words"):
        p2p.make_plan(pad(A, CAT, SITS), pad(A, RED, CAT, SITS), "word swap")


def test_plan_checks():
    with pytest.raises(ValueError, match="same number of 77-token chunks"):
        p2p.make_plan([S, A, E], [S, A, E, E], "refinement")
    with pytest.raises(ValueError, match="unknown prompt-to-prompt mode"):
        p2p.make_plan(pad(A), pad(A), "swap")
    with pytest.raises(ValueError, match="reweight mode needs the tokens"):
        p2p.make_plan(pad(A), pad(A), "reweight")
    with pytest.raises(ValueError, match="outside the prompt"):
        p2p.make_plan(pad(A), pad(A), "reweight", reweight_tokens=(10,))


def test_word_positions():
    prompt = pad(A, HEDGE, HOG, ON, A, CAR)
    assert p2p.word_positions(prompt, [HEDGE, HOG]) == (2, 3)
    assert p2p.word_positions(prompt, [A]) == (1, 5)
    assert p2p.word_positions(prompt, [[CAR], [DOG]]) == (6,)
    with pytest.raises(ValueError, match="does not occur"):
        p2p.word_positions(prompt, [DOG])


def test_windows_count_steps_as_the_official_code():
    # official: replaced while step < int(fraction * steps)
    assert [p2p.in_window(0.8, s, 50) for s in (39, 40)] == [True, False]
    assert [p2p.in_window(0.29, s, 100) for s in (28, 29)] == [True, False]
    assert not p2p.in_window(0.0, 0, 10) and p2p.in_window(1.0, 9, 10)


def probs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).softmax(-1)


def test_replace_cross_per_mode():
    source, target = probs((2, 3, 6, 10), 0), probs((2, 3, 6, 10), 1)
    swap = p2p.make_plan(pad(A, CAT, SITS), pad(A, DOG, SITS), "word swap")
    assert torch.equal(p2p.replace_cross(source, target, swap), source)
    refine = p2p.make_plan(pad(A, CAT, SITS, ON, A, CAR), pad(A, CAT, SITS, ON, A, RED, CAR), "refinement")
    out = p2p.replace_cross(source, target, refine)
    assert torch.equal(out[..., :6], source[..., :6])  # shared tokens at the same places
    assert torch.equal(out[..., 6], target[..., 6])  # "red" keeps the target's own map
    assert torch.equal(out[..., 7:], source[..., 6:9])  # "car" and the ends moved right by one


def test_reweight_scales_exactly_the_chosen_columns_after_replacement():
    source, target = probs((2, 3, 6, 10), 0), probs((2, 3, 6, 10), 1)
    plan = p2p.make_plan(pad(A, CAT), pad(A, CAT), "reweight", reweight_tokens=(2,), reweight_scale=3.0)
    out = p2p.replace_cross(source, target, plan)
    assert torch.allclose(out[..., 2], 3.0 * source[..., 2])
    assert torch.equal(out[..., [0, 1, *range(3, 10)]], source[..., [0, 1, *range(3, 10)]])
    assert not plan.injects_whole_map
    assert p2p.make_plan(pad(A, CAT), pad(A, CAT), "reweight", reweight_tokens=(2,)).injects_whole_map


def test_map_size_and_blend_level():
    assert p2p.map_size(64 * 64, 64, 64) == (64, 64) and p2p.map_size(16 * 16, 64, 64) == (16, 16)
    assert p2p.map_size(4 * 3, 13, 9) == (4, 3)  # 13x9 -> 7x5 -> 4x3
    with pytest.raises(ValueError):
        p2p.map_size(50, 64, 64)
    # SD 512 px: the official 16x16 maps; SDXL 1024 px: 32x32; a 16x16 latent with 16x16 and 8x8 levels: 8x8
    assert p2p.blend_level([4096, 1024, 256, 64], 64, 64) == 256
    assert p2p.blend_level([4096, 1024], 128, 128) == 1024
    assert p2p.blend_level([256, 64], 16, 16) == 64


def test_blend_mask_is_the_union_of_thresholded_word_maps():
    # 4x4 maps over 3 key tokens: token 1 peaks at the top-left pixel, token 2 at the bottom-right one.
    maps = torch.full((1, 4, 4, 3), 0.01)
    maps[0, 0, 0, 1] = 1.0
    maps[0, 3, 3, 2] = 1.0
    plan = p2p.PromptToPromptPlan("word swap", (0, 1, 2), (1, 1, 1), blend_source_tokens=(1,),
                                  blend_target_tokens=(2,))
    mask = p2p.blend_mask(maps, maps, plan, (8, 8))
    # by hand: 3x3 max pool grows each peak to a 2x2 corner of the 4x4 map, which is 4x4 pixels at 8x8
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1
    expected[4:, 4:] = 1
    assert torch.equal(mask[0, 0], expected)
    source_x, target_x = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    out = p2p.blend(source_x, target_x, mask)
    assert torch.equal(out[..., :4, 4:], source_x[..., :4, 4:]) and torch.equal(out[..., :4, :4],
                                                                                  target_x[..., :4, :4])


def test_no_blend_words_give_an_empty_mask():
    maps = torch.rand(2, 4, 4, 3)
    plan = p2p.PromptToPromptPlan("word swap", (0, 1, 2), (1, 1, 1), blend_target_tokens=(1,))
    assert p2p.word_mask(maps, (), (8, 8), 0.3).sum() == 0
    assert p2p.blend_mask(maps, maps, plan, (8, 8)).sum() > 0
