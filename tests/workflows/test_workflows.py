"""Every example workflow runs through ComfyUI's real execution engine on tiny models of its own family (the server
tests run each on the reference model), and its technique acts: the sampled latent differs from the same workflow
with the pack's node bypassed, and equals it exactly where the node has a neutral setting. The pack's SAMPLER nodes
are compared with core samplers in the same graph: the plain solver they modify, and the core sampler they are under
some settings."""
import json
import os

import pytest
import torch

from harness import collect, comfy_host, run_workflows
from harness.workflow_api import WorkflowError, ui_to_api

PATHS = run_workflows.workflow_paths()


# Settings that make a node a no-op, so that the workflow must give the bypassed workflow's latent bit for bit.
NEUTRAL = {"TrainFreePAG": {"scale": 0.0},
           "TrainFreeAPG": {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0},
           "TrainFreeGuidanceInterval": {"sigma_low": 0.0, "sigma_high": 1000.0},
           "TrainFreeNoiseDampedCFG": {"damped_percent": 0.0},
           "TrainFreeScaleCrafter": {"dilate_percent": 0.0},
           # every step in full; a connected schedule (loaded or searched) is disconnected (None: input removed)
           "TrainFreeDeepCache": {"cache_interval": 1, "schedule": "uniform", "cache_schedule": None},
           "TrainFreeBlockCache": {"cache_interval": 1, "schedule": "uniform", "cache_schedule": None},
           "TrainFreeAdaptiveGuidance": {"threshold": 1.0},
           "TrainFreeGFCG": {"scale": 0.0},
           "TrainFreeEluCD": {"scale": 0.0},
           "TrainFreeDynamicCFG": {"start_percent": 1.0, "end_percent": 1.0},
           "TrainFreeNASA": {"alpha": 0.0},
           "TrainFreeREDDiff": {"lambda": 0.0, "observation_weight": 0.0}}  # the start latent, unmoved
_CollectLatent, _latents = collect.collector("samples", "LATENT", take=lambda samples: samples["samples"])
# Patches with no neutral setting that save model evaluations instead: the workflow's samplers push fewer batch
# rows through the model than with the patch bypassed.
ROW_SAVERS = ("TrainFreeLinearAG",)
_rows = []


class _CountRows:
    """MODEL -> MODEL: the model with an APPLY_MODEL wrapper that adds each evaluation's batch rows to ``_rows``."""
    CATEGORY = "harness"
    FUNCTION = "wrap"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def wrap(self, model):
        import comfy.patcher_extension as pe

        def count(executor, x, *args, **kwargs):
            _rows.append(x.shape[0])
            return executor(x, *args, **kwargs)
        model = model.clone()
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "harness_rows", count)
        return (model,)


@pytest.fixture(scope="module")
def engine():
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS["HarnessCollectLatent"] = _CollectLatent
    nodes.NODE_CLASS_MAPPINGS["HarnessCountRows"] = _CountRows


def patch_nodes(prompt):
    """Ids of the pack's MODEL -> MODEL nodes in an API prompt."""
    import nodes
    return [key for key, node in prompt.items() if node["class_type"].startswith("TrainFree")
            and nodes.NODE_CLASS_MAPPINGS[node["class_type"]].RETURN_TYPES == ("MODEL",)]


def bypassed(prompt, node_ids):
    """The prompt with those nodes taken out, their consumers wired to the model each node received."""
    prompt = json.loads(json.dumps(prompt))
    for key in node_ids:
        source = prompt.pop(key)["inputs"]["model"]
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if value == [key, 0]:
                    node["inputs"][name] = source
    return prompt


def second_models_made_distinct(prompt, node_ids):
    """A second model that a workflow loads from the same file as the first (noise-damped CFG's weak model is the
    same checkpoint, modified by the user) would make the technique a no-op on the tiny stand-ins: give its
    stand-in other weights."""
    prompt = json.loads(json.dumps(prompt))
    for key in node_ids:
        for name, value in prompt[key]["inputs"].items():
            loader = prompt[value[0]] if isinstance(value, list) and name != "model" else None
            if loader is not None and loader["class_type"] in run_workflows.HARNESS_NODES:
                loader["inputs"]["variant"] += " (second model)"
    return prompt


def neutralised(prompt, key):
    """The prompt with node ``key`` set to its neutral setting (``NEUTRAL``; a None value removes the input)."""
    inputs = prompt[key]["inputs"]
    for name, value in NEUTRAL[prompt[key]["class_type"]].items():
        if value is None:
            inputs.pop(name, None)
        else:
            inputs[name] = value


def _needed_by(prompt, keys):
    """``keys`` and every node they take an input from, directly or not."""
    needed, todo = set(), list(keys)
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo += [v[0] for v in prompt[key]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return needed


def rows_counted(prompt):
    """The prompt with every sampler's model passed through ``HarnessCountRows``."""
    prompt = json.loads(json.dumps(prompt))
    for key in [k for k, v in prompt.items() if v["class_type"] in run_workflows.SAMPLER_NODES]:
        prompt[f"rows{key}"] = {"class_type": "HarnessCountRows", "inputs": {"model": prompt[key]["inputs"]["model"]}}
        prompt[key]["inputs"]["model"] = [f"rows{key}", 0]
    return prompt


def sampled(prompt, out_dir=None):
    """Execute the prompt; the latents of its samplers, in node order. Without ``out_dir`` only what the samplers
    need runs: no image is decoded, no other output (a cache schedule search whose schedule is not used) runs."""
    import folder_paths
    prompt = json.loads(json.dumps(prompt))
    samplers = sorted(k for k, v in prompt.items()
                      if v["class_type"] in run_workflows.SAMPLER_NODES + run_workflows.EDIT_NODES)
    if out_dir is None:
        needed = _needed_by(prompt, samplers)
        prompt = {k: v for k, v in prompt.items() if k in needed}
    else:
        folder_paths.set_output_directory(out_dir)
    for key in samplers:
        prompt[f"collect{key}"] = {"class_type": "HarnessCollectLatent", "inputs": {"samples": [key, 0], "key": key}}
    _latents.clear()
    outputs = comfy_host.execute_prompt(prompt)
    return torch.cat([_latents[k] for k in samplers]), outputs


def test_there_is_a_workflow_for_every_node_and_family_the_issues_name(engine):
    import nodes
    names = {os.path.basename(p) for p in PATHS}
    assert {"pag_sd15.json", "pag_sdxl.json", "pag_flux.json"} <= names
    used = {n["type"] for p in PATHS for n in json.load(open(p))["nodes"]}
    ours = {k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("TrainFree")}
    assert ours and ours <= used, f"nodes without an example workflow: {ours - used}"


def test_conversion_follows_widget_order_and_the_seed_control_entry(engine):
    prompt = ui_to_api(json.load(open(os.path.join(run_workflows.WORKFLOWS, "pag_sd15.json"))),
                       run_workflows.node_definitions())
    by_type = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert by_type["KSampler"]["seed"] == 42 and by_type["KSampler"]["steps"] == 25
    assert by_type["KSampler"]["sampler_name"] == "euler" and by_type["KSampler"]["denoise"] == 1.0
    assert by_type["TrainFreePAG"] == {"model": ["1", 0], "scale": 3.0, "layers": "auto", "start_percent": 0.0,
                                       "end_percent": 1.0, "adaptive_scale": 0.0, "rescale": 0.0,
                                       "dit_mode": "image-only (diffusers)"}


def test_unknown_node_types_are_named(engine):
    workflow = {"nodes": [{"id": 1, "type": "NoSuchNode", "inputs": [], "widgets_values": []}], "links": []}
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(workflow, run_workflows.node_definitions())


def saved_images(outputs, kind="output"):
    """The file names of the images the outputs wrote to the output folder (``kind="temp"``: previewed)."""
    return [image["filename"] for ui in outputs.values() for image in ui.get("images", [])
            if image.get("type", "output") == kind]


def has_patch(path):
    return any(n["type"] in ("TrainFreePAG", "TrainFreeAPG", "TrainFreeFDG", "TrainFreeGuidanceInterval",
                             "TrainFreeNoiseDampedCFG", "TrainFreeResidualCFG", "TrainFreeTwoModelGuidance",
                             "TrainFreeScaleCrafter", "TrainFreeDeepCache", "TrainFreeBlockCache",
                             "TrainFreeAdaptiveGuidance", "TrainFreeLinearAG", "TrainFreeGFCG", "TrainFreeNASA",
                             "TrainFreeDynamicCFG", "TrainFreeEluCD")
               for n in json.load(open(path))["nodes"])


def has_classifier(path):
    return any(n["type"] in run_workflows.CLASSIFIER_NODES for n in json.load(open(path))["nodes"])


RESTORERS = ("TrainFreeREDDiff",)  # SAMPLERs that restore the latent they are given from a measurement


def has_restorer(path):
    return any(n["type"] in RESTORERS for n in json.load(open(path))["nodes"])


def has_cascade(path):
    return any(n["type"] in run_workflows.CASCADE_NODES for n in json.load(open(path))["nodes"])


def has_dpm_replay(path):
    return any(n["type"] == "TrainFreeCycleDiffusionSampler" for n in json.load(open(path))["nodes"])


def sampler_nodes(prompt):
    """Ids of the pack's SAMPLER nodes (solvers for SamplerCustomAdvanced) in an API prompt."""
    return [key for key, node in prompt.items() if node["class_type"] in SAMPLER_COUNTERPARTS]


def has_sampler(path):
    return any(n["type"] in SAMPLER_COUNTERPARTS for n in json.load(open(path))["nodes"])


def cfgpp_counterparts(inputs):
    """CFG++ against the solver it modifies, with plain CFG at the same scale, and against core's CFG++ samplers
    (another implementation of the paper, on eps models: the workflows' SD1.5 / SDXL)."""
    plain = {("ddim (= euler)", 0.0): "euler", ("ddim (= euler)", 1.0): "euler_ancestral",
             ("dpmpp_2m", 0.0): "dpmpp_2m"}[inputs["solver"], inputs["eta"]]
    return plain, {}, f"{plain}_cfg_pp"


def momentum_counterparts(inputs):
    """The momentum sampler against its base solver, and without momentum (beta 1) equal to it."""
    plain = {"dpmpp_2m_hb": "dpmpp_2m"}[inputs["solver"]]
    return plain, {"beta": 1.0}, plain


def steered_counterparts(inputs):
    """Steered Diffusion against the Euler (= DDIM) sampler it steers, and at strength 0 equal to it."""
    return "euler", {"strength": 0.0}, "euler"


def search_counterparts(inputs):
    """A search against the Euler ancestral paths it searches over, and with a budget of one path (one beam) equal
    to it; the test prompt's schedule has run_workflows.to_test_prompt's 4 steps."""
    return "euler_ancestral", {"budget": 4, **({"beams": 1} if "beams" in inputs else {})}, "euler_ancestral"


# node type -> its inputs -> (the core sampler it modifies, settings under which it is a core sampler, that sampler)
SAMPLER_COUNTERPARTS = {"TrainFreeCFGPPSampler": cfgpp_counterparts,
                        "TrainFreeMomentumSampler": momentum_counterparts,
                        "TrainFreeSteeredDiffusion": steered_counterparts,
                        "TrainFreeDiffusionTreeSampling": search_counterparts,
                        "TrainFreeLatentBeamSearch": search_counterparts,
                        "TrainFreeBestOfN": search_counterparts}


def with_core_sampler(prompt, key, name):
    """The prompt with node ``key`` replaced by core's KSamplerSelect choosing ``name``."""
    prompt = json.loads(json.dumps(prompt))
    prompt[key] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}}
    return prompt


def cascade_output(prompt, tmp_path=None):
    """Run a SamplerCustomAdvanced prompt; its output latent."""
    prompt = json.loads(json.dumps(prompt))
    if tmp_path is None:
        prompt = {k: v for k, v in prompt.items() if v["class_type"] not in ("SaveImage", "PreviewImage")}
    else:
        import folder_paths
        folder_paths.set_output_directory(str(tmp_path))
    key = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    prompt["collect"] = {"class_type": "HarnessCollectLatent", "inputs": {"samples": [key, 0], "key": key}}
    _latents.clear()
    outputs = comfy_host.execute_prompt(prompt)
    return _latents[key], outputs


@pytest.mark.parametrize("path", [p for p in PATHS if has_cascade(p)], ids=os.path.basename)
def test_cascade_workflow_runs_and_its_stages_act(engine, path, tmp_path):
    """The cascade writes its image at the final size; made a single stage at that size it equals the sampler it
    wraps bit for bit, and the real cascade differs from that."""
    prompt = run_workflows.to_test_prompt(path)
    latent, outputs = cascade_output(prompt, tmp_path)
    images = [image["filename"] for ui in outputs.values() for image in ui.get("images", [])]
    assert images and all(os.path.getsize(tmp_path / name) > 0 for name in images)
    assert latent.shape[-1] == 128 // 8 and torch.isfinite(latent).all()
    key, node = next((k, v) for k, v in prompt.items() if v["class_type"] in run_workflows.CASCADE_NODES)
    steps = sum(int(n) for n in node["inputs"]["stage_steps"].split(","))
    node["inputs"].update(stage_steps=str(steps), stage_end_timesteps="0", base_width=node["inputs"]["width"],
                          base_height=node["inputs"]["height"])
    single, _ = cascade_output(prompt)
    plain = json.loads(json.dumps(prompt))
    for other in plain.values():
        if other["class_type"] == "SamplerCustomAdvanced":
            other["inputs"]["sampler"] = node["inputs"]["sampler"]
    direct, _ = cascade_output(plain)
    assert torch.equal(single, direct)
    assert (latent - direct).abs().max() > 1e-3


@pytest.mark.parametrize("path", [p for p in PATHS if not has_patch(p) and not has_cascade(p) and not has_sampler(p)
                                  and not has_classifier(p) and not has_dpm_replay(p) and not has_restorer(p)],
                         ids=os.path.basename)
def test_inversion_workflow_runs_and_edits_the_image(engine, path, tmp_path):
    """Workflows without a MODEL patch invert a loaded image and edit it: every edit differs from the encoded
    image, and the images are written."""
    prompt = run_workflows.to_test_prompt(path)
    encoders = sorted(k for k, v in prompt.items() if v["class_type"] == "VAEEncode")
    assert encoders and any(v["class_type"] in run_workflows.EDIT_NODES for v in prompt.values())
    for key in encoders:
        prompt[f"collect{key}"] = {"class_type": "HarnessCollectLatent", "inputs": {"samples": [key, 0], "key": key}}
    edits, outputs = sampled(prompt, str(tmp_path))
    images = [image["filename"] for ui in outputs.values() for image in ui.get("images", [])]
    assert images and all(os.path.getsize(tmp_path / name) > 0 for name in images)
    encoded = _latents[encoders[0]]
    assert torch.isfinite(edits).all()
    for edit in edits.split(encoded.shape[0]):
        assert (edit - encoded).abs().max() > 1e-3


@pytest.mark.parametrize("path", [p for p in PATHS if has_patch(p)], ids=os.path.basename)
def test_workflow_runs_and_its_technique_acts(engine, path, tmp_path):
    prompt = run_workflows.to_test_prompt(path)
    patches = patch_nodes(prompt)
    assert patches, "the workflow has no node of the pack"
    prompt = rows_counted(second_models_made_distinct(prompt, patches))
    _rows.clear()
    latent, outputs = sampled(prompt, str(tmp_path))
    rows = sum(_rows)
    images = saved_images(outputs)
    assert images and all(os.path.getsize(tmp_path / name) > 0 for name in images)
    assert torch.isfinite(latent).all()
    searches = [v for v in prompt.values() if v["class_type"] in run_workflows.SEARCH_NODES]
    if searches:  # the schedule is saved for the sampler's steps, and its Pareto plot previewed
        (steps,) = {v["inputs"]["steps"] for v in prompt.values() if v["class_type"] in run_workflows.SAMPLER_NODES}
        assert [s["inputs"]["steps"] for s in searches] == [steps] * len(searches)
        saved = os.listdir(tmp_path / "cache_schedules")
        assert len(saved) == len(searches) and all(f'"steps": {steps},' in (tmp_path / "cache_schedules" / name)
                                                   .read_text() for name in saved), saved
        assert len(saved_images(outputs, "temp")) == len(searches)
    calibrations = [v for v in prompt.values() if v["class_type"] in run_workflows.CALIBRATION_NODES]
    if calibrations:  # saved for the sampler's steps
        (steps,) = {v["inputs"]["steps"] for v in prompt.values() if v["class_type"] in run_workflows.SAMPLER_NODES}
        assert [c["inputs"]["steps"] for c in calibrations] == [steps] * len(calibrations)
        saved = os.listdir(tmp_path / "linear_ag")
        assert len(saved) == len(calibrations) and all(json.loads((tmp_path / "linear_ag" / name).read_text())
                                                       ["steps"] == steps for name in saved), saved
    _rows.clear()
    plain, _ = sampled(bypassed(prompt, patches))
    assert (latent - plain).abs().max() > 1e-3, "bypassing the pack's node leaves the result unchanged"
    if any(prompt[key]["class_type"] in ROW_SAVERS for key in patches):
        assert 0 < rows < sum(_rows), f"the model evaluated {rows} rows, {sum(_rows)} with the patch bypassed"
    kinds = {prompt[key]["class_type"] for key in patches}
    if kinds <= set(NEUTRAL):
        for key in patches:
            neutralised(prompt, key)
        neutral, _ = sampled(prompt)
        assert torch.equal(neutral, plain), "the neutral setting changes the result"


@pytest.mark.parametrize("path", [p for p in PATHS if has_sampler(p)], ids=os.path.basename)
def test_sampler_workflow_runs_and_its_sampler_acts(engine, path, tmp_path):
    """The pack's sampler gives another latent than the core solver it modifies, in the same graph (same guider,
    cfg, sigmas and noise), and under its core-equivalent settings the latent of that core sampler (to float
    rounding: the two loops order their arithmetic differently)."""
    prompt = run_workflows.to_test_prompt(path)
    (key,) = sampler_nodes(prompt)
    latent, outputs = cascade_output(prompt, tmp_path)
    images = saved_images(outputs)
    assert images and all(os.path.getsize(tmp_path / name) > 0 for name in images)
    assert torch.isfinite(latent).all()
    node = prompt[key]
    plain_name, settings, core_name = SAMPLER_COUNTERPARTS[node["class_type"]](node["inputs"])
    plain, _ = cascade_output(with_core_sampler(prompt, key, plain_name))
    assert (latent - plain).abs().max() > 1e-3, f"the pack's sampler gives core {plain_name}'s result"
    equivalent = json.loads(json.dumps(prompt))
    equivalent[key]["inputs"].update(settings)
    ours, _ = cascade_output(equivalent)
    core = plain if core_name == plain_name else cascade_output(with_core_sampler(prompt, key, core_name))[0]
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-4 * float(core.abs().max()))


@pytest.mark.parametrize("path", [p for p in PATHS if has_restorer(p)], ids=os.path.basename)
def test_restoration_workflow_runs_and_restores(engine, path, tmp_path):
    """The restorer moves the start latent it is given (the VAE-encoded start image of the measurement) and the
    images are written; at its neutral setting (no weight on either term) it returns that start latent."""
    prompt = run_workflows.to_test_prompt(path)
    (encoder,) = [k for k, v in prompt.items() if v["class_type"] == "VAEEncode"]
    prompt["collect_start"] = {"class_type": "HarnessCollectLatent", "inputs": {"samples": [encoder, 0],
                                                                                "key": "start"}}
    latent, outputs = cascade_output(prompt, tmp_path)
    start = _latents["start"]
    images = saved_images(outputs)
    assert images and all(os.path.getsize(tmp_path / name) > 0 for name in images)
    assert torch.isfinite(latent).all() and latent.shape == start.shape
    assert (latent - start).abs().max() > 1e-3, "the restorer left the start latent as it was"
    (key,) = [k for k, v in prompt.items() if v["class_type"] in RESTORERS]
    neutralised(prompt, key)
    neutral, _ = cascade_output(prompt)
    torch.testing.assert_close(neutral, _latents["start"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", [p for p in PATHS if has_classifier(p)], ids=os.path.basename)
def test_classifier_workflow_names_the_caption_of_the_loaded_digit(engine, path, tmp_path):
    """The classifier workflows load the held-out red seven (its caption is the reference model's
    ``DIGIT_CAPTION``): with the plan capped, the node still names that caption as the best prompt, scores every
    candidate, and its chart is previewed."""
    import folder_paths
    folder_paths.set_output_directory(str(tmp_path))
    prompt = run_workflows.to_test_prompt(path)
    outputs = comfy_host.execute_prompt(prompt)
    for key, node in prompt.items():
        if node["class_type"] in run_workflows.CLASSIFIER_NODES:
            candidates = node["inputs"]["candidates"].splitlines()
            best, *scores = outputs[key]["text"][0].splitlines()
            assert run_workflows.DIGIT_CAPTION in candidates and best == run_workflows.DIGIT_CAPTION, scores
            assert sorted(line.split("  ")[-1] for line in scores) == sorted(candidates)
    assert saved_images(outputs, "temp")


@pytest.mark.parametrize("path", [p for p in PATHS if has_dpm_replay(p)], ids=os.path.basename)
def test_cycle_diffusion_workflow_runs_and_translates(engine, path, tmp_path):
    """The replay of a DPM latent writes its image; where the workflow encodes the image itself, the translation
    moves away from the image, and the same replay with the encoding's source prompt reconstructs it (within a
    fifth of the translation's distance: the reference model's one-step denoise at the last noisy step)."""
    prompt = run_workflows.to_test_prompt(path)
    (key,) = [k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced"]
    translation, outputs = cascade_output(prompt, tmp_path)
    assert saved_images(outputs) and torch.isfinite(translation).all()
    encoders = [v for v in prompt.values() if v["class_type"] == "TrainFreeDPMEncoder"]
    if not encoders:
        return
    image = prompt[encoders[0]["inputs"]["latent"][0]]
    prompt["collect_image"] = {"class_type": "HarnessCollectLatent",
                               "inputs": {"samples": encoders[0]["inputs"]["latent"], "key": "image"}}
    source = json.loads(json.dumps(prompt))
    source[prompt[key]["inputs"]["guider"][0]]["inputs"]["positive"] = encoders[0]["inputs"]["positive"]
    reconstruction, _ = cascade_output(source)
    encoded = _latents["image"]
    assert image["class_type"] == "VAEEncode"
    assert (translation - encoded).abs().max() > 1e-2
    assert (reconstruction - encoded).norm() < 0.2 * (translation - encoded).norm()
