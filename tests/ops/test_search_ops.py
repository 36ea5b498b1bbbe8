"""The search samplers' math against independent statements: the ancestral step keeps the forward process's marginal
(x = alpha x0 + sigma eps lands on alpha' x0 + sigma' eps' when the clean estimate is exact); Diffusion Tree
Sampling's soft value is 1/lambda log mean exp(lambda v), its Boltzmann descent over a fully backed-up tree draws a
leaf with probability exp(lambda r) / sum exp(lambda r) (the empirical distribution reweighted by exp(lambda r), the
paper's target), the greedy answer is the best leaf, selection frequencies follow exp(lambda v); beam search's plan
never exceeds the budget and costs what the official algorithm evaluates."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import search


def _orthonormal(n, dim=6):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return [q[:, k].reshape(1, dim) for k in range(n)]


@settings(max_examples=60, deadline=None)
@given(sigma=st.floats(0.05, 0.95), share=st.floats(0.05, 0.95), flow=st.booleans(), clean=st.floats(-2, 2))
def test_ancestral_step_keeps_the_marginal(sigma, share, flow, clean):
    """With the exact clean estimate, the step maps alpha x0 + sigma e1 (noise e2) to alpha' x0 + n: n of norm
    sigma' orthogonal to x0 (eps models: alpha = 1; flow: alpha = 1 - sigma); the schedule is in ComfyUI's space
    (eps models' sigmas unbounded above: scale them up)."""
    scale = 1.0 if flow else 10.0
    s, sn = torch.tensor(sigma * scale, dtype=torch.float64), torch.tensor(sigma * share * scale, dtype=torch.float64)
    e1, e2, e3 = _orthonormal(3)
    alpha = (lambda v: 1 - v) if flow else (lambda v: 1.0)
    x0 = clean * e3
    x = alpha(s) * x0 + s * e1
    out = search.ancestral_step(x, x0, s, sn, e2, flow)
    along = float((out * e3).sum())
    assert along == pytest.approx(float(alpha(sn) * clean), abs=1e-9)
    noise = out - along * e3
    assert float(noise.norm()) == pytest.approx(float(sn), rel=1e-9)


def test_ancestral_step_to_zero_returns_the_clean_estimate():
    x, den = torch.randn(2, 3), torch.randn(2, 3)
    for flow in (False, True):
        out = search.ancestral_step(x, den, torch.tensor(0.5), torch.tensor(0.0), None, flow)
        assert torch.equal(out, den)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-20, 0), min_size=1, max_size=6), lam=st.floats(0.01, 20))
def test_soft_value_is_log_mean_exp(values, lam):
    expected = math.log(sum(math.exp(lam * v) for v in values) / len(values)) / lam
    assert search.soft_value(values, lam) == pytest.approx(expected, abs=1e-9)
    assert min(values) - 1e-9 <= search.soft_value(values, lam) <= max(values) + 1e-9


def test_soft_value_limits():
    values = [-3.0, -1.0, -2.0]
    assert search.soft_value(values, 0) == pytest.approx(-2.0)
    assert search.soft_value(values, 1e4) == pytest.approx(-1.0, abs=1e-3)


def _full_tree(rewards, branching, lam):
    """A tree whose leaves carry ``rewards`` (branching ** depth of them), backed up leaf by leaf."""
    depth = round(math.log(len(rewards), branching))
    tree = search.Tree(depth - 1, branching, lam, [False] * depth)
    leaves = []

    def grow(node, level):
        if level == depth:
            leaves.append(node)
            return
        for _ in range(branching):
            grow(tree.add_child(node, None), level + 1)
    grow(tree.root, 0)
    for leaf, reward in zip(leaves, rewards):
        tree.backup(leaf, reward)
    return tree, leaves


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_boltzmann_descent_draws_the_reweighted_leaf_distribution(lam):
    rewards = [-0.3, -2.0, -1.1, -0.1, -4.0, -0.7, -1.5, -0.2]
    tree, leaves = _full_tree(rewards, 2, lam)
    target = torch.tensor([math.exp(lam * r) for r in rewards], dtype=torch.float64)
    target /= target.sum()
    for leaf, p in zip(leaves, target):  # the descent's probability: the product of the choices on the way
        prob, node = 1.0, leaf
        while node.parent is not None:
            siblings = node.parent.children
            prob *= float(search.boltzmann([c.value for c in siblings], lam)[siblings.index(node)])
            node = node.parent
        assert prob == pytest.approx(float(p), rel=1e-9)
    rng = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(leaves), dtype=torch.float64)
    for _ in range(4000):
        counts[leaves.index(tree.sample_terminal(rng))] += 1
    assert (counts / counts.sum() - target).abs().max() < 0.03


def test_root_value_and_visits_after_backup():
    rewards = [-1.0, -2.0, -0.5, -3.0]
    lam = 2.0
    tree, _ = _full_tree(rewards, 2, lam)
    left = math.log((math.exp(lam * -1.0) + math.exp(lam * -2.0)) / 2) / lam
    right = math.log((math.exp(lam * -0.5) + math.exp(lam * -3.0)) / 2) / lam
    assert tree.root.children[0].value == pytest.approx(left)
    assert tree.root.value == pytest.approx(math.log((math.exp(lam * left) + math.exp(lam * right)) / 2) / lam)
    assert tree.root.visits == 4 and [c.visits for c in tree.root.children] == [2, 2]
    assert tree.root.value == pytest.approx(math.log(sum(math.exp(lam * r) for r in rewards) / 4) / lam)
    assert tree.best_terminal() is tree.terminals[2][0]
    assert tree.root.exhausted


def test_greedy_selection_follows_the_best_value_and_boltzmann_its_weights():
    tree = search.Tree(3, 2, 1.0, [False] * 4)
    a, b = tree.add_child(tree.root, None), tree.add_child(tree.root, None)
    a.value, b.value = -1.0, -2.0
    assert tree.select(None, True, 100) is a  # a has room for children: expanded there
    rng = torch.Generator().manual_seed(1)
    picks = [tree.select(rng, False, 100) for _ in range(3000)]
    share = sum(p is a for p in picks) / len(picks)
    assert share == pytest.approx(math.e / (math.e + 1), abs=0.03)


def test_selection_respects_the_budget_and_deterministic_steps():
    tree = search.Tree(3, 3, 1.0, [False, False, True])
    node = tree.root
    for _ in range(4):
        node = tree.add_child(node, None)
    tree.backup(node, -1.0)
    assert tree.branch_cost(tree.root) == 3
    assert tree.select(None, True, 3) is tree.root  # room at the root, affordable
    picked = tree.select(None, True, 2)  # the root is too costly: branch lower
    assert picked.step == 0 and tree.branch_cost(picked) == 2
    assert tree.select(None, True, 0) is None  # nothing costs 0: the step into sigma 0 keeps one child
    assert tree.room(tree.root.children[0].children[0].children[0]) == 1


@settings(max_examples=80, deadline=None)
@given(steps=st.integers(1, 12), beams=st.integers(1, 4), candidates=st.integers(1, 4), lookahead=st.integers(1, 8),
       extra=st.integers(0, 200))
def test_beam_plan_stays_within_budget_and_counts_the_official_evaluations(steps, beams, candidates, lookahead, extra):
    budget = beams * steps + extra
    searched, cost = search.beam_plan(steps, beams, candidates, lookahead, budget)
    assert cost <= budget and not searched[-1]
    # the official loop, counted: every beam is evaluated at each step unless the previous step's lookahead already
    # evaluated it there; a searched step runs one lookahead (its evaluations) per candidate of every beam
    evaluated, count = False, 0
    for i in range(steps):
        if not evaluated:
            count += beams
        evaluated = False
        if searched[i]:
            remaining = steps - (i + 1)
            count += beams * candidates * min(lookahead, remaining)
            evaluated = True
    assert count == cost
    if all(searched[:-1]):
        return
    first_unsearched = searched.index(False)
    if first_unsearched < steps - 1:  # greedy from the first step: the next step would not have fit
        trial = list(searched)
        trial[first_unsearched] = True
        assert search.beam_cost(trial, beams, candidates, lookahead) > budget


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(2, 30), lookahead=st.integers(1, 40), data=st.data())
def test_lookahead_points(steps, lookahead, data):
    step = data.draw(st.integers(0, steps - 2))
    points = search.lookahead_indices(step, steps, lookahead)
    assert points[0] == step + 1
    assert all(a < b for a, b in itertools.pairwise(points)) and points[-1] < steps
    assert len(points) == min(lookahead, steps - step - 1)


def test_top_rows_keeps_order_of_equals():
    assert search.top_rows([0.1, 0.5, 0.5, -1.0], 2).tolist() == [1, 2]
