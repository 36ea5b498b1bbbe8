"""LinearAG's least-squares fit recovers known coefficients, and calibration regresses every other step."""
import torch

from guidance_ops import linear_ag


def test_fit_recovers_the_coefficients_that_made_the_targets():
    g = torch.Generator().manual_seed(0)
    truth = [0.7, -0.2, 0.45]
    features = [[torch.randn(4, 8, 8, generator=g) for _ in range(3)] for _ in range(3)]
    targets = [sum(c * f for c, f in zip(truth, fs)) for fs in features]
    assert torch.allclose(torch.tensor(linear_ag.fit(targets, features)), torch.tensor(truth), atol=1e-9)


def test_calibration_regresses_every_other_step_from_the_previous_real_one():
    g = torch.Generator().manual_seed(1)
    runs = []
    for _ in range(3):
        steps = [(torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, 4, generator=g))]
        for i in range(1, 6):
            cond = torch.randn(2, 4, 4, generator=g)
            steps.append((cond, 0.5 * cond + 0.25 * steps[-1][0] + 0.1 * steps[-1][1]))
        runs.append(steps)
    coefficients = linear_ag.calibrate(runs)
    assert sorted(coefficients) == [1, 3, 5] == linear_ag.regressed_steps(6)
    for c in coefficients.values():
        assert torch.allclose(torch.tensor(c), torch.tensor([0.5, 0.25, 0.1]), atol=1e-6)
    assert max(linear_ag.relative_error(coefficients, runs).values()) < 1e-12  # float32 data


def test_dump_and_load_round_trip():
    text = linear_ag.dump(6, {1: [0.5, 0.25, 0.1], 3: [1.0, 0.0, 0.0]}, {"cfg": 5.0})
    assert linear_ag.load(text) == (6, {1: [0.5, 0.25, 0.1], 3: [1.0, 0.0, 0.0]}, {"cfg": 5.0})
