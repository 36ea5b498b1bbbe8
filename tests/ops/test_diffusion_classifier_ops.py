"""The Diffusion Classifier's plan against the official eval_prob_adaptive.py (timestep grid, per-stage timesteps,
the noise each (t, eps) pair gets), its elimination's independence of candidate order, and its errors."""
import pytest
import torch

from guidance_ops import diffusion_classifier as dc

# The paper's stage plans (cumulative timesteps, candidates kept): Food-101, CIFAR-10, Pets, STL-10.
PLANS = [([20, 50, 100, 500], [10, 5, 2, 1]), ([50, 500], [5, 1]), ([25, 250], [5, 1]), ([100, 500], [5, 1])]


def official(n_samples, T=1000):
    """eval_prob_adaptive's t_to_eval and per-stage curr_t_to_eval, restated from the official code."""
    max_n = max(n_samples)
    start = T // max_n // 2
    t_to_eval = list(range(start, T, T // max_n))[:max_n]
    evaluated, stages = set(), []
    for n in n_samples:
        curr = t_to_eval[len(t_to_eval) // n // 2::len(t_to_eval) // n][:n]
        curr = [t for t in curr if t not in evaluated]
        evaluated.update(curr)
        stages.append(curr)
    return t_to_eval, stages


@pytest.mark.parametrize("samples,keep", PLANS)
def test_timesteps_match_the_official_plan(samples, keep):
    grid, stages = official(samples)
    assert dc.timestep_grid(samples[-1]) == grid
    assert dc.stage_timesteps(samples) == stages
    assert sum(len(s) for s in stages) == samples[-1]  # every timestep of the grid, each once
    dc.check_stages(samples, keep, candidates=10)


def test_the_grid_is_evenly_spaced_and_centred():
    assert dc.timestep_grid(4) == [125, 375, 625, 875]
    assert dc.timestep_grid(1000) == list(range(1000))


def test_elimination_does_not_depend_on_candidate_order():
    errors = {"a seven": 0.2, "a one": 0.1, "a two": 0.1, "a nine": 0.4}
    best = dc.keep_best(errors, 2)
    assert best == ["a one", "a two"]
    shuffled = dict(reversed(list(errors.items())))
    assert dc.keep_best(shuffled, 2) == best


def test_shared_noise_is_the_same_for_a_seed():
    assert torch.equal(dc.shared_noise(3, (4, 8, 8), 7), dc.shared_noise(3, (4, 8, 8), 7))
    assert not torch.equal(dc.shared_noise(3, (4, 8, 8), 7), dc.shared_noise(3, (4, 8, 8), 8))


def test_squared_error_per_row():
    a, b = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    b[1] *= 3
    assert dc.squared_error(a, b).tolist() == [1.0, 9.0]


@pytest.mark.parametrize("samples,keep,candidates,message", [
    ([50, 500], [5], 10, "as many 'keep' entries"),
    ([500, 50], [5, 1], 10, "must grow"),
    ([50, 500], [5, 2], 10, "end the 'keep' list with 1"),
    ([50, 500], [5, 1], 1, "at least two candidate prompts"),
    ([50, 500], [20, 1], 10, "keep at most 10"),
    ([50, 2000], [5, 1], 10, "use 1 to 1000"),
])
def test_bad_stage_plans_are_refused(samples, keep, candidates, message):
    with pytest.raises(dc.ClassifierError, match=message):
        dc.check_stages(samples, keep, candidates)


def test_bar_chart_marks_the_chosen_candidate():
    image = dc.bar_chart([1.0, 0.5, 0.25], highlight=1)
    assert image.shape == (256, 512, 3) and image.min() >= 0 and image.max() <= 1
    red = (image[..., 0] > 0.8) & (image[..., 2] < 0.2)
    columns = red.any(0).nonzero().flatten()
    assert 512 / 3 < columns.float().mean() < 2 * 512 / 3  # the middle bar
    with pytest.raises(dc.ClassifierError):
        dc.bar_chart([])
