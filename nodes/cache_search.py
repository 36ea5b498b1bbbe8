"""Cache schedule search on the user's own model: CacheQuant's dynamic programming over the cached feature's
change, or an ECAD-style evolutionary Pareto search over cost and drift, measured against the uncached result of
the same seed on a few calibration prompts."""
import logging

import torch

from ..guidance_ops import cache_schedule as schedules
from ..guidance_ops import cache_search as search
from . import host
from .base import check_numbers, prompt_lines
from .cache import SCHEDULE_TYPE

log = logging.getLogger("trainfree")

EVOLUTION, DYNAMIC = "evolutionary (ECAD)", "dynamic programming (CacheQuant)"
DP_INTERVALS = range(2, 9)  # the dynamic-programming schedules tried: 1:N for these N


class TrainFreeCacheScheduleSearch:
    CATEGORY = "trainfree/caching"
    DESCRIPTION = ("Searches a cache schedule for the model's DeepCache or Block Cache patch (connect the model "
                   "through one): every candidate schedule samples the calibration prompts with the same seeds as "
                   "an uncached run, and its drift (mean squared latent error relative to the uncached latent's "
                   "variance) is weighed against its cost (the share of full computation it keeps). Dynamic "
                   "programming (CacheQuant): full steps placed where the cached feature of an uncached run "
                   "changes most. Evolutionary (ECAD-style NSGA-II): a Pareto front of schedules, seeded with the "
                   "uniform and dynamic-programming ones. Saves the best schedule within the budget to "
                   f"output/{host.SCHEDULE_SUBFOLDER}/ and draws the front.")
    RETURN_TYPES = (SCHEDULE_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("cache_schedule", "pareto_front", "summary")
    FUNCTION = "search"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model through exactly one DeepCache or Block Cache node; its "
                                           "branch / block range is what the schedule is for."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder, for the calibration prompts."}),
            "calibration_prompts": ("STRING", {"multiline": True, "default":
                                               "a photo of a cat on a sofa\na mountain lake at sunset\n"
                                               "a portrait of an old man, studio light",
                                               "tooltip": "One prompt per line (a few are enough: the papers "
                                                          "calibrate on small sets). Each is sampled once per "
                                                          "candidate schedule."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Negative prompt."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Noise seed of the calibration runs (prompt i uses seed + i)."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200,
                              "tooltip": "Sampling steps: the schedule is made for exactly this many."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                              "tooltip": "CFG scale of the calibration runs (use the one you sample with)."}),
            "sampler_name": (host.sampler_names(), {"tooltip": "Sampler of the calibration runs."}),
            "scheduler": (host.scheduler_names(), {"tooltip": "Scheduler of the calibration runs."}),
            "width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Image height."}),
            "method": ([EVOLUTION, DYNAMIC], {"tooltip":
                                             "dynamic programming: one uncached run per prompt, then one run per "
                                             "candidate interval (fast). evolutionary: population x generations "
                                             "candidates (slower, finds non-uniform schedules)."}),
            "budget": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                                 "The most computation the schedule may keep, as a share of running every step "
                                 "in full (DeepCache: the share of full steps; block cache: weighted by the "
                                 "skipped blocks' parameters). The best schedule at or under it is returned."}),
            "population": ("INT", {"default": 12, "min": 4, "max": 200,
                                   "tooltip": "Evolutionary: schedules per generation."}),
            "generations": ("INT", {"default": 6, "min": 0, "max": 200,
                                    "tooltip": "Evolutionary: generations after the first population."}),
            "filename_prefix": ("STRING", {"default": "cache_schedule", "tooltip":
                                           f"Saved as output/{host.SCHEDULE_SUBFOLDER}/<prefix>_NNNNN.json, where "
                                           f"Load Cache Schedule finds it."}),
        }}

    def search(self, model, clip, calibration_prompts, negative_prompt, seed, steps, cfg, sampler_name, scheduler,
               width, height, method, budget, population, generations, filename_prefix):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        prompts = prompt_lines(calibration_prompts, "calibration_prompts")
        scope = host.cache_scope(model)
        units = list(scope.trainfree_cache_units)
        shares = host.unit_shares(model, units)
        negative = host.encode_text(clip, negative_prompt)
        calibration = [(host.encode_text(clip, p), seed + i) for i, p in enumerate(prompts)]
        latent = host.empty_latent(model, width, height)
        runs = len(prompts) * (1 + (len(DP_INTERVALS) if method == DYNAMIC else population * (generations + 1)))
        progress = host.progress_bar(runs)

        def sample(plan_for, record=None):
            scope.trainfree_cache_override = (plan_for, record)
            try:
                out = [host.sample_latent(model, pos, negative, cfg, sampler_name, scheduler, steps, s, latent)
                       for pos, s in calibration]
            finally:
                scope.trainfree_cache_override = None
            progress.update(len(out))
            return out

        recorded = []
        references = sample(lambda n: {u: [True] * n for u in units}, recorded)
        features = _features_by_step(recorded, steps)

        def evaluate(genome):
            plan = _plan(genome, units, steps)
            outs = sample(lambda n: _fitting(plan, n))
            drift = sum(float(search.relative_drift(o, r)) for o, r in zip(outs, references)) / len(outs)
            return _cost(plan, units, shares, steps), drift

        dp = [tuple(_genome({u: search.dp_schedule(features, n) for u in units}, units))
              for n in DP_INTERVALS if n < steps]
        uniform = [tuple(_genome({u: schedules.uniform(steps, n) for u in units}, units))
                   for n in DP_INTERVALS if n < steps]
        if method == DYNAMIC:
            archive = [(g, evaluate(g)) for g in dict.fromkeys(dp)]
        else:
            archive = search.evolve(evaluate, steps * len(units), population=population, generations=generations,
                                    seed=seed, seeds=list(dict.fromkeys(dp + uniform)),
                                    repair=lambda g: _repair(g, len(units), steps),
                                    should_stop=host.interrupted)
            host.throw_if_interrupted()
        genome, (cost, drift) = search.best_within(archive, budget)
        plan = _plan(genome, units, steps)
        best = schedules.Schedule(steps, {u: tuple(plan[u]) for u in units},
                                  {"source": "ecad" if method == EVOLUTION else "cachequant-dp", "cost": round(cost, 4),
                                   "relative_drift": drift, "budget": budget, "prompts": len(prompts),
                                   "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg})
        name = host.save_schedule(best, filename_prefix)
        points = [objectives for _, objectives in archive]
        image = search.pareto_plot(points, chosen=(cost, drift), budget=budget)
        summary = (f"{len(archive)} schedules evaluated on {len(prompts)} prompts; best within cost {budget:g}: "
                   f"cost {cost:.3f}, relative drift {drift:.4g}; saved as {name}\n" + schedules.describe(best))
        log.info("TrainFree cache schedule search: %s", summary)
        return {"ui": {"text": [summary]}, "result": (best, image.unsqueeze(0), summary)}


def _genome(plan, units):
    return [c for u in units for c in plan[u]]


def _plan(genome, units, steps):
    return {u: list(genome[i * steps:(i + 1) * steps]) for i, u in enumerate(units)}


def _repair(genome, count, steps):
    genome = list(genome)
    for i in range(count):
        genome[i * steps] = True  # nothing is cached before a unit's first step
    return tuple(genome)


def _fitting(plan, steps):
    if any(len(p) != steps for p in plan.values()):
        raise ValueError(f"the calibration runs took {steps} steps, not the schedule's "
                         f"{len(next(iter(plan.values())))}; this sampler / scheduler changes the step count")
    return plan


def _cost(plan, units, shares, steps):
    return schedules.relative_cost(schedules.Schedule(steps, {u: tuple(plan[u]) for u in units}), shares)


def _features_by_step(recorded, steps):
    """The uncached runs' cached features, one flat tensor per step (every prompt and unit), for the DP."""
    by_step = [[] for _ in range(steps)]
    for step, feature in recorded:
        by_step[step].append(feature.float().flatten())
    missing = [i for i, f in enumerate(by_step) if not f]
    if missing:
        raise ValueError(f"steps {missing} never evaluated the model in the calibration runs; choose another "
                         f"sampler")
    return [torch.cat(f) for f in by_step]


NODE_CLASS_MAPPINGS = {"TrainFreeCacheScheduleSearch": TrainFreeCacheScheduleSearch}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeCacheScheduleSearch": "Cache Schedule Search (TrainFree)"}
