"""Inference-time search as SAMPLERs for SamplerCustomAdvanced: Diffusion Tree Sampling, Diffusion Latent Beam
Search and best-of-N, all on one stochastic transition, ComfyUI's Euler ancestral step (eta 1), evaluated through
the guider (CFG, every MODEL patch and wrapper stay ComfyUI's). The first path of every search starts from the
sampler's own noisy latent and draws ComfyUI's ancestral noise for the run's seed, so a budget of one path is
``euler_ancestral`` bit for bit; other paths start from fresh noise (scaled as ComfyUI scales the run's noise) and
draw their noise from generators seeded by the run's seed, so a search is deterministic for a seed.

Budget: model evaluations per image, one call of the guider's denoiser on one row (CFG's two passes count as one).
Rows of the latent batch are independent searches. Finished paths (and beam search's lookahead estimates) are
scored by decoding with the VAE. The tree keeps two latents per node (the state and its clean estimate).
"""
import logging
import time

import torch

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.samplers

from ...guidance_ops import search as ops
from .family import is_flow_model, model_sampling
from .judging import score_latents
from .pixel_loss import reload_sampled_models
from .runs import check_latent

LOG = logging.getLogger("trainfree")
TITLES = {"tree": "TrainFree Diffusion Tree Sampling", "beam": "TrainFree Latent Beam Search",
          "best_of_n": "TrainFree Best-of-N"}


class SearchError(ValueError):
    pass


def search_sampler(method, scorer, vae, budget, **settings):
    """A KSAMPLER running ``method`` ("tree": max_children, lam, greedy; "beam": beams, candidates, lookahead;
    "best_of_n") within ``budget`` evaluations per image. The report of its last run is ``trainfree_report``."""
    holder = comfy.samplers.KSAMPLER(None)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        run = _Run(holder, model, x, sigmas, extra_args or {}, callback, scorer, vae, budget, TITLES[method])
        with torch.no_grad():
            result = {"tree": _tree, "beam": _beam, "best_of_n": _best_of_n}[method](run, x, **settings)
        holder.trainfree_report = run.report(method, settings)
        LOG.info("%s: %s", run.title, {k: v for k, v in holder.trainfree_report.items() if k != "path_scores"})
        return result

    holder.sampler_function = sample
    holder.trainfree_report = None
    return holder


def minimum_budget(method, steps, beams=1):
    """The evaluations of the cheapest search: one path (beam search: one path per beam)."""
    return steps * (beams if method == "beam" else 1)


class _Run:
    def __init__(self, holder, model, x, sigmas, extra, callback, scorer, vae, budget, title):
        self.model, self.sigmas, self.extra, self.callback = model, sigmas, extra, callback
        self.scorer, self.vae, self.budget, self.title = scorer, vae, int(budget), title
        self.patcher = model.inner_model.model_patcher
        self.sampling = model_sampling(self.patcher)
        self.flow = is_flow_model(self.patcher)
        self.s_noise = getattr(self.sampling, "noise_scale", 1.0) if self.flow else 1.0
        self.seed = extra.get("seed")
        self.rows, self.steps = x.shape[0], len(sigmas) - 1
        self.deterministic = ops.deterministic_steps(sigmas)
        self.used = [0] * self.rows
        self.paths = [0] * self.rows
        self.path_scores = [[] for _ in range(self.rows)]
        self.returned, self.first, self.extra_report = [None] * self.rows, [None] * self.rows, {}
        self.shown, self.started = -1, time.perf_counter()
        self.latent_image = getattr(model, "latent_image", None)
        self.max_denoise = holder.max_denoise(model.inner_model, sigmas)
        self._check(x)

    def _check(self, x):
        check_latent(self.patcher, x)
        if x.ndim != 4:
            raise SearchError(f"{self.title} scores decoded images and serves image latents; this latent has "
                              f"{x.ndim - 2} spatial dimensions (a video model)")
        if self.extra.get("denoise_mask") is not None:
            raise SearchError(f"{self.title} searches whole images and cannot take a latent noise mask: connect "
                              f"the latent without SetLatentNoiseMask / inpainting conditioning")
        if self.steps < 1 or float(self.sigmas[-1]) != 0:
            raise SearchError(f"{self.title} scores finished images: use sigmas that end at 0 with at least one "
                              f"step (BasicScheduler or another scheduler node, not the high part of SplitSigmas)")
        if self.vae is None:
            raise SearchError(f"{self.title} scores decoded images: connect the model's VAE to the vae input")
        batches = _conditioning_batches(self.model.inner_model)
        if any(b > 1 for b in batches):
            raise SearchError(f"{self.title} evaluates each image's paths on their own and needs one prompt per "
                              f"conditioning (this one holds {max(batches)} rows): connect a single prompt; each row "
                              f"of the latent batch is its own search")

    def require(self, minimum, what):
        if self.budget < minimum:
            raise SearchError(f"{self.title}: a budget of {self.budget} model evaluations is below {what} "
                              f"({minimum} evaluations for these {self.steps} steps): raise budget to at least "
                              f"{minimum}")

    # ---- evaluations, steps, scores

    def denoise(self, states, i, rows):
        """The guider's denoised prediction of ``states`` at sigma_i; ``rows`` says which image each state
        searches for (each is charged one evaluation)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        for r in rows:
            if self.used[r] >= self.budget:
                raise RuntimeError(f"{self.title}: the search overran its budget (a bug)")
            self.used[r] += 1
        denoised = self.model(states, self.sigmas[i] * states.new_ones([states.shape[0]]), **self.extra)
        self._progress(states, denoised, i)
        return denoised

    def step(self, states, denoised, i, noise):
        return ops.ancestral_step(states, denoised, self.sigmas[i], self.sigmas[i + 1], noise, self.flow,
                                  self.s_noise)

    def noise_like(self, states, rng):
        return torch.randn(states.shape, generator=rng).to(states.device, states.dtype)

    def fresh_starts(self, rows, rng, like):
        """New initial states for images ``rows``: fresh noise scaled at sigma_0 as ComfyUI scales the run's."""
        noise = torch.randn((len(rows),) + tuple(like.shape[1:]), generator=rng).to(like.device, like.dtype)
        latent = torch.zeros_like(noise) if self.latent_image is None else \
            self.latent_image[list(rows)].to(like.device, like.dtype)
        return self.sampling.noise_scaling(self.sigmas[0], noise, latent, self.max_denoise)

    def score(self, latents):
        scores = score_latents(self.patcher, self.vae, self.scorer, latents).cpu()
        reload_sampled_models(self.model.inner_model)
        return scores

    def _progress(self, states, denoised, i):
        if self.callback is None:
            return
        shown = min(self.steps - 1, sum(self.used) * self.steps // max(1, self.budget * self.rows))
        if shown > self.shown:
            self.shown = shown
            self.callback({"x": states, "i": shown, "sigma": self.sigmas[i], "sigma_hat": self.sigmas[i],
                           "denoised": denoised})

    def report(self, method, settings):
        best = [max(s) if s else None for s in self.path_scores]
        return {"method": method, "budget": self.budget, "evaluations": list(self.used), "steps": self.steps,
                "paths": list(self.paths), "best_score": best, "returned_score": list(self.returned),
                "first_path_score": list(self.first), "path_scores": [list(s) for s in self.path_scores],
                **{k: v for k, v in settings.items()}, **self.extra_report,
                "seconds": round(time.perf_counter() - self.started, 3)}


def _conditioning_batches(guider):
    sizes = []
    for conds in (getattr(guider, "conds", None) or {}).values():
        for cond in conds or []:
            for value in cond.get("model_conds", {}).values():
                tensor = getattr(value, "cond", None)
                if torch.is_tensor(tensor) and tensor.ndim > 0:
                    sizes.append(tensor.shape[0])
    return sizes


def _first_paths(run, x):
    """Every row's first path, batched: the sampler's own latent and ComfyUI's ancestral noise for the seed.
    Returns the per-step states and clean estimates ``[(state, denoised)]`` and the finished latents."""
    noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=run.seed)
    rows, states, trail = range(run.rows), x, []
    for i in range(run.steps):
        denoised = run.denoise(states, i, rows)
        trail.append((states, denoised))
        noise = None if run.deterministic[i] else noise_sampler(run.sigmas[i], run.sigmas[i + 1])
        states = run.step(states, denoised, i, noise)
    return trail, states


# ---- best-of-N

def _best_of_n(run, x):
    run.require(minimum_budget("best_of_n", run.steps), "one path")
    count = run.budget // run.steps
    _, best = _first_paths(run, x)
    best_scores = run.score(best)
    _record(run, best_scores, first=True)
    for k in range(1, count):
        rng = ops.generator(run.seed, 1, k)
        states = run.fresh_starts(range(run.rows), rng, x)
        for i in range(run.steps):
            denoised = run.denoise(states, i, range(run.rows))
            noise = None if run.deterministic[i] else run.noise_like(states, rng)
            states = run.step(states, denoised, i, noise)
        scores = run.score(states)
        _record(run, scores)
        better = scores > best_scores
        best = torch.where(better.to(best.device).reshape(-1, *[1] * (best.ndim - 1)), states, best)
        best_scores = torch.maximum(scores, best_scores)
    run.returned = best_scores.tolist()
    run.extra_report = {"n": count}
    return best


def _record(run, scores, first=False):
    for r, s in enumerate(scores.tolist()):
        run.path_scores[r].append(s)
        run.paths[r] += 1
        if first:
            run.first[r] = s


# ---- Diffusion Tree Sampling

def _tree(run, x, max_children, lam, greedy):
    run.require(minimum_budget("tree", run.steps), "one path")
    trail, finished = _first_paths(run, x)
    scores = run.score(finished)
    _record(run, scores, first=True)
    out = []
    for r in range(run.rows):
        tree = ops.Tree(run.steps, max_children, lam, run.deterministic)
        node = tree.root
        for states, denoised in trail:
            node = tree.add_child(node, states[r:r + 1])
            node.denoised = denoised[r:r + 1]
        terminal = tree.add_child(node, finished[r:r + 1])
        tree.backup(terminal, float(scores[r]))
        rng = ops.generator(run.seed, 2, r)
        while True:
            node = tree.select(rng, greedy, run.budget - run.used[r])
            if node is None:
                break
            terminal = _grow(run, tree, node, r, rng, x)
            score = float(run.score(terminal.state)[0])
            run.path_scores[r].append(score)
            run.paths[r] += 1
            tree.backup(terminal, score)
        chosen = tree.best_terminal() if greedy else tree.sample_terminal(rng)
        run.returned[r] = chosen.value
        out.append(chosen.state)
        run.extra_report.setdefault("tree_nodes", []).append(tree.size())
    return torch.cat(out).to(x.device, x.dtype)


def _grow(run, tree, node, row, rng, x):
    """Expand ``node`` by one new child and roll it out to a terminal; every state joins the tree."""
    if node is tree.root:
        child = tree.add_child(node, run.fresh_starts([row], rng, x))
    else:
        noise = None if run.deterministic[node.step] else run.noise_like(node.state, rng)
        child = tree.add_child(node, run.step(node.state, node.denoised, node.step, noise))
    while child.step < run.steps:
        i = child.step
        child.denoised = run.denoise(child.state, i, [row])
        noise = None if run.deterministic[i] else run.noise_like(child.state, rng)
        child = tree.add_child(child, run.step(child.state, child.denoised, i, noise))
    return child


# ---- Diffusion Latent Beam Search

def _beam(run, x, beams, candidates, lookahead):
    run.require(minimum_budget("beam", run.steps, beams), f"one path per beam ({beams} beams)")
    searched, planned = ops.beam_plan(run.steps, beams, candidates, lookahead, run.budget)
    rows, n = run.rows, run.steps
    noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=run.seed)
    rng = ops.generator(run.seed, 3)
    # states[r * beams + b]: beam b of image r; beam 0 starts from the sampler's own latent
    states = x.repeat_interleave(beams, 0)
    if beams > 1:
        fresh = run.fresh_starts([r for r in range(rows) for _ in range(beams - 1)], rng, x)
        others = [r * beams + b for r in range(rows) for b in range(1, beams)]
        states[others] = fresh
    owners = [r for r in range(rows) for _ in range(beams)]
    denoised = None
    for i in range(n):
        if denoised is None:
            denoised = run.denoise(states, i, owners)
        if run.deterministic[i] or not searched[i]:
            noise = None
            if not run.deterministic[i]:
                noise = run.noise_like(states, rng)
                noise[::beams] = noise_sampler(run.sigmas[i], run.sigmas[i + 1])
            states, denoised = run.step(states, denoised, i, noise), None
            continue
        states, denoised = _search_step(run, states, denoised, i, beams, candidates, lookahead, owners, rng,
                                        noise_sampler)
    scores = run.score(states)
    best = []
    for r in range(rows):
        mine = scores[r * beams:(r + 1) * beams]
        run.path_scores[r].extend(mine.tolist())
        run.paths[r] += beams
        run.first[r] = float(mine[0])
        pick = int(ops.top_rows(mine, 1)[0])
        run.returned[r] = float(mine[pick])
        best.append(states[r * beams + pick:r * beams + pick + 1])
    run.extra_report = {"searched_steps": [i for i, s in enumerate(searched) if s], "planned_evaluations": planned}
    return torch.cat(best)


def _search_step(run, states, denoised, i, beams, candidates, lookahead, owners, rng, noise_sampler):
    """Draw ``candidates`` next states per beam, score each by its lookahead estimate, keep the best ``beams``
    per image. Returns the kept states and their evaluations at sigma_{i+1} (the lookahead's first)."""
    rows = run.rows
    expanded = states.repeat_interleave(candidates, 0)
    noise = run.noise_like(expanded, rng)
    noise[::beams * candidates] = noise_sampler(run.sigmas[i], run.sigmas[i + 1])
    cands = run.step(expanded, denoised.repeat_interleave(candidates, 0), i, noise)
    cand_owners = [o for o in owners for _ in range(candidates)]
    first, estimate, ahead = None, None, cands
    points = ops.lookahead_indices(i, run.steps, lookahead)
    for k, j in enumerate(points):
        estimate = run.denoise(ahead, j, cand_owners)
        if k == 0:
            first = estimate
        if k + 1 < len(points):
            ahead = ops.euler_step(ahead, estimate, run.sigmas[j], run.sigmas[points[k + 1]])
    scores = run.score(estimate)
    width = beams * candidates
    keep = torch.cat([r * width + ops.top_rows(scores[r * width:(r + 1) * width], beams) for r in range(rows)])
    keep = keep.to(cands.device)
    return cands[keep], first[keep]
