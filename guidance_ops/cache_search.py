"""Searching cache schedules (issue #13): CacheQuant's dynamic programming and an ECAD-style evolutionary search.

- ``dp_schedule``: CacheQuant (Liu, Li, Gu, CVPR 2025, arXiv 2503.01323), "dynamic programming schedule": split the
  T steps of an uncached run into K = ceil(T / N) contiguous groups, each recomputed at its first step, so that the
  summed L1 distance of every step's cached feature to its group's first feature is least.
- ``evolve``: a multi-objective genetic search (NSGA-II: non-dominated sorting plus crowding distance) over binary
  compute matrices, as ECAD (Aggarwal, Shrivastava, Gwilliam, ICLR 2026, arXiv 2506.15682) does for DiT caching;
  it returns every evaluated schedule so a caller can pick from the Pareto front of (cost, drift).
- ``pareto_plot``: that front as a ComfyUI-style image.
"""
import math
import random

import torch

from .cache_schedule import ScheduleError


def dp_schedule(features, interval, min_len=None, max_len=None):
    """Per-step compute pattern from CacheQuant's dynamic programming.

    ``features``: the T cached features F_1..F_T of an uncached run (tensors of one shape). A group of steps
    s..e-1 costs sum_i ||F_i - F_s||_1 (the official L1 sum, not a mean). Group lengths are limited to
    [min_len, max_len], by default [ceil(N/2), 2N] as in the official code.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ScheduleError(f"the cache interval must be a whole number >= 1, got {interval!r}")
    steps = len(features)
    if steps == 0:
        raise ScheduleError("no features: run the sampler uncached once to collect one feature per step")
    min_len = math.ceil(interval / 2) if min_len is None else min_len
    max_len = 2 * interval if max_len is None else max_len
    if not 1 <= min_len <= max_len:
        raise ScheduleError(f"group lengths must satisfy 1 <= min_len <= max_len, got {min_len} and {max_len}")
    groups = math.ceil(steps / interval)
    # cost[s][L]: the cost of the group that starts at step s and lasts L steps
    cost = []
    for s in range(steps):
        total, row = 0.0, [0.0]
        for i in range(s, min(steps, s + max_len)):
            total += float((features[i].double() - features[s].double()).abs().sum())
            row.append(total)
        cost.append(row)
    best = [[math.inf] * (steps + 1) for _ in range(groups + 1)]
    first_of_last = [[0] * (steps + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for k in range(1, groups + 1):
        for n in range(1, steps + 1):
            for length in range(min_len, min(max_len, n) + 1):
                candidate = best[k - 1][n - length] + cost[n - length][length]
                if candidate < best[k][n]:
                    best[k][n], first_of_last[k][n] = candidate, n - length
    if best[groups][steps] == math.inf:
        raise ScheduleError(f"{steps} steps cannot be split into {groups} groups of {min_len} to {max_len} steps each: "
                            f"change the cache interval or the number of steps")
    starts, n = [], steps
    for k in range(groups, 0, -1):
        n = first_of_last[k][n]
        starts.append(n)
    return [i in starts for i in range(steps)]


def _dominates(a, b):
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def pareto_front(points):
    """Indices (ascending) of the points no other point dominates; both objectives are minimised. Equal points do
    not dominate each other, so all copies of a front point are on the front."""
    return [i for i, p in enumerate(points) if not any(_dominates(q, p) for q in points)]


def nondominated_sort(points):
    """NSGA-II fronts: lists of indices, the Pareto front first, then the front of what remains, and so on."""
    left, fronts = list(range(len(points))), []
    while left:
        front = [i for i in left if not any(_dominates(points[j], points[i]) for j in left)]
        fronts.append(front)
        left = [i for i in left if i not in front]
    return fronts


def crowding_distance(points, front):
    """NSGA-II crowding distance of each index in ``front`` (same order): per objective, the normalised gap between
    its two neighbours; the extreme points of each objective get infinity."""
    distance = {i: 0.0 for i in front}
    for axis in (0, 1):
        ordered = sorted(front, key=lambda i: points[i][axis])
        low, high = points[ordered[0]][axis], points[ordered[-1]][axis]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if high > low:
            for before, i, after in zip(ordered, ordered[1:-1], ordered[2:]):
                distance[i] += (points[after][axis] - points[before][axis]) / (high - low)
    return [distance[i] for i in front]


class _Stop(Exception):
    pass


def evolve(evaluate, genome_length, population=16, generations=8, seed=0, mutation=None, seeds=(),
           on_generation=None, should_stop=None, repair=None):
    """NSGA-II search over genomes (tuples of bools, e.g. a flattened steps x units compute matrix).

    ``evaluate(genome) -> (cost, drift)``, both minimised; each distinct genome is evaluated once. ``repair(genome)``
    returns the genome to use (e.g. forcing each unit's first step to compute); default: as is. ``seeds`` join the
    first population, which is filled up with random genomes of random densities. Each later generation breeds
    ``population`` children (binary tournament on rank then crowding, uniform crossover, bit flips with probability
    ``mutation``, default 1 / genome_length) and keeps the best ``population`` of parents and children.
    ``on_generation(index, archive)`` runs after the first population (index 0) and after each generation
    (1..generations). ``should_stop()`` is asked before every evaluation; when it says True the search ends.
    Deterministic for a seed. Returns the archive: [(genome, (cost, drift))] in evaluation order.
    """
    if genome_length < 1 or population < 2:
        raise ScheduleError(f"evolve needs genome_length >= 1 and population >= 2, got {genome_length}, {population}")
    rng = random.Random(seed)
    repair = repair or (lambda genome: genome)
    mutation = 1.0 / genome_length if mutation is None else mutation
    seen, archive = {}, []

    def normal(genome):
        return tuple(bool(b) for b in repair(tuple(genome)))

    def score(genome):
        genome = normal(genome)
        if len(genome) != genome_length:
            raise ScheduleError(f"a genome has {len(genome)} entries, expected {genome_length}")
        if genome not in seen:
            if should_stop is not None and should_stop():
                raise _Stop
            seen[genome] = tuple(float(v) for v in evaluate(genome))
            archive.append((genome, seen[genome]))
        return genome

    def select(pool):
        """The best ``population`` genomes of ``pool`` by front, then crowding distance, and each one's
        (rank, -crowding) for the tournaments."""
        points = [seen[g] for g in pool]
        kept, info = [], {}
        for rank, front in enumerate(nondominated_sort(points)):
            crowd = crowding_distance(points, front)
            order = sorted(range(len(front)), key=lambda j: -crowd[j])
            for j in order[:population - len(kept)]:
                kept.append(pool[front[j]])
                info[pool[front[j]]] = (rank, -crowd[j])
            if len(kept) == population:
                break
        return kept, info

    def child(parents, info):
        def tournament():
            a, b = rng.choice(parents), rng.choice(parents)
            return min(a, b, key=lambda g: info[g])
        mother, father = tournament(), tournament()
        genes = [m if rng.random() < 0.5 else f for m, f in zip(mother, father)]
        return tuple(not g if rng.random() < mutation else g for g in genes)

    try:
        start = [score(g) for g in seeds]
        for _draw in range(20 * population):
            if len(set(start)) >= population:
                break
            density = rng.random()
            start.append(score(tuple(rng.random() < density for _ in range(genome_length))))
        parents, info = select(list(dict.fromkeys(start)))
        if on_generation is not None:
            on_generation(0, archive)
        for index in range(1, generations + 1):
            children = []
            for _ in range(population):
                for _attempt in range(20):  # prefer a genome not evaluated yet
                    genome = child(parents, info)
                    if normal(genome) not in seen:
                        break
                children.append(score(genome))
            parents, info = select(list(dict.fromkeys(parents + children)))
            if on_generation is not None:
                on_generation(index, archive)
    except _Stop:
        pass
    return archive


def best_within(archive, budget):
    """The archive entry with the lowest drift among those costing at most ``budget`` (ties: the cheaper)."""
    affordable = [entry for entry in archive if entry[1][0] <= budget]
    if not affordable:
        cheapest = min((entry[1][0] for entry in archive), default=None)
        found = "nothing was evaluated" if cheapest is None else f"the cheapest schedule found costs {cheapest:.3f}"
        raise ScheduleError(f"no schedule costs at most {budget}: {found}; raise the budget or search longer")
    return min(affordable, key=lambda entry: (entry[1][1], entry[1][0]))


_COLOURS = {"axes": (0.0, 0.0, 0.0), "point": (0.62, 0.62, 0.62), "front": (0.12, 0.35, 0.85),
            "chosen": (0.9, 0.1, 0.1), "budget": (0.1, 0.6, 0.2)}
_MARGIN = 24


def pareto_plot(points, chosen=None, budget=None, size=(384, 512)):
    """A scatter of (cost on x, drift on y) as an [H, W, 3] float image in 0..1 (ComfyUI IMAGE without the batch):
    all points grey, the Pareto front blue and joined by a line, ``chosen`` (an index into ``points`` or a
    (cost, drift) pair) as a larger red square, ``budget`` as a green vertical line. Axes with 5 ticks, no text."""
    if not points:
        raise ScheduleError("nothing to plot: the search evaluated no schedule")
    height, width = size
    if height < 4 * _MARGIN or width < 4 * _MARGIN:
        raise ScheduleError(f"the plot needs at least {4 * _MARGIN} x {4 * _MARGIN} pixels, got {height} x {width}")
    image = torch.ones(height, width, 3)
    xs = [float(p[0]) for p in points] + ([float(budget)] if budget is not None else [])
    ys = [float(p[1]) for p in points]

    def span(values):
        low, high = min(values), max(values)
        pad = (high - low) * 0.05 or max(abs(low) * 0.05, 1e-3)
        return low - pad, high + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)
    left, right, top, bottom = _MARGIN, width - _MARGIN, _MARGIN, height - _MARGIN

    def pixel(x, y):
        return (round(left + (x - x0) / (x1 - x0) * (right - left)),
                round(bottom - (y - y0) / (y1 - y0) * (bottom - top)))

    def box(col, row, half, colour):
        image[max(row - half, 0):row + half + 1, max(col - half, 0):col + half + 1] = torch.tensor(colour)

    def line(a, b, colour):
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1])) + 1
        for t in torch.linspace(0, 1, n).tolist():
            box(round(a[0] + t * (b[0] - a[0])), round(a[1] + t * (b[1] - a[1])), 0, colour)

    line((left, bottom), (right, bottom), _COLOURS["axes"])
    line((left, top), (left, bottom), _COLOURS["axes"])
    for k in range(5):
        col, row = round(left + k * (right - left) / 4), round(bottom - k * (bottom - top) / 4)
        line((col, bottom), (col, bottom + 4), _COLOURS["axes"])
        line((left - 4, row), (left, row), _COLOURS["axes"])
    if budget is not None:
        col = pixel(float(budget), y0)[0]
        for row in range(top, bottom, 6):  # dashed
            line((col, row), (col, min(row + 3, bottom)), _COLOURS["budget"])
    for p in points:
        box(*pixel(float(p[0]), float(p[1])), 1, _COLOURS["point"])
    front = sorted({(float(points[i][0]), float(points[i][1])) for i in pareto_front(points)})
    for a, b in zip(front, front[1:]):
        line(pixel(*a), pixel(*b), _COLOURS["front"])
    for p in front:
        box(*pixel(*p), 2, _COLOURS["front"])
    if chosen is not None:
        cost, drift = points[chosen] if isinstance(chosen, int) else chosen
        box(*pixel(float(cost), float(drift)), 4, _COLOURS["chosen"])
    return image


def relative_drift(out, reference):
    """How far a cached run's result lies from the uncached one of the same seed: mean squared error over the
    reference's variance (0 = identical; 1 = as far as an unrelated sample of the same spread)."""
    out, reference = out.double(), reference.double()
    return float(((out - reference) ** 2).mean() / reference.var().clamp_min(1e-12))
