import itertools
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import cache_search as search
from guidance_ops.cache_schedule import (Schedule, ScheduleError, analytic_speedup, check_fits, dump_schedule,
                                         load_schedule, non_uniform, parse_unit, relative_cost, uniform)


def official_quad_center(total_numbers, n_samples, center, pow):
    """DeepCache's sample_from_quad_center (DeepCache/sd/pipeline_stable_diffusion.py), numpy complex power and all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns that int32() drops the imaginary part, which the code relies on
        while pow > 1:
            x_values = np.linspace((-center) ** (1 / pow), (total_numbers - center) ** (1 / pow), n_samples + 1)
            indices = [0] + [int(x) + center for x in np.unique(np.int32(x_values ** pow))[1:-1]]
            if len(indices) == n_samples:
                return sorted(indices)
            pow -= 0.02
    return None


def on(pattern):
    return [i for i, c in enumerate(pattern) if c]


# --- fixed schedules -------------------------------------------------------------------------------------------

def test_uniform_is_every_nth_step():
    assert on(uniform(10, 3)) == [0, 3, 6, 9]
    assert uniform(4, 1) == [True] * 4
    assert uniform(3, 7) == [True, False, False]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ScheduleError, match="interval"):
            uniform(10, bad)
    with pytest.raises(ScheduleError, match="steps"):
        uniform(0, 2)


def test_non_uniform_matches_the_paper_demo_schedule():
    assert on(non_uniform(50, 5, center=15, power=1.4)) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert official_quad_center(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


@pytest.mark.parametrize("steps", list(range(16, 101, 3)) + [20, 25, 30, 50])
@pytest.mark.parametrize("interval", [2, 3, 4, 5, 7])
def test_non_uniform_matches_the_official_code_for_the_default_center(steps, interval):
    expected = official_quad_center(steps, math.ceil(steps / interval), 15, 1.4)
    if expected is None:  # the official code finds no power either
        with pytest.raises(ScheduleError, match="no non-uniform schedule"):
            non_uniform(steps, interval)
        return
    pattern = non_uniform(steps, interval)
    assert len(pattern) == steps and on(pattern) == expected


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 80), interval=st.integers(1, 9), center=st.integers(0, 100))
def test_non_uniform_has_ceil_t_over_n_compute_steps_starting_at_zero(steps, interval, center):
    try:
        pattern = non_uniform(steps, interval, center=center)
    except ScheduleError as error:
        assert "uniform schedule" in str(error)
        return
    assert len(pattern) == steps and pattern[0]
    assert sum(pattern) == math.ceil(steps / interval)
    if center >= steps:  # a center past the end is clamped to the last step
        assert pattern == non_uniform(steps, interval, center=steps - 1)


def test_non_uniform_is_denser_around_the_center():
    gaps = np.diff(on(non_uniform(50, 5, center=15)))
    assert gaps.argmin() in (1, 2, 3, 4) and gaps[-1] == gaps.max()


def test_non_uniform_rejects_bad_settings():
    with pytest.raises(ScheduleError, match="power"):
        non_uniform(20, 3, power=1.0)
    with pytest.raises(ScheduleError, match="center"):
        non_uniform(20, 3, center=-1)


# --- units and schedules ---------------------------------------------------------------------------------------

def test_parse_unit_forms():
    assert parse_unit("branch 0") == ("branch", 0, 0)
    assert parse_unit("branch 12") == ("branch", 12, 12)
    assert parse_unit("double 3-7") == ("double", 3, 7)
    assert parse_unit("single 5") == ("single", 5, 5)
    assert parse_unit("joint 0-23") == ("joint", 0, 23)
    for bad in ("branch", "branch -1", "branch 1-2", "double 7-3", "mid 1", "double a-b", "", 3, None):
        with pytest.raises(ScheduleError, match="branch|smaller"):
            parse_unit(bad)


def test_schedule_round_trips_through_json():
    s = Schedule.from_pattern(["branch 0"], uniform(10, 3), meta={"source": "uniform"})
    assert s.steps == 10 and s.units == ("branch 0",) and s.meta == {"source": "uniform"}
    assert [s.computes("branch 0", i) for i in range(10)] == uniform(10, 3)
    data = s.to_json()
    assert data == {"format": "trainfree-cache-schedule", "version": 1, "steps": 10,
                    "compute": {"branch 0": "CRRCRRCRRC"}, "meta": {"source": "uniform"}}
    assert Schedule.from_json(data) == s
    text = dump_schedule(s)
    assert load_schedule(text) == s and dump_schedule(load_schedule(text)) == text and json.loads(text) == data
    multi = Schedule.from_json({"format": "trainfree-cache-schedule", "version": 1, "steps": 3,
                                "compute": {"double 0-9": "CRC", "single 0-19": "CCR"}})
    assert multi.units == ("double 0-9", "single 0-19") and multi.meta == {}
    assert not multi.computes("double 0-9", 1) and multi.computes("single 0-19", 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.lists(st.sampled_from(
    ["branch 0", "branch 3", "double 0-18", "single 2", "joint 4-9"]), min_size=1, max_size=4, unique=True))
def test_any_valid_schedule_round_trips(pattern, units):
    pattern = [True] + pattern[1:]
    s = Schedule.from_pattern(units, pattern, meta={"cost": 0.5})
    assert load_schedule(dump_schedule(s)) == s
    assert all(s.compute[u] == tuple(pattern) for u in units)


GOOD = {"format": "trainfree-cache-schedule", "version": 1, "steps": 4, "compute": {"branch 0": "CRCR"}}


@pytest.mark.parametrize("change, message", [
    (None, "JSON object"),
    ({"format": "something"}, "format"),
    ({"version": 2}, "version 2"),
    ({"steps": None}, "steps"),
    ({"steps": 0}, "steps"),
    ({"steps": "4"}, "steps"),
    ({"compute": {"branch 0": "CRC"}}, r"'branch 0'.*3 letters.*4 steps"),
    ({"compute": {"branch 0": "CXCR"}}, "C \\(compute\\) and R"),
    ({"compute": {"blocks 1": "CRCR"}}, "unknown cache unit"),
    ({"compute": {"branch 0": "RCCR"}}, "first step must be C"),
    ({"compute": {}}, "at least one unit"),
])
def test_from_json_rejects_broken_schedules_naming_the_fix(change, message):
    data = None if change is None else {**GOOD, **change}
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_json(data)


def test_load_schedule_reports_json_syntax_errors_with_their_position():
    with pytest.raises(ScheduleError, match="line 2, column"):
        load_schedule('{"format": "trainfree-cache-schedule",\n "steps": 4,,}')


def test_check_fits_names_the_fix():
    s = Schedule.from_pattern(["branch 1"], uniform(20, 3))
    check_fits(s, 20, ["branch 0", "branch 1"])
    with pytest.raises(ScheduleError, match="has 20 steps but the sampler runs 25: set steps to 20 or make the "
                                            "schedule for 25 steps"):
        check_fits(s, 25, ["branch 1"])
    with pytest.raises(ScheduleError, match="'branch 1'.*branch 0, branch 2"):
        check_fits(s, 20, ["branch 0", "branch 2"])


def test_relative_cost_counts_the_skipped_shares():
    s = Schedule.from_json({**GOOD, "steps": 4, "compute": {"double 0-9": "CRRR", "single 0-9": "CCRR"}})
    # step 0: full pass; step 1: double skipped (0.3); steps 2, 3: both skipped (0.3 + 0.5)
    assert relative_cost(s, {"double 0-9": 0.3, "single 0-9": 0.5}) == pytest.approx((1 + 0.7 + 0.2 + 0.2) / 4)
    assert relative_cost(Schedule.from_pattern(["branch 0"], [True] * 5), {"branch 0": 0.9}) == 1.0
    with pytest.raises(ScheduleError, match="single 0-9"):
        relative_cost(s, {"double 0-9": 0.3})


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.floats(0.01, 1.0), st.integers(1, 6))
def test_uniform_schedule_cost_approaches_the_analytic_speedup(interval, shallow, repeats):
    steps = interval * repeats  # whole periods: the cost is exactly the analytic one
    s = Schedule.from_pattern(["branch 0"], uniform(steps, interval))
    cost = relative_cost(s, {"branch 0": 1 - shallow})
    assert 1 / cost == pytest.approx(analytic_speedup(interval, shallow))


def test_analytic_speedup_values():
    assert analytic_speedup(1, 0.2) == 1.0
    assert analytic_speedup(5, 0.1) == pytest.approx(5 / 1.4)
    with pytest.raises(ScheduleError):
        analytic_speedup(3, 0.0)


# --- CacheQuant dynamic programming ----------------------------------------------------------------------------

def brute_force_best(features, interval, min_len, max_len):
    steps, groups = len(features), math.ceil(len(features) / interval)
    best = None
    for cuts in itertools.combinations(range(1, steps), groups - 1):
        bounds = (0,) + cuts + (steps,)
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if not all(min_len <= n <= max_len for n in lengths):
            continue
        cost = sum(float((features[i] - features[a]).abs().sum())
                   for a, b in zip(bounds, bounds[1:]) for i in range(a, b))
        best = cost if best is None else min(best, cost)
    return best


def pattern_cost(features, pattern):
    starts = on(pattern)
    return sum(float((features[i] - features[max(s for s in starts if s <= i)]).abs().sum())
               for i in range(len(features)))


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 12), interval=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_dp_schedule_is_the_brute_force_optimum(steps, interval, seed):
    g = torch.Generator().manual_seed(seed)
    # a drifting feature with random jumps, so that the best split points differ from the uniform ones
    features = list(torch.cumsum(torch.randn(steps, 3, 2, generator=g) ** 3, 0).double())
    min_len, max_len = math.ceil(interval / 2), 2 * interval
    expected = brute_force_best(features, interval, min_len, max_len)
    if expected is None:
        with pytest.raises(ScheduleError, match="cannot be split"):
            search.dp_schedule(features, interval)
        return
    pattern = search.dp_schedule(features, interval)
    assert len(pattern) == steps and pattern[0] and sum(pattern) == math.ceil(steps / interval)
    assert pattern_cost(features, pattern) == pytest.approx(expected, abs=1e-9)


def test_dp_schedule_recomputes_right_after_a_jump():
    features = [torch.zeros(4)] * 5 + [torch.full((4,), 10.0)] * 7  # the feature jumps at step 5
    assert on(search.dp_schedule(features, 6, min_len=1, max_len=12)) == [0, 5]
    assert search.dp_schedule(features, 1) == [True] * 12
    with pytest.raises(ScheduleError, match="features"):
        search.dp_schedule([], 3)


# --- Pareto tools and evolution --------------------------------------------------------------------------------

def test_pareto_front_sort_and_crowding():
    points = [(0.5, 1.0), (0.2, 3.0), (0.5, 1.0), (0.8, 0.5), (0.6, 2.0), (0.9, 3.0), (0.2, 3.5)]
    assert search.pareto_front(points) == [0, 1, 2, 3]  # equal points are both on the front
    assert search.nondominated_sort(points) == [[0, 1, 2, 3], [4, 6], [5]]
    d = search.crowding_distance(points, [1, 0, 3])
    assert d[0] == math.inf and d[2] == math.inf
    assert d[1] == pytest.approx((0.8 - 0.2) / 0.6 + (3.0 - 0.5) / 2.5)
    assert search.pareto_front([]) == [] and search.nondominated_sort([]) == []


STEPS = 14
WEIGHTS = [(i + 1) ** 2 / 10 for i in range(STEPS)]  # skipping a late step hurts more: known optimal front


def synthetic(genome):
    return sum(genome) / len(genome), sum(w for w, c in zip(WEIGHTS, genome) if not c)


def first_step_computes(genome):
    return (True,) + tuple(genome[1:])


def hypervolume(points, ref=(1.1, sum(WEIGHTS) + 1)):
    front = sorted({points[i] for i in search.pareto_front(points)})
    area, last_drift = 0.0, ref[1]
    for cost, drift in front:
        area += (ref[0] - cost) * (last_drift - drift)
        last_drift = drift
    return area


def test_evolve_beats_random_search_at_equal_evaluations_and_is_deterministic():
    archive = search.evolve(synthetic, STEPS, population=12, generations=10, seed=3, repair=first_step_computes)
    assert all(g[0] for g, _ in archive)
    genomes = [g for g, _ in archive]
    assert len(genomes) == len(set(genomes))
    # random search with the same number of evaluations, at random densities as evolve's first population
    rng = random.Random(3)
    random_points = []
    for _ in range(len(archive)):
        density = rng.random()
        random_points.append(synthetic(first_step_computes(tuple(rng.random() < density for _ in range(STEPS)))))
    evolved = [objectives for _, objectives in archive]
    assert hypervolume(evolved) > hypervolume(random_points) + 3
    front = [evolved[i] for i in search.pareto_front(evolved)]
    assert sum(any(search._dominates(f, p) for f in front) for p in random_points) > 0.7 * len(random_points)
    # the true front skips the m cheapest steps (1..m) for each m; evolve gets close to it
    optimal = [synthetic(tuple(i == 0 or i > m for i in range(STEPS))) for m in range(STEPS)]
    assert hypervolume(evolved) > 0.92 * hypervolume(optimal)
    assert search.evolve(synthetic, STEPS, population=12, generations=10, seed=3, repair=first_step_computes) == archive


def test_evolve_evaluates_each_genome_once_uses_seeds_and_reports_progress():
    calls, progress = [], []

    def counted(genome):
        calls.append(genome)
        return synthetic(genome)

    seed_genome = tuple(i % 3 == 0 for i in range(STEPS))
    archive = search.evolve(counted, STEPS, population=8, generations=5, seeds=[seed_genome, seed_genome],
                            repair=first_step_computes, on_generation=lambda i, a: progress.append((i, len(a))))
    assert len(calls) == len(set(calls)) == len(archive)
    assert archive[0][0] == seed_genome
    assert [i for i, _ in progress] == list(range(6))
    assert [n for _, n in progress] == sorted(n for _, n in progress) and progress[-1][1] == len(archive)


def test_evolve_stops_when_asked():
    calls = []

    def counted(genome):
        calls.append(genome)
        return synthetic(genome)

    archive = search.evolve(counted, STEPS, population=8, generations=50, should_stop=lambda: len(calls) >= 11)
    assert len(calls) == 11 and len(archive) == 11
    assert search.evolve(counted, STEPS, should_stop=lambda: True) == []


def test_best_within_budget():
    archive = [((True,), (0.9, 1.0)), ((False,), (0.4, 3.0)), ((True, False), (0.5, 2.0)), ((False, True), (0.45, 2.0))]
    assert search.best_within(archive, 0.5) == ((False, True), (0.45, 2.0))
    assert search.best_within(archive, 1.0)[1] == (0.9, 1.0)
    with pytest.raises(ScheduleError, match="cheapest schedule found costs 0.400"):
        search.best_within(archive, 0.3)


# --- plot ------------------------------------------------------------------------------------------------------

def colour_mask(image, colour):
    return (image - torch.tensor(colour)).abs().amax(-1) < 1e-4


def test_pareto_plot_marks_the_chosen_point_front_and_budget():
    points = [(0.2, 5.0), (0.4, 2.0), (0.6, 1.0), (0.9, 0.2), (0.7, 3.0), (0.5, 4.5)]
    image = search.pareto_plot(points, chosen=0, budget=0.55, size=(200, 300))
    assert image.shape == (200, 300, 3) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    red = colour_mask(image, search._COLOURS["chosen"]).nonzero().float()
    green = colour_mask(image, search._COLOURS["budget"]).nonzero()
    blue = colour_mask(image, search._COLOURS["front"]).nonzero()
    assert len(red) == 81  # one 9 x 9 square
    row, col = red.mean(0).tolist()
    assert row < 60 and col < 60  # cheapest and worst drift: top left
    assert green[:, 1].unique().numel() == 1  # one vertical line
    budget_col = int(green[0, 1])
    assert budget_col > col
    # the front (the 4 points) is joined: blue pixels on both sides of the budget line, none at dominated points
    assert (blue[:, 1] < budget_col).any() and (blue[:, 1] > budget_col).any()
    other = search.pareto_plot(points, chosen=(0.9, 0.2), size=(200, 300))
    row, col = colour_mask(other, search._COLOURS["chosen"]).nonzero().float().mean(0).tolist()
    assert row > 140 and col > 240  # costliest and least drift: bottom right
    assert not colour_mask(other, search._COLOURS["budget"]).any()
    with pytest.raises(ScheduleError, match="nothing to plot"):
        search.pareto_plot([])
