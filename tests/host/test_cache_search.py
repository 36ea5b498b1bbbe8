"""The cache schedule search on the real ComfyUI (tiny SD1.5 and its text encoder): it returns and saves a
schedule within the budget that Load Cache Schedule reads back and DeepCache runs; its drift is what sampling with
that schedule gives; progress covers every calibration run; an interrupt stops it; a model without a cache patch
is refused."""
import pytest
import torch

from conftest import run_node
from test_cache import deepcache

STEPS = 8


def search(model, clip, method="dynamic programming (CacheQuant)", budget=0.5, population=4, generations=1,
           prompts="a red seven\na blue one"):
    return run_node("TrainFreeCacheScheduleSearch", model=model, clip=clip, calibration_prompts=prompts,
                    negative_prompt="", seed=3, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal",
                    width=128, height=128, method=method, budget=budget, population=population,
                    generations=generations, filename_prefix="tiny")


def drift_of(model, clip, schedule, prompts=("a red seven", "a blue one")):
    """The search's drift, restated: the mean over prompts of the squared latent error relative to the uncached
    latent's variance, both sampled here with plain ComfyUI sampling."""
    import comfy.sample
    cached = deepcache(model, mode="from schedule input", schedule=schedule)
    total = 0.0
    for i, prompt in enumerate(prompts):
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, 16, 16)
        noise = comfy.sample.prepare_noise(latent, 3 + i)
        run = [comfy.sample.sample(m, noise, STEPS, 3.0, "euler", "normal", cond, neg, latent, seed=3 + i,
                                   disable_pbar=True) for m in (cached, model)]
        total += float(((run[0] - run[1]) ** 2).mean() / run[1].var())
    return total / len(prompts)


@pytest.mark.parametrize("method", ["dynamic programming (CacheQuant)", "evolutionary (ECAD)"])
def test_the_search_saves_a_schedule_within_budget_that_deepcache_runs(tiny, clip, folders, method):
    model = deepcache(tiny("sd15"))
    result = search(model, clip, method=method, budget=0.5)
    schedule, image, summary = result["result"]
    pattern = schedule.compute["branch 0"]
    assert len(pattern) == STEPS and pattern[0] and sum(pattern) <= 0.5 * STEPS and not all(pattern)
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 96
    saved = folders / "output" / "cache_schedules" / "tiny_00001.json"
    assert saved.is_file() and "tiny_00001.json" in summary
    loaded, _ = run_node("TrainFreeLoadCacheSchedule", schedule_file="tiny_00001.json")
    assert loaded.compute == schedule.compute and loaded.steps == STEPS
    assert schedule.meta["relative_drift"] == pytest.approx(drift_of(tiny("sd15"), clip, loaded), rel=1e-6)


def test_the_searched_schedule_is_no_worse_than_the_uniform_one_of_its_cost(tiny, clip, folders):
    from guidance_ops import cache_schedule
    model = deepcache(tiny("sd15"))
    schedule = search(model, clip, method="evolutionary (ECAD)", budget=0.25, population=6, generations=2)["result"][0]
    uniform = cache_schedule.Schedule.from_pattern(["branch 0"], cache_schedule.uniform(STEPS, 4))
    assert sum(schedule.compute["branch 0"]) <= 2
    assert schedule.meta["relative_drift"] <= drift_of(tiny("sd15"), clip, uniform) + 1e-12


def test_progress_covers_every_calibration_run_and_an_interrupt_stops_it(tiny, clip, folders):
    import comfy.model_management
    import comfy.utils
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value >= 3:
            comfy.model_management.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            search(deepcache(tiny("sd15")), clip, method="evolutionary (ECAD)", population=4, generations=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert seen[0][1] == 2 * (1 + 4 * 4)  # the uncached runs, then population x (generations + 1), per prompt
    assert max(v for v, _ in seen) < seen[0][1]


def test_a_model_without_a_cache_patch_is_refused(tiny, clip, folders):
    with pytest.raises(ValueError, match="through one DeepCache"):
        search(tiny("sd15"), clip)


def test_empty_prompts_are_refused(tiny, clip, folders):
    with pytest.raises(ValueError, match="calibration_prompts is empty"):
        search(deepcache(tiny("sd15")), clip, prompts="\n  \n")


@pytest.mark.parametrize("text,message", [
    ('{"format": "trainfree-cache-schedule", "version": 1, "steps": 4, "compute": {"branch 0": "CRR"}}',
     "bad.json: unit 'branch 0': the pattern has 3 letters but the schedule has 4 steps"),
    ('{"format": "trainfree-cache-schedule", "version": 1, "steps": 2, "compute": {"middle": "CR"}}',
     "bad.json: unknown cache unit 'middle'"),
    ('{"steps": 2,', "bad.json: the cache schedule is not valid JSON"),
])
def test_a_malformed_schedule_file_is_refused_naming_the_file(folders, text, message):
    (folders / "input" / "cache_schedules").mkdir(parents=True)
    (folders / "input" / "cache_schedules" / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_node("TrainFreeLoadCacheSchedule", schedule_file="bad.json")


def test_only_listed_plain_file_names_are_loaded(folders):
    with pytest.raises(FileNotFoundError, match="run the cache schedule search"):
        run_node("TrainFreeLoadCacheSchedule", schedule_file="../secrets.json")
