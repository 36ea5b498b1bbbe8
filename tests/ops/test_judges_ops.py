"""Judges and GFCG's selection rule as plain functions: the digit oracle judge reads held-out real digits, the
prompt judge's posterior is the ELBO rule, a target is found by label or number, and the reference class is the
strongest rival of the target."""
import pytest
import torch

from guidance_ops import gfcg, judges


def test_the_digit_oracle_judge_reads_held_out_real_digits():
    from training import digits
    scans, labels = digits.load_scans()
    _, test_idx = digits.split(labels)
    images, _, target, _, _ = digits.examples(scans, labels, test_idx, 200, seed=11)
    judge = judges.DigitOracleJudge()
    log_probs = judge.log_probs(images)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(len(images)), atol=1e-5)
    assert (log_probs.argmax(1) == target).float().mean() >= 0.95
    assert judge.labels[7] == "seven" and judge.reads == "pixels"


def test_the_prompt_posterior_favours_the_smaller_error_by_its_exponent():
    errors = torch.tensor([[10.0, 11.0, 13.0]])
    probs = judges.log_probs_from_errors(errors).exp()[0]
    assert probs.sum() == pytest.approx(1.0)
    assert probs[0] / probs[1] == pytest.approx(torch.e, rel=1e-5)  # p_a / p_b = exp(E_b - E_a)
    assert probs[1] / probs[2] == pytest.approx(torch.e ** 2, rel=1e-5)


def test_a_target_is_a_label_or_its_number_and_anything_else_is_refused():
    judge = judges.PromptJudge(["a cat", "a dog"], 4, 0)
    assert judges.target_index(judge, "A Dog") == 1 and judges.target_index(judge, "1") == 0
    with pytest.raises(judges.JudgeError, match="1: a cat, 2: a dog"):
        judges.target_index(judge, "3")
    with pytest.raises(judges.JudgeError, match="at least two"):
        judges.PromptJudge(["a cat"], 4, 0)


def test_the_reference_is_the_most_probable_class_besides_the_target():
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]])
    reference, p_target, p_ref = gfcg.reference_classes(probs.log(), target=1)
    assert reference.tolist() == [0, 2, 0]  # never the target itself, even where it leads (row 1)
    scales = gfcg.adaptive_scale(p_target, p_ref, 3.0)
    torch.testing.assert_close(scales, torch.tensor([3 * 0.5 / 0.7, 3 * 0.3 / 0.9, 3 * 0.4 / 0.8]))
