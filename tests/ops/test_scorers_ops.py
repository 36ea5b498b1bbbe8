"""Scorers as plain functions: the digit scorer reads the prompted digit and colour off held-out real digits
rendered as the reference models were trained, its colour part follows hue, it gives gradients, and a judge
scorer reads the target label of a judge that reads pixels."""
import pytest
import torch

from guidance_ops import judges, scorers


@pytest.fixture(scope="module")
def held_out():
    from training import digits
    scans, labels = digits.load_scans()
    _, test_idx = digits.split(labels)
    return digits.examples(scans, labels, test_idx, 60, seed=5)


def test_the_prompt_names_the_digit_and_colour_and_nothing_else_is_guessed():
    assert scorers.digit_and_colour("a red digit seven on a dark background") == (7, "red")
    assert scorers.digit_and_colour("Seven!") == (7, None)
    assert scorers.digit_and_colour("something purple") == (None, "purple")
    with pytest.raises(scorers.ScorerError, match="names no digit word"):
        scorers.digit_and_colour("a photo of a cat")
    with pytest.raises(scorers.ScorerError, match="several"):
        scorers.digit_and_colour("a red seven or a two")


def test_the_caption_of_each_image_scores_best_among_captions_of_other_digits_and_colours(held_out):
    images, captions, digits_, colours, _ = held_out
    own = torch.stack([scorers.DigitColourScorer(c).score(images[i:i + 1])[0] for i, c in enumerate(captions)])
    from training import digits
    wrong_digit = [digits.caption((int(d) + 3) % 10, c, "dark") for d, c in zip(digits_, colours)]
    names = list(digits.COLOURS)
    wrong_colour = [digits.caption(int(d), names[(names.index(c) + 2) % len(names)], "dark")
                    for d, c in zip(digits_, colours)]
    for other in (wrong_digit, wrong_colour):
        theirs = torch.stack([scorers.DigitColourScorer(c).score(images[i:i + 1])[0] for i, c in enumerate(other)])
        assert (own > theirs).float().mean() >= 0.9
    assert (own <= 0).all() and own.mean() > -1.0  # log-probabilities, and mostly confident on real digits


def test_the_colour_part_follows_the_ink_hue_not_the_background():
    from training import digits
    scans, _ = digits.load_scans()
    for name, rgb in digits.COLOURS.items():
        for level in (0.05, 0.9):
            image = digits.render(scans[:1], [rgb], [level], torch.zeros(1, 2, dtype=torch.long))
            scores = {c: scorers.DigitColourScorer(f"a {c} shape").score(image)[0].item() for c in digits.COLOURS}
            assert max(scores, key=scores.get) == name


def test_the_digit_scorer_gives_pixel_gradients_that_raise_its_score(held_out):
    images = held_out[0][:4].clone().requires_grad_(True)
    scorer = scorers.DigitColourScorer("a blue digit three")
    assert scorer.differentiable
    score = scorer.score(images)
    grad, = torch.autograd.grad(score.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    stepped = scorer.score((images + 0.02 * grad / grad.flatten(1).norm(dim=1)[:, None, None, None]).detach())
    assert (stepped > score.detach()).all()


def test_a_judge_scorer_reads_its_target_and_a_model_judge_is_refused(held_out):
    images, _, digits_, _, _ = held_out
    judge = judges.DigitOracleJudge()
    by_word, by_number = scorers.JudgeScorer(judge, "seven"), scorers.JudgeScorer(judge, "8")
    assert torch.equal(by_word.score(images), by_number.score(images))
    sevens = digits_ == 7
    assert sevens.any() and by_word.score(images)[sevens].mean() > by_word.score(images)[~sevens].mean() + 3
    assert by_word.differentiable
    with pytest.raises(scorers.ScorerError, match="reads the sampled model"):
        scorers.JudgeScorer(judges.PromptJudge(["a", "b"], 2, 0), "a")
