"""Run every example workflow in workflows/ headless through ComfyUI's real execution engine.

Model loaders are swapped for built-in models: the demo runs every workflow on the pack's trained reference model
(an SD1.5 model) with a digit prompt; the tests also run each on tiny random-weight models of the workflow's own
family (named by the file suffix: ``<technique>_<family>.json``), with resolution and steps capped for the CPU.
Images and a one-page report (report.html) are written to --out.

    python -m harness.run_workflows --out demo_output
"""
import argparse
import glob
import html
import json
import os
import shutil
import time
import zlib

from harness import comfy_host, leak_probe, tiny_models
from harness.workflow_api import ui_to_api

WORKFLOWS = os.path.join(comfy_host.PACK_DIR, "workflows")
LOADERS = {"CheckpointLoaderSimple": "HarnessTinyCheckpoint", "UNETLoader": "HarnessTinyModel",
           "CLIPLoader": "HarnessTinyCLIP", "DualCLIPLoader": "HarnessTinyCLIP", "TripleCLIPLoader": "HarnessTinyCLIP",
           "VAELoader": "HarnessTinyVAE", "CLIPVisionLoader": "HarnessTinyCLIPVision"}
LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
SCHEDULER_NODES = ("BasicScheduler",)  # an inversion's schedule: its steps are capped like a sampler's
EDIT_NODES = ("TrainFreeSampleFromInversion", "TrainFreePromptToPrompt", "TrainFreeFlowOpt")  # sample inversions
CASCADE_NODES = ("TrainFreeFreCaS",)  # plan a cascade for SamplerCustomAdvanced: sizes and stage steps are capped
SCALECRAFTER = "TrainFreeScaleCrafter"
SEARCH_NODES = ("TrainFreeCacheScheduleSearch",)  # sample like the workflow's KSampler: size and steps follow it
BUDGET_NODES = ("TrainFreeDiffusionTreeSampling", "TrainFreeLatentBeamSearch", "TrainFreeBestOfN")  # budget capped
CALIBRATION_NODES = ("TrainFreeLinearAGCalibrate",)  # likewise: a calibration holds for one step count
SCHEDULE_LOADERS = ("TrainFreeLoadCacheSchedule",)  # a loaded schedule is for its step count: steps stay as saved
CLASSIFIER_NODES = ("TrainFreeDiffusionClassifier",)  # analyse an image: no sampler; the plan is capped


def generic_scalecrafter_preset(preset):
    """ScaleCrafter's official presets are written for SD1.5 / SD2.1 (four levels) and SDXL (three) UNets; the tiny
    and reference models have fewer or other levels, so the workflows run with the generic preset of the same
    pixel factor (the node refuses a preset that does not fit the model)."""
    return "generic 16x pixels" if "16x" in preset else "generic 4x pixels"


class _TinyLoader:
    CATEGORY = "harness"
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(tiny_models.FAMILIES) + [tiny_models.VIDEO_FAMILY],)},
                "optional": {"variant": ("STRING", {})}}

    def load(self, family, variant=""):
        seed = zlib.crc32(variant.encode()) % 1000  # different files in a workflow stay different models
        made = {"MODEL": lambda: tiny_models.make_model(family, seed), "CLIP": tiny_models.make_clip,
                "VAE": lambda: tiny_models.make_vae(tiny_models.LATENT_CHANNELS[family]),
                "CLIP_VISION": lambda: tiny_models.make_clip_vision(seed)}
        return tuple(made[kind]() for kind in self.RETURN_TYPES)


def _loader(name, outputs):
    return name, type(name, (_TinyLoader,), {"RETURN_TYPES": outputs})


class HarnessReferenceCLIPVision:
    """The reference models have no CLIP vision partner: an untrained tiny CLIP ViT whose image embeddings have the
    width of the reference CLIP's text projection, so that a CLIP judge workflow runs (its judgements are noise)."""
    CATEGORY = "harness"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP_VISION",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (sorted(REFERENCE_FILES),)}}

    def load(self, family):
        reference = comfy_host.pack_module("nodes.reference_model").TrainFreeReferenceModel()
        clip = reference.load(REFERENCE_FILES[family])[1]
        width = next(m.text_projection.weight.shape[0] for m in clip.cond_stage_model.modules()
                     if hasattr(m, "text_projection"))
        return (tiny_models.make_clip_vision(projection_dim=width),)


HARNESS_NODES = dict([_loader("HarnessTinyCheckpoint", ("MODEL", "CLIP", "VAE")), _loader("HarnessTinyModel", ("MODEL",)),
                      _loader("HarnessTinyCLIP", ("CLIP",)), _loader("HarnessTinyVAE", ("VAE",)),
                      _loader("HarnessTinyCLIPVision", ("CLIP_VISION",)),
                      ("HarnessReferenceCLIPVision", HarnessReferenceCLIPVision),
                      ("HarnessLeakProbe", leak_probe.HarnessLeakProbe)])


# What each core loader returns: the same as its tiny stand-in.
LOADER_OUTPUTS = {core: HARNESS_NODES[tiny].RETURN_TYPES for core, tiny in LOADERS.items()}


def workflow_paths():
    """Every example workflow file, sorted."""
    return sorted(glob.glob(os.path.join(WORKFLOWS, "*.json")))


def boot():
    comfy_host.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HARNESS_NODES)


def family_of(path):
    family = os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]
    if family not in tiny_models.FAMILIES:
        raise ValueError(f"{path}: name example workflows <technique>_<family>.json, family one of {tiny_models.FAMILIES}")
    return family


def node_definitions():
    import nodes
    return {name: cls.INPUT_TYPES() for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


REFERENCE_LOADER = {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": "trainfree_digits.safetensors"}}
# The reference model of each family a workflow can be made for: its file, its empty-latent node and, for the
# Flux-class model (no guidance embedding, so FluxGuidance does nothing), the CFG scale it is guided with.
REFERENCE_FILES = {"sd15": "trainfree_digits.safetensors", "flux": "trainfree_digits_flux.safetensors"}
REFERENCE_LATENT_NODES = {"sd15": "EmptyLatentImage", "flux": "EmptySD3LatentImage"}
FLUX_REFERENCE_CFG = 5.0


def reference_family(workflow):
    """'flux' for a Flux workflow (it loads a Flux text-encoder pair), else 'sd15' (SD1.5 / SDXL workflows run on
    the SD1.5-class model)."""
    return "flux" if any(n["type"] == "DualCLIPLoader" and "flux" in n.get("widgets_values", [])
                         for n in workflow["nodes"]) else "sd15"
REFERENCE_OUTPUTS = ("MODEL", "CLIP", "VAE")
REFERENCE_SIZE = 128


def load_prompt(path, definitions=None):
    """The UI workflow at ``path`` in API format (``definitions``: node type -> INPUT_TYPES, default this process's)."""
    with open(path) as f:
        return ui_to_api(json.load(f), definitions or node_definitions())


def _each(prompt, kinds):
    return [node for node in prompt.values() if node["class_type"] in kinds]


def to_test_prompt(path, max_size=128, max_steps=4):
    """The workflow at ``path`` in API format, on tiny random-weight models of its family, with CPU-sized latents
    and step counts."""
    family = family_of(path)

    def tiny(node):
        variant = next((v for v in node["inputs"].values() if isinstance(v, str)), "")
        return {"class_type": LOADERS[node["class_type"]], "inputs": {"family": family, "variant": variant}}

    prompt = load_prompt(path)
    steps_fixed = bool(_each(prompt, SCHEDULE_LOADERS))
    for key, node in prompt.items():
        if node["class_type"] in LOADERS:
            prompt[key] = tiny(node)
    for node in _each(prompt, LATENT_NODES):
        for side in ("width", "height"):
            node["inputs"][side] = min(node["inputs"][side], max_size)
    for node in _each(prompt, SAMPLER_NODES + SCHEDULER_NODES):
        if not steps_fixed:
            node["inputs"]["steps"] = min(node["inputs"]["steps"], max_steps)
    for node in _each(prompt, SEARCH_NODES):
        node["inputs"].update(capped_search(node["inputs"], max_size, max_steps))
    for node in _each(prompt, BUDGET_NODES):  # searches: at most six paths' worth of the capped steps
        node["inputs"]["budget"] = min(node["inputs"]["budget"], 6 * max_steps * node["inputs"].get("beams", 1))
    for node in _each(prompt, CALIBRATION_NODES):
        node["inputs"].update(capped_calibration(node["inputs"], max_size, None if steps_fixed else max_steps))
    for node in _each(prompt, ("TrainFreeFlowOpt",)):  # it regenerates at most the schedule's steps
        node["inputs"]["n_max"] = min(node["inputs"]["n_max"], max_steps)
    for node in _each(prompt, CLASSIFIER_NODES):
        node["inputs"].update(capped_classifier_plan(node["inputs"], max_steps))
    for node in _each(prompt, CASCADE_NODES):
        node["inputs"].update(width=max_size, height=max_size, base_width=max_size // 2, base_height=max_size // 2,
                              stage_steps=capped_stage_steps(node["inputs"]["stage_steps"], max_steps))
    for node in _each(prompt, (SCALECRAFTER,)):
        node["inputs"]["preset"] = generic_scalecrafter_preset(node["inputs"]["preset"])
    return prompt


def capped_stage_steps(text, total):
    """A cascade's per-stage steps scaled down to about ``total`` in all, at least one per stage."""
    steps = [int(part) for part in text.split(",")]
    if sum(steps) > total:
        steps = [max(1, round(n * total / sum(steps))) for n in steps]
    return ", ".join(str(n) for n in steps)


def capped_classifier_plan(inputs, pairs):
    """A Diffusion Classifier's plan cut down to ``pairs`` (timestep, noise) pairs per candidate in all, over as many
    stages as written (at least one more pair per stage), each stage keeping what it keeps."""
    samples = [int(part) for part in inputs["timesteps_per_stage"].split(",")]
    capped = [min(n, pairs - len(samples) + 1 + i) for i, n in enumerate(samples)]
    return {"timesteps_per_stage": ", ".join(str(n) for n in capped)}


def capped_search(inputs, size, steps):
    """A cache schedule search cut down to a short run (its first calibration prompt, the smallest population, one
    generation) at the capped size and steps, which its workflow's KSampler also gets."""
    return {"width": min(inputs["width"], size), "height": min(inputs["height"], size),
            "steps": min(inputs["steps"], steps), "population": min(inputs["population"], 4),
            "generations": min(inputs["generations"], 1),
            "calibration_prompts": inputs["calibration_prompts"].strip().splitlines()[0]}


def capped_calibration(inputs, size, steps):
    """A LinearAG calibration cut down to its first prompt and at most two runs, at the capped size and steps
    (``steps`` None: as written), which its workflow's KSampler also gets."""
    capped = {"width": min(inputs["width"], size), "height": min(inputs["height"], size),
              "runs_per_prompt": min(inputs["runs_per_prompt"], 2),
              "calibration_prompts": inputs["calibration_prompts"].strip().splitlines()[0]}
    return capped if steps is None else {**capped, "steps": min(inputs["steps"], steps)}


DIGIT_CAPTION = "a red digit seven on a dark background"


def _text_node(nodes, links, target, input_name):
    """The CLIPTextEncode node that feeds ``input_name`` of ``target`` (through FluxGuidance and the like)."""
    node = target
    while True:
        link = next(i["link"] for i in node["inputs"]
                    if i["name"] == input_name or (input_name is None and i.get("link") is not None))
        node = nodes[links[link][1]]
        if node["type"] == "CLIPTextEncode":
            return node
        input_name = None


def reference_workflow(workflow, steps=6, batch=1, caption=DIGIT_CAPTION, seed=None):
    """A UI workflow (editor format) rewired onto the reference model of its family (``reference_family``), as a
    user would do by hand: each loader replaced by the reference-model loader, latents made 128x128 (ScaleCrafter:
    256 or 512 square, its preset's 4x or 16x pixels, the preset made generic) latents of
    ``batch`` images for that model, KSampler's steps set to ``steps`` (and its seed to ``seed``; a scheduler's
    steps capped at ``steps``), its positive
    prompt to ``caption`` and its negative to "". On the Flux-class model, which has no guidance embedding, the
    CFG scale is set to ``FLUX_REFERENCE_CFG``; FluxGuidance stays (the model ignores it), and so it does on SD1.5.
    A CFGGuider's prompts are set like KSampler's; a FreCaS cascade goes from the reference size to twice its side
    with its stage steps scaled to about ``steps``. A cache schedule search calibrates on ``caption`` at the
    sampler's steps, size and cfg, with at most 4 schedules per generation and one generation, and a LinearAG
    calibration on ``caption`` at the sampler's steps, size and cfg; where a workflow
    loads a saved cache schedule, made for one step count, the sampler keeps its steps. The browser tests load this; ``to_reference_prompt`` converts it."""
    workflow = json.loads(json.dumps(workflow))
    family = reference_family(workflow)
    # ScaleCrafter samples above the training size: 4x or 16x the reference model's pixel count
    crafters = [n for n in workflow["nodes"] if n["type"] == SCALECRAFTER]
    size = REFERENCE_SIZE * max([4 if "16x" in n["widgets_values"][0] else 2 for n in crafters], default=1)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    moved = {}
    steps_fixed = any(n["type"] in SCHEDULE_LOADERS for n in workflow["nodes"])
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind == "CLIPVisionLoader":  # no reference CLIP vision model: an untrained stand-in of matching width
            node.update(type="HarnessReferenceCLIPVision", widgets_values=[family])
            node.setdefault("properties", {})["Node name for S&R"] = node["type"]
        elif kind in LOADER_OUTPUTS:
            slots = [REFERENCE_OUTPUTS.index(k) for k in LOADER_OUTPUTS[kind]]
            moved[node["id"]] = slots
            outputs = [{"name": k, "type": k, "links": [], "slot_index": i} for i, k in enumerate(REFERENCE_OUTPUTS)]
            for old_slot, output in enumerate(node.get("outputs", [])):
                outputs[slots[old_slot]]["links"] = list(output.get("links") or [])
            node.update(type=REFERENCE_LOADER["class_type"], inputs=[], outputs=outputs,
                        widgets_values=[REFERENCE_FILES[family]])
            node.setdefault("properties", {})["Node name for S&R"] = node["type"]
        elif kind in LATENT_NODES:
            node.update(type=REFERENCE_LATENT_NODES[family], widgets_values=[size, size, batch])
        elif kind == "KSampler":
            values = node["widgets_values"]  # seed, its control entry, steps, cfg, ...
            values[2] = values[2] if steps_fixed else steps
            values[0] = values[0] if seed is None else seed
            if family == "flux":
                values[3] = FLUX_REFERENCE_CFG
            _text_node(nodes, links, node, "positive")["widgets_values"][0] = caption
            _text_node(nodes, links, node, "negative")["widgets_values"][0] = ""
        elif kind == "CFGGuider":  # cfg; its prompts like KSampler's
            _text_node(nodes, links, node, "positive")["widgets_values"][0] = caption
            _text_node(nodes, links, node, "negative")["widgets_values"][0] = ""
        elif kind == "RandomNoise" and seed is not None:  # noise_seed, its control entry
            node["widgets_values"][0] = seed
        elif kind in CASCADE_NODES:  # width, height, batch, base width, base height, stage steps, ...
            values = node["widgets_values"]
            values[:6] = [2 * REFERENCE_SIZE, 2 * REFERENCE_SIZE, batch, REFERENCE_SIZE, REFERENCE_SIZE,
                          capped_stage_steps(values[5], steps)]
        elif kind in SCHEDULER_NODES:
            node["widgets_values"][1] = min(node["widgets_values"][1], steps)
        elif kind == "TrainFreeFlowOpt":  # cfg, n_max, ...: it regenerates at most the schedule's steps
            node["widgets_values"][1] = min(node["widgets_values"][1], steps)
        elif kind == SCALECRAFTER:
            node["widgets_values"][0] = generic_scalecrafter_preset(node["widgets_values"][0])
        elif kind in SEARCH_NODES:  # calibration prompts, negative, seed, its control entry, steps, cfg,
            values = node["widgets_values"]  # sampler, scheduler, width, height, method, budget, population, ...
            values[:2] = [caption, ""]  # calibrated on the caption the sampler gets, at its steps, size and cfg
            values[4] = steps
            values[5] = FLUX_REFERENCE_CFG if family == "flux" else values[5]
            values[8:10] = [REFERENCE_SIZE, REFERENCE_SIZE]
            values[12:14] = [min(values[12], 4), min(values[13], 1)]
        elif kind in CALIBRATION_NODES:  # calibration prompts, negative, runs per prompt, seed, its control entry,
            values = node["widgets_values"]  # steps, cfg, sampler, scheduler, width, height, filename prefix
            values[:2] = [caption, ""]  # calibrated like the search: the sampler's caption, steps, size and cfg
            values[5] = values[5] if steps_fixed else steps
            values[6] = FLUX_REFERENCE_CFG if family == "flux" else values[6]
            values[9:11] = [size, size]
    for link in workflow["links"]:
        if link[1] in moved:
            link[2] = moved[link[1]][link[2]]
    return workflow


def to_reference_prompt(path, caption=DIGIT_CAPTION, batch=1, steps=20, seed=None, definitions=None):
    """Any example workflow in API format on the reference model (see ``reference_workflow``)."""
    with open(path) as f:
        workflow = reference_workflow(json.load(f), steps, batch, caption, seed)
    return ui_to_api(workflow, definitions or node_definitions())


def run(path, out_dir, on="reference", caption=DIGIT_CAPTION, batch=1):
    """Execute one workflow on the reference model (``on="reference"``) or on tiny random-weight models of its
    family (``on="tiny"``); returns the saved images' file names and the seconds it took."""
    import folder_paths
    folder_paths.set_output_directory(out_dir)
    started = time.perf_counter()
    prompt = to_reference_prompt(path, caption, batch) if on == "reference" else to_test_prompt(path)
    outputs = comfy_host.execute_prompt(prompt, prompt_id=os.path.basename(path))
    images = [_in_out_dir(img, out_dir) for ui in outputs.values() for img in ui.get("images", [])]
    return images, time.perf_counter() - started


def _in_out_dir(image, out_dir):
    """The file name in ``out_dir`` of an image a workflow saved or previewed (previews, such as a schedule
    search's Pareto plot, are copied there from ComfyUI's temp folder)."""
    if image.get("type", "output") == "output":
        return os.path.join(image.get("subfolder", ""), image["filename"])
    import folder_paths
    name = f"{image['type']}_{image['filename']}"
    shutil.copyfile(os.path.join(folder_paths.get_temp_directory(), image.get("subfolder", ""), image["filename"]),
                    os.path.join(out_dir, name))
    return name


def write_strip(paths, target):
    from PIL import Image
    pictures = [Image.open(p).convert("RGB") for p in paths]
    strip = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)))
    for i, picture in enumerate(pictures):
        strip.paste(picture, (sum(p.width for p in pictures[:i]), 0))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    strip.save(target)


def write_report(out_dir, rows):
    cells = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{seconds:.1f} s</td><td>"
        + "".join(f'<img src="{html.escape(i)}" width="128">' for i in images) + "</td></tr>"
        for name, images, seconds in rows)
    page = ("<html><head><meta charset='utf-8'><title>comfyui-trainfree demo</title></head><body>"
            "<h1>comfyui-trainfree: example workflows</h1><p>Each workflow ran headless through ComfyUI's "
            "execution engine on the pack's reference model, on the CPU.</p><table border='1' cellpadding='4'>"
            f"<tr><th>workflow</th><th>time</th><th>images</th></tr>{cells}</table></body></html>")
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(page)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--batch", type=int, default=4, help="images per workflow (default 4)")
    parser.add_argument("--gallery", help="also write each workflow's images side by side to GALLERY/<workflow>.png "
                                          "(README's gallery is docs/gallery)")
    args = parser.parse_args()
    out_dir = os.path.abspath(args.out)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    boot()
    rows = []
    for path in workflow_paths():
        images, seconds = run(path, out_dir, batch=args.batch)
        rows.append((os.path.basename(path), images, seconds))
        print(f"{os.path.basename(path)}: {len(images)} image(s) in {seconds:.1f} s")
        if args.gallery and images:
            name = os.path.splitext(os.path.basename(path))[0] + ".png"
            write_strip([os.path.join(out_dir, i) for i in images], os.path.join(args.gallery, name))
    write_report(out_dir, rows)
    print(f"report: {os.path.join(out_dir, 'report.html')}")


if __name__ == "__main__":
    main()
