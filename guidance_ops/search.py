"""Inference-time search over denoising paths (plain torch): the stochastic transition the searches share, Diffusion
Tree Sampling's tree, Diffusion Latent Beam Search's plan and selection, and budget bookkeeping.

The transition is ComfyUI's Euler ancestral step at eta 1 (k-diffusion's on eps / v models, its rectified-flow
branch on flow models), so that one path of a search is ordinary ``euler_ancestral`` sampling.

Diffusion Tree Sampling (Jain et al., 2025, "Diffusion Tree Sampling: Scalable inference-time alignment of
diffusion models"). From the paper: the reverse chain as a tree whose nodes hold a noisy state, a soft-value
estimate and a visit count; each iteration selects from the root by a Boltzmann policy over the children's soft
values (DTS) or greedily (DTS*), expands a node that has fewer children than the maximum by one denoising step, rolls
out to a clean sample (every state joins the tree), and backs the terminal reward up with the soft Bellman
backup v(x_t) = 1/lambda log mean_children exp(lambda v(child)); the final sample is drawn by the same Boltzmann
descent (DTS, a sample of p(x) exp(lambda r(x))). A dummy root whose children are initial noises. Ours: the
children of a node share the node's model evaluation (the step's mean; only the noise differs), so branching at
step s costs the remaining steps only; a step into sigma 0 is deterministic and keeps one child; selection skips
exhausted subtrees and, when the budget is short, descends past nodes it cannot afford to branch; DTS* returns the
best terminal sample found (the paper's search objective) rather than a greedy descent; lambda = 0 is the plain
mean (no reward weighting).

Diffusion Latent Beam Search (Oshima et al., 2025, "Inference-Time Text-to-Video Alignment with Diffusion Latent
Beam Search", official code shim0114/T2V-Diffusion-Search). From the paper and its code: B beams; at each searched
step every beam's step is drawn K times (ancestral noise), each candidate is scored by the reward of a lookahead
estimate of its clean image (L deterministic eta-0 steps from the candidate towards 0, the last step's clean
estimate), and the best B of the B x K candidates go on; at the end the best beam is returned. Ours: the lookahead
steps follow the run's own schedule (the official code: evenly spaced timesteps), the lookahead's first evaluation
(at the candidate itself) is kept as the next step's evaluation of a surviving candidate, and with a budget below the
full plan the steps are searched from the first while the budget allows (the rest are plain steps of every beam).
"""
import math

import torch


# ---- the transition

def ancestral_step(x, denoised, sigma, sigma_next, noise, flow, s_noise=1.0):
    """ComfyUI's Euler ancestral step (eta 1) from ``sigma`` to ``sigma_next`` (0-dim tensors), written with the
    same operations in the same order as k-diffusion's ``sample_euler_ancestral`` (and its rectified-flow branch for
    flow models), so a path is bit-identical to ComfyUI's sampler with the same noise."""
    if flow:
        if sigma_next == 0:
            return denoised
        downstep_ratio = 1 + (sigma_next / sigma - 1) * 1.0
        sigma_down = sigma_next * downstep_ratio
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
        ratio = sigma_down / sigma
        x = ratio * x + (1 - ratio) * denoised
        return (alpha_next / alpha_down) * x + noise * s_noise * renoise
    sigma_up = min(sigma_next, 1.0 * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    if sigma_down == 0:
        return denoised
    d = (x - denoised) / sigma.reshape([1] * x.ndim)
    return x + d * (sigma_down - sigma) + noise * s_noise * sigma_up


def euler_step(x, denoised, sigma, sigma_next):
    """The deterministic (eta 0, DDIM) Euler step the lookahead takes."""
    if sigma_next == 0:
        return denoised
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def deterministic_steps(sigmas):
    """``[n]`` booleans: step i (sigma_i -> sigma_i+1) draws no noise (it lands on sigma 0)."""
    return [float(sigmas[i + 1]) == 0 for i in range(len(sigmas) - 1)]


def generator(seed, *salt):
    """A CPU generator for one purpose of one run (a row's search, one path's noise), from the run's seed."""
    mixed = int(seed or 0)
    for s in salt:
        mixed = (mixed * 1000003 + 7919 * (int(s) + 1)) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(mixed)


# ---- Diffusion Tree Sampling

def soft_value(values, lam):
    """The soft Bellman backup of children's values: 1/lambda log mean exp(lambda v) (lambda 0: the mean)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if lam == 0:
        return float(values.mean())
    return float((torch.logsumexp(lam * values, 0) - math.log(values.numel())) / lam)


def boltzmann(values, lam):
    """Selection probabilities over children: proportional to exp(lambda v)."""
    return torch.softmax(lam * torch.as_tensor(values, dtype=torch.float64), 0)


class Node:
    __slots__ = ("step", "state", "denoised", "parent", "children", "value", "visits", "exhausted")

    def __init__(self, step, state=None, parent=None):
        self.step, self.state, self.parent = step, state, parent
        self.denoised, self.children, self.value, self.visits, self.exhausted = None, [], None, 0, False


class Tree:
    """One image's search tree over ``steps`` denoising steps. The root (step -1) is the dummy node whose children
    are initial noises; a node at step s holds the state at sigma_s; terminals are at step ``steps``."""

    def __init__(self, steps, max_children, lam, deterministic):
        self.steps, self.max_children, self.lam = steps, max_children, lam
        self.deterministic = deterministic
        self.root = Node(-1)
        self.terminals = []  # (node, reward) in the order found

    def room(self, node):
        """How many children ``node`` may have."""
        if node.step >= self.steps:
            return 0
        if node.step >= 0 and self.deterministic[node.step]:
            return 1
        return self.max_children

    def branch_cost(self, node):
        """Model evaluations of one new path branching at ``node``: its evaluation is shared by its children, so
        a path from step s costs the steps after it (from the root: all of them)."""
        return self.steps - node.step - 1

    def select(self, rng, greedy, budget_left):
        """The node to expand next: descend from the root while the node is full (or too costly to branch for
        ``budget_left``), choosing among children not yet exhausted by the Boltzmann policy (``greedy``: the best
        value). None when nothing affordable is left."""
        node = self.root
        while True:
            if len(node.children) < self.room(node) and self.branch_cost(node) <= budget_left:
                return node
            open_children = [c for c in node.children if not c.exhausted and c.value is not None]
            if not open_children:
                return None
            node = self._choose(open_children, rng, greedy)

    def _choose(self, children, rng, greedy):
        values = [c.value for c in children]
        if greedy:
            return children[max(range(len(values)), key=lambda i: values[i])]
        index = int(torch.multinomial(boltzmann(values, self.lam), 1, generator=rng))
        return children[index]

    def add_child(self, parent, state):
        child = Node(parent.step + 1, state, parent)
        parent.children.append(child)
        return child

    def backup(self, terminal, reward):
        """Set the terminal's value to its reward and update every ancestor's visit count and soft value."""
        self.terminals.append((terminal, float(reward)))
        terminal.value, terminal.exhausted = float(reward), True
        terminal.visits += 1
        node = terminal.parent
        while node is not None:
            node.visits += 1
            node.value = soft_value([c.value for c in node.children if c.value is not None], self.lam)
            node.exhausted = (len(node.children) >= self.room(node) and all(c.exhausted for c in node.children))
            node = node.parent

    def sample_terminal(self, rng):
        """DTS's sample: a Boltzmann descent from the root to a terminal."""
        node = self.root
        while node.children:
            node = self._choose([c for c in node.children if c.value is not None], rng, greedy=False)
        return node

    def best_terminal(self):
        """DTS*'s answer: the terminal with the highest reward found (the first of equals)."""
        return max(self.terminals, key=lambda t: t[1])[0] if self.terminals else None

    def size(self):
        count, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children)
        return count - 1


# ---- Diffusion Latent Beam Search

def lookahead_indices(step, steps, lookahead):
    """Indices of the sigmas a candidate at sigma_{step+1} is evaluated at by a lookahead of ``lookahead``
    deterministic steps: the candidate's own, then evenly along the remaining schedule (at most one per step)."""
    start = step + 1
    count = min(lookahead, steps - start)
    return [start + (k * (steps - start)) // count for k in range(count)] if count > 0 else []


def beam_plan(steps, beams, candidates, lookahead, budget):
    """``(searched, cost)``: which steps are searched (from the first, while the budget allows) and the model
    evaluations per image. Unsearched steps cost one evaluation per beam unless the previous step was searched
    (its candidates' first lookahead evaluation is the surviving beams' evaluation); a searched step costs one
    lookahead per candidate. The last step is never searched (it lands deterministically on sigma 0)."""
    searched = [False] * steps
    cost = beam_cost(searched, beams, candidates, lookahead)
    if cost > budget:
        return searched, cost
    for i in range(steps - 1):
        searched[i] = True
        trial = beam_cost(searched, beams, candidates, lookahead)
        if trial > budget:
            searched[i] = False
        else:
            cost = trial
    return searched, cost


def beam_cost(searched, beams, candidates, lookahead):
    steps, cost = len(searched), 0
    for i in range(steps):
        if i == 0 or not searched[i - 1]:
            cost += beams
        if searched[i]:
            cost += beams * candidates * len(lookahead_indices(i, steps, lookahead))
    return cost


def top_rows(scores, keep):
    """Indices of the ``keep`` best scores, best first; equal scores keep their order."""
    order = torch.argsort(-torch.as_tensor(scores, dtype=torch.float64), stable=True)
    return order[:keep]
