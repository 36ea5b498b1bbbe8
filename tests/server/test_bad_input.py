"""Broken prompts POSTed to the real server, for every TrainFree node: each is refused with a validation error
(HTTP 400 with node_errors naming the input) or fails with an execution error whose message names the input and
the fix. Afterwards the server still serves, and a valid prompt gives exactly what a fresh server gives."""
import json
import math
import os

import pytest

from harness.server import ComfyServer, error_message
from tests.server.conftest import SERVER_ARGS, pixels
from tests.server.stack import CHAIN_NODES, LOADED_SCHEDULE_STEPS, patch_nodes, stack_prompt

# Words with which our messages tell the user what to do.
FIX_WORDS = ("enter", "use", "connect", "swap", "name", "write", "make", "choose", "put", "must", "reinstall",
             "raise")


def _number_cases(object_info, node):
    for section in ("required", "optional"):
        for name, spec in object_info[node]["input"].get(section, {}).items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if kind in ("FLOAT", "INT"):
                if "max" in options:
                    yield name, options["max"] + 1, "validation"
                    yield name, math.inf, "validation"
                if "min" in options:
                    yield name, options["min"] - 1, "validation"
                yield name, math.nan, "either"
                yield name, "three", "validation"
            elif isinstance(kind, list):
                yield name, "no such option", "validation"


def _cases(object_info):
    for node in patch_nodes(object_info) + list(CHAIN_NODES):
        for name, value, expect in _number_cases(object_info, node):
            yield f"{node}-{name}-{value}", node, {name: value}, expect, name
    layer_texts = ["middle.x", "nowhere.3", "input.99", "double.1", "middle.0.1.2", "output.5-2", ",", "'; drop"]
    for text in layer_texts:
        yield f"TrainFreePAG-layers-{text}", "TrainFreePAG", {"layers": text}, "execution", "layers"
    yield ("PAG-window-backwards", "TrainFreePAG", {"start_percent": 0.8, "end_percent": 0.2}, "execution",
           "start_percent")
    yield ("interval-backwards", "TrainFreeGuidanceInterval", {"sigma_low": 9.0, "sigma_high": 1.0}, "execution",
           "sigma_low")
    yield ("unknown-model-file", "TrainFreeReferenceModel", {"model_file": "missing.safetensors"}, "validation",
           "model_file")
    yield ("inversion-prefix-escapes", "TrainFreeSaveInversion", {"filename_prefix": "../escape"}, "execution",
           "filename_prefix")
    yield ("p2p-word-not-in-prompt", "TrainFreePromptToPrompt", {"blend_words": "purple"}, "execution",
           "blend")
    yield ("frecas-unreachable-size", "TrainFreeFreCaS", {"height": 208, "width": 208, "stage_steps": "1, 1, 1",
                                                          "stage_end_timesteps": "400, 200, 0"}, "execution", "height")
    yield ("deepcache-schedule-input-unconnected", "TrainFreeDeepCache", {"schedule": "from schedule input"},
           "execution", "schedule")
    yield ("block-cache-range-outside-the-model", "TrainFreeBlockCache", {"first_block": 150}, "execution",
           "first_block")
    yield ("momentum-dpmpp-order", "TrainFreeMomentumSampler", {"order": 3}, "execution", "order")
    yield ("cfgpp-eta-on-a-deterministic-solver", "TrainFreeCFGPPSampler", {"solver": "dpmpp_2m", "eta": 0.5},
           "execution", "eta")
    yield ("linear-ag-no-calibration-prompt", "TrainFreeLinearAGCalibrate", {"calibration_prompts": " \n"},
           "execution", "calibration_prompts")
    yield ("linear-ag-calibrated-without-cfg", "TrainFreeLinearAGCalibrate", {"cfg": 1.0}, "execution", "cfg")
    yield ("classifier-keeps-more-than-one-at-the-end", "TrainFreeDiffusionClassifier",
           {"keep_per_stage": "2, 2"}, "execution", "keep")
    yield ("classifier-one-candidate", "TrainFreeDiffusionClassifier", {"candidates": "a digit"}, "execution",
           "candidate")
    yield ("gfcg-target-names-no-class", "TrainFreeGFCG", {"target_class": "a purple nine"}, "execution",
           "target_class")
    yield ("prompt-judge-one-prompt", "TrainFreePromptJudge", {"prompts": "a digit"}, "execution", "prompts")
    yield ("denoising-without-a-noise-level", "TrainFreeDegrade", {"degradation": "denoising", "noise_level": 0.0},
           "execution", "noise_level")
    yield ("p2p-source-text-differs", "TrainFreePromptToPrompt", {"source_text": "a digit"}, "execution",
           "source_text")
    yield ("digit-scorer-prompt-without-digit-or-colour", "TrainFreeDigitScorer", {"prompt": "a photo of a cat"},
           "execution", "prompt")
    yield ("search-budget-below-one-path", "TrainFreeBestOfN", {"budget": 2}, "execution", "budget")
    yield ("beam-budget-below-one-path-per-beam", "TrainFreeLatentBeamSearch", {"budget": 5}, "execution", "budget")
    yield ("dpm-encoder-deterministic-sampler", "TrainFreeDPMEncoder", {"sampler": ["60", 0]}, "execution",
           "sampler")  # the cascade chain's KSamplerSelect: euler


@pytest.fixture(scope="module")
def fresh_result(object_info):
    """The valid stacked prompt's image on a server that has run nothing else."""
    with ComfyServer(frontend=False, extra_args=SERVER_ARGS) as fresh:
        entry = fresh.run(stack_prompt(object_info))
        assert entry["status"]["status_str"] == "success", error_message(entry)
        return pixels(fresh.images(entry)[0])


@pytest.fixture(scope="module")
def cached(artifacts):
    """This module's own server, with ComfyUI's default cache: a broken input's case re-runs only the broken node
    and what follows it, not the models and prompts before it (86 of the cases reach execution). Cached outputs
    are also what a leaked state would corrupt: the last test compares a valid prompt with a fresh server."""
    with ComfyServer(frontend=False) as running:
        yield running
        with open(os.path.join(artifacts, "server_bad_input.log"), "w") as f:
            f.write(running.log())


def _check_refusal(cached, prompt, node_id, expect, input_name):
    status, answer = cached.post_prompt(prompt)
    text = json.dumps(answer)
    assert "Traceback" not in text
    if status == 400 or node_id in answer.get("node_errors", {}):
        # 400 when no output can run; 200 with the node's errors listed when outputs that do not depend on it
        # (another chain of the prompt) still run
        assert expect in ("validation", "either"), f"refused at validation, expected an execution error: {text}"
        errors = answer["node_errors"][node_id]["errors"]
        assert any(e["extra_info"].get("input_name") == input_name for e in errors), errors
        return
    assert status == 200 and expect in ("execution", "either"), f"HTTP {status}: {text}"
    entry = cached.wait(answer["prompt_id"])
    message = error_message(entry)
    assert entry["status"]["status_str"] == "error" and message, f"a broken input ran through: {input_name}"
    assert input_name in message, message
    assert any(word in message.lower() for word in FIX_WORDS), f"the message names no fix: {message}"


def _broken_prompt(object_info, node, inputs):
    prompt = stack_prompt(object_info, steps=3, inversion=node in CHAIN_NODES)
    node_id = next(k for k, n in prompt.items() if n["class_type"] == node)
    prompt[node_id]["inputs"].update(inputs)
    return _only_through(prompt, node_id), node_id


def _links(node):
    return [value[0] for value in node["inputs"].values() if isinstance(value, list) and len(value) == 2]


def _only_through(prompt, node_id):
    """The prompt cut down to the outputs that depend on ``node_id`` and what they need (the other chains of an
    inversion prompt would run in every case for nothing)."""
    def ancestors(key, seen):
        for parent in _links(prompt[key]):
            if parent not in seen:
                seen.add(parent)
                ancestors(parent, seen)
        return seen
    outputs = [k for k, n in prompt.items()
               if n["class_type"] in ("SaveImage", "TrainFreeSaveInversion", "TrainFreeSaveDPMLatent")
               and (k == node_id or node_id in ancestors(k, set()))]
    keep = set(outputs).union(*(ancestors(k, set()) for k in outputs))
    return {k: n for k, n in prompt.items() if k in keep}


def test_broken_inputs_of_every_node_are_refused_by_name(cached, object_info, pack_nodes):
    """The cases come from the node definitions the server reports, so a new input or node is covered by itself."""
    uncovered = set(pack_nodes) - set(patch_nodes(object_info)) - set(CHAIN_NODES) - {"TrainFreeReferenceModel"}
    assert not uncovered, f"nodes that are not MODEL -> MODEL patches need bad-input cases of their own: {uncovered}"
    failures = []
    cases = list(_cases(object_info))
    assert len(cases) > 60
    for case, node, inputs, expect, input_name in cases:
        prompt, node_id = _broken_prompt(object_info, node, inputs)
        try:
            _check_refusal(cached, prompt, node_id, expect, input_name)
        except AssertionError as e:
            failures.append(f"{case}: {e}")
    assert not failures, "\n".join(failures)
    assert cached.alive()


def test_wrong_link_type_is_a_validation_error(cached, object_info):
    prompt, node_id = _broken_prompt(object_info, "TrainFreeAPG", {})
    prompt[node_id]["inputs"]["model"] = ["1", 1]  # the loader's CLIP output into a MODEL input
    status, answer = cached.post_prompt(prompt)
    assert status == 400 and node_id in answer["node_errors"], answer


def test_guide_of_another_family_is_refused(cached, object_info):
    for node, slot in (("TrainFreeTwoModelGuidance", "guide_model"), ("TrainFreeNoiseDampedCFG", "weak_model")):
        prompt, node_id = _broken_prompt(object_info, node, {})
        prompt["80"] = {"class_type": "HarnessTinyModel", "inputs": {"family": "sdxl", "variant": "guide"}}
        prompt[node_id]["inputs"][slot] = ["80", 0]
        _check_refusal(cached, prompt, node_id, "execution", slot)


def test_a_model_the_node_cannot_serve_is_refused_by_name(cached, object_info):
    prompt, node_id = _broken_prompt(object_info, "TrainFreePAG", {})
    prompt["80"] = {"class_type": "HarnessTinyModel", "inputs": {"family": "wan21", "variant": ""}}
    prompt[node_id]["inputs"]["model"] = ["80", 0]  # a Wan 2.1 video model: PAG's layer names do not reach it
    _check_refusal(cached, prompt, node_id, "execution", "model")
    message = error_message(cached.get("/history?max_items=1").popitem()[1])
    assert "cannot serve" in message and "SD1.5, SDXL" in message, message


def test_latent_of_another_family_is_refused_by_name(cached, object_info):
    prompt = stack_prompt(object_info)
    latent = next(k for k, n in prompt.items() if n["class_type"] == "EmptyLatentImage")
    # ComfyUI itself fixes the channel count of an all-zero (empty) latent, so encode an image with an SD3 VAE.
    prompt["81"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 9000}}
    prompt["82"] = {"class_type": "HarnessTinyVAE", "inputs": {"family": "sd3", "variant": ""}}
    prompt[latent] = {"class_type": "VAEEncode", "inputs": {"pixels": ["81", 0], "vae": ["82", 0]}}
    status, answer = cached.post_prompt(prompt)
    assert status == 200, answer
    message = error_message(cached.wait(answer["prompt_id"]))
    assert message and "latent" in message.lower() and "channels" in message, message


def test_steered_diffusion_latent_of_another_size_is_refused_by_name(cached, object_info):
    """The steered sampler given the stack's 128 px empty latent for a measurement that restores 64 px."""
    prompt, node_id = _broken_prompt(object_info, "TrainFreeSteeredDiffusion", {})
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "SamplerCustomAdvanced"
                   and n["inputs"]["sampler"] == [node_id, 0])
    prompt[sampler]["inputs"]["latent_image"] = ["92", 0]
    _check_refusal(cached, prompt, sampler, "execution", "latent_image")


def _loaded_schedule_prompt(object_info):
    """The chain that samples the loaded cache schedule: its loader's id and its sampler's id."""
    prompt, node_id = _broken_prompt(object_info, "TrainFreeLoadCacheSchedule", {})
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "KSampler"
                   and n["inputs"]["steps"] == LOADED_SCHEDULE_STEPS)
    return prompt, node_id, sampler


def test_a_schedule_for_another_step_count_is_refused_by_name(cached, object_info):
    prompt, _, sampler = _loaded_schedule_prompt(object_info)
    prompt[sampler]["inputs"]["steps"] = LOADED_SCHEDULE_STEPS - 1
    _check_refusal(cached, prompt, sampler, "execution", "steps")


def test_linear_ag_without_its_calibration_is_refused_by_name(cached, object_info):
    """LinearAG set to take the calibration from its input, with nothing connected there."""
    prompt, node_id = _broken_prompt(object_info, "TrainFreeLinearAG", {})
    del prompt[node_id]["inputs"]["calibration"]
    _check_refusal(cached, _only_through(prompt, node_id), node_id, "execution", "calibration_file")


def test_a_malformed_schedule_file_is_refused_by_name(cached, object_info):
    """A hand-written schedule whose first step reuses (nothing is cached yet) is named, with the rule it breaks."""
    name = "trainfree_broken_schedule.json"
    path = os.path.join(cached.base_dir, "input", "cache_schedules", name)
    with open(path, "w") as f:
        json.dump({"format": "trainfree-cache-schedule", "version": 1, "steps": LOADED_SCHEDULE_STEPS,
                   "compute": {"branch 0": "R" * LOADED_SCHEDULE_STEPS}}, f)
    try:
        prompt, node_id, _ = _loaded_schedule_prompt(object_info)
        prompt[node_id]["inputs"]["schedule_file"] = name
        _check_refusal(cached, prompt, node_id, "execution", name)
    finally:
        os.remove(path)


def test_red_diff_refuses_a_latent_of_another_size_and_a_missing_vae(cached, object_info):
    """RED-diff starts from the VAE-encoded start image of its measurement: a latent of another size is refused by
    the sampler naming latent_image; without its VAE the node does not validate."""
    prompt, node_id = _broken_prompt(object_info, "TrainFreeREDDiff", {})
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "SamplerCustomAdvanced"
                   and n["inputs"]["sampler"] == [node_id, 0])
    prompt["80"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt[sampler]["inputs"]["latent_image"] = ["80", 0]
    _check_refusal(cached, prompt, sampler, "execution", "latent_image")
    prompt, node_id = _broken_prompt(object_info, "TrainFreeREDDiff", {})
    del prompt[node_id]["inputs"]["vae"]
    _check_refusal(cached, prompt, node_id, "validation", "vae")


@pytest.mark.parametrize("width, height, batch", [(136, 72, 3), (64, 64, 2)])
def test_odd_sizes_and_batches_run(cached, object_info, width, height, batch):
    entry = cached.run(stack_prompt(object_info, width=width, height=height, batch=batch, steps=3))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    images = cached.images(entry)
    assert len(images) == batch and pixels(images[0]).shape == (height, width, 3)


def test_server_survives_and_leaks_no_state(cached, object_info, fresh_result):
    """Runs last in this module: after every broken prompt above, a valid prompt equals a fresh server's result."""
    assert cached.get("/system_stats")
    entry = cached.run(stack_prompt(object_info))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert (pixels(cached.images(entry)[0]) == fresh_result).all()
