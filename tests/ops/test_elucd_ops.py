"""EluCD's calibration, smoothing, schedule and pre-conditioning against the official code's statements, written
out here independently: the guided log-probability ``log(exp(tau_j f_y) / sum exp(tau_m f))`` (DDPM
``design_cond_fn``), ReLUs swapped for ``nn.Softplus(beta)`` modules (both samplers), the EDM sampler's
``current_guidance`` and its gradient rescaling ``grads / rms(grads) * rms(x) * guidance``."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import elucd
from guidance_ops.scorers import DigitColourScorer


def official_guided_log_prob(logits, y, joint, marginal):
    """The official DDPM code's expression, literally: log(exp(logits * t1)[y] / exp(logits * t2).sum())."""
    numerator = torch.exp(logits * joint)[range(len(logits)), y]
    denominator = torch.exp(logits * marginal).sum(1)
    return torch.log(numerator / denominator)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 12), st.floats(0.0, 3.0), st.floats(0.0, 3.0), st.integers(0, 2 ** 16))
def test_the_calibrated_log_prob_is_the_official_expression(batch, classes, joint, marginal, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    y = torch.randint(classes, (batch,), generator=g)
    ours = elucd.calibrated_log_prob(logits, y, joint, marginal).double()
    assert torch.allclose(ours, official_guided_log_prob(logits, y, joint, marginal), rtol=1e-5, atol=1e-5)


def test_temperatures_of_one_give_the_classifiers_log_softmax():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(elucd.calibrated_log_prob(logits, 4, 1.0, 1.0), torch.log_softmax(logits, 1)[:, 4])


def test_the_marginal_temperature_changes_the_gradient_direction_not_only_its_length():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.3]], requires_grad=True)
    grads = []
    for marginal in (1.0, 0.5, 0.0):
        (g,) = torch.autograd.grad(elucd.calibrated_log_prob(logits, 0, 1.0, marginal).sum(), logits)
        grads.append(g[0])
    assert torch.allclose(grads[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # tau_m = 0: the target's logit alone
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine < 0.999


def test_a_binary_classifier_of_the_score_returns_the_score_at_temperatures_of_one():
    score = torch.tensor([-0.01, -0.7, -5.0, -30.0])
    logits = elucd.binary_logits(score)
    assert torch.allclose(logits.exp().sum(1), torch.ones(4))
    assert torch.allclose(elucd.calibrated_log_prob(logits, 0, 1.0, 1.0), score, atol=1e-6)


class Net(torch.nn.Module):
    """A classifier written with nn.ReLU modules, F.relu and Tensor.relu."""

    def __init__(self, activation=None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)
        self.act = activation or torch.nn.ReLU()
        self.functional = activation is None

    def forward(self, x):
        x = self.act(self.a(x))
        x = torch.nn.functional.relu(self.b(x)) if self.functional else self.act(self.b(x))
        return self.c(x).relu() if self.functional else self.act(self.c(x))


@pytest.mark.parametrize("beta", (3.0, 5.0))
def test_smoothing_is_the_papers_softplus_module_swap(beta):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    swapped = Net(torch.nn.Softplus(beta=beta))
    swapped.load_state_dict(Net().state_dict())
    with elucd.smoothing(beta):
        ours = Net()(x)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    reference = swapped(x)
    (g_ref,) = torch.autograd.grad(reference.sum(), x)
    assert torch.allclose(ours, reference, atol=1e-6) and torch.allclose(g_ours, g_ref, atol=1e-6)
    plain = Net()(x)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the smoothing acted, and ended with its context
    with elucd.smoothing(math.inf):
        assert torch.equal(Net()(x), plain)  # beta = inf: the ReLUs as written


def official_edm_guidance(i, num_steps, max_guidance, add_factor):
    """The EDM sampler's weight of step i (its t_steps has num_steps + 1 entries)."""
    length = num_steps + 1
    current = max((max_guidance / length) * (length - i), 0.00001)
    return current + math.sin(i / (length - 1) * math.pi) * max_guidance * add_factor


@pytest.mark.parametrize("steps", (1, 4, 10, 25))
def test_the_edm_schedule_is_the_official_current_guidance(steps):
    for i in range(steps):
        ours = 0.004 * elucd.schedule_weight(i, steps, elucd.SCHEDULES[0], 0.3)
        assert ours == pytest.approx(official_edm_guidance(i, steps, 0.004, 0.3), rel=1e-9, abs=1e-12)
    assert elucd.schedule_weight(3, 10, elucd.SCHEDULES[1], 0.3) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        elucd.schedule_weight(0, 10, "cosine", 0.3)


def test_the_step_is_the_gradient_rescaled_to_the_estimates_rms_per_image():
    g = torch.Generator().manual_seed(2)
    spread = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)[:, None, None, None]
    denoised = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * spread
    gradient = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * 1e-3
    gradient[2] = 0
    step = elucd.preconditioned_step(denoised, gradient, 0.1).double()
    for row in range(2):
        expected = gradient[row] / gradient[row].pow(2).mean().sqrt() * denoised[row].pow(2).mean().sqrt() * 0.1
        assert torch.allclose(step[row], expected, rtol=1e-5, atol=1e-8)
    assert torch.equal(step[2], torch.zeros_like(step[2]))


def test_the_digit_scorers_terms_sum_to_its_score():
    scorer = DigitColourScorer("a red digit seven on a dark background")
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    terms = scorer.logit_terms(pixels)
    assert [t for _, t in terms] == [7, 0]
    total = sum(torch.log_softmax(logits, 1)[:, target] for logits, target in terms)
    assert torch.allclose(total, scorer.score(pixels), atol=1e-5)
    assert torch.allclose(elucd.calibrated_score(scorer, pixels, 1.0, 1.0, math.inf), scorer.score(pixels), atol=1e-5)
