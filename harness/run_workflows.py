"""Run every example workflow in workflows/ headless through ComfyUI's real execution engine.

Model loaders are swapped for built-in models: SD1.5 workflows with one checkpoint run on the pack's trained
reference model with a digit prompt; the others on tiny random-weight models of the workflow's family (named by the file
suffix: ``<technique>_<family>.json``), with resolution and steps capped so a CPU runs each in seconds.
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

from harness import comfy_host, tiny_models
from harness.workflow_api import ui_to_api

WORKFLOWS = os.path.join(comfy_host.PACK_DIR, "workflows")
LOADERS = {"CheckpointLoaderSimple": "HarnessTinyCheckpoint", "UNETLoader": "HarnessTinyModel",
           "CLIPLoader": "HarnessTinyCLIP", "DualCLIPLoader": "HarnessTinyCLIP", "TripleCLIPLoader": "HarnessTinyCLIP",
           "VAELoader": "HarnessTinyVAE"}
LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")


class _TinyLoader:
    CATEGORY = "harness"
    FUNCTION = "load"
    OUTPUTS = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(tiny_models.FAMILIES),)}, "optional": {"variant": ("STRING", {})}}

    def load(self, family, variant=""):
        seed = zlib.crc32(variant.encode()) % 1000  # different files in a workflow stay different models
        made = {"MODEL": lambda: tiny_models.make_model(family, seed), "CLIP": tiny_models.make_clip,
                "VAE": lambda: tiny_models.make_vae(tiny_models.LATENT_CHANNELS[family])}
        return tuple(made[kind]() for kind in self.RETURN_TYPES)


def _loader(name, outputs):
    return name, type(name, (_TinyLoader,), {"RETURN_TYPES": outputs})


HARNESS_NODES = dict([_loader("HarnessTinyCheckpoint", ("MODEL", "CLIP", "VAE")), _loader("HarnessTinyModel", ("MODEL",)),
                      _loader("HarnessTinyCLIP", ("CLIP",)), _loader("HarnessTinyVAE", ("VAE",))])


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


def to_test_prompt(path, max_size=128, max_steps=4):
    """The workflow at ``path`` in API format, with built-in models and CPU-sized latents and step counts."""
    with open(path) as f:
        prompt = ui_to_api(json.load(f), node_definitions())
    family = family_of(path)
    for node in prompt.values():
        if node["class_type"] in LOADERS:
            variant = next((v for v in node["inputs"].values() if isinstance(v, str)), "")
            node["class_type"], node["inputs"] = LOADERS[node["class_type"]], {"family": family, "variant": variant}
        elif node["class_type"] in LATENT_NODES:
            for side in ("width", "height"):
                node["inputs"][side] = min(node["inputs"][side], max_size)
        elif node["class_type"] in SAMPLER_NODES:
            node["inputs"]["steps"] = min(node["inputs"]["steps"], max_steps)
    return prompt


REFERENCE_LOADER = {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": "trainfree_digits.safetensors"}}
REFERENCE_SIZE = 128


def _text_source(prompt, link):
    node = prompt[link[0]]
    while node["class_type"] != "CLIPTextEncode":
        node = prompt[next(v[0] for v in node["inputs"].values() if isinstance(v, list))]
    return node


def to_reference_prompt(path, caption, batch=1, steps=20, seed=None):
    """An SD1.5 workflow in API format on the reference model: loader swapped, the sampler's positive prompt set
    to ``caption`` and its negative to "", 128x128 latents of ``batch`` images, ``steps`` steps."""
    with open(path) as f:
        prompt = ui_to_api(json.load(f), node_definitions())
    for key, node in prompt.items():
        kind = node["class_type"]
        if kind == "CheckpointLoaderSimple":
            prompt[key] = dict(REFERENCE_LOADER)
        elif kind in LOADERS:
            raise ValueError(f"{path}: the reference model stands in for CheckpointLoaderSimple only, not {kind}")
        elif kind in LATENT_NODES:
            node["inputs"].update(width=REFERENCE_SIZE, height=REFERENCE_SIZE, batch_size=batch)
    for node in prompt.values():
        if node["class_type"] in SAMPLER_NODES:
            node["inputs"]["steps"] = steps
            if seed is not None:
                node["inputs"]["seed"] = seed
            _text_source(prompt, node["inputs"]["positive"])["inputs"]["text"] = caption
            _text_source(prompt, node["inputs"]["negative"])["inputs"]["text"] = ""
    return prompt


def runs_on_reference_model(path):
    """SD1.5 workflows with a single checkpoint loader run on the reference model (a workflow that loads two
    models, such as two-model guidance, needs two different ones: tiny models stand in)."""
    with open(path) as f:
        kinds = [n["type"] for n in json.load(f)["nodes"]]
    return family_of(path) == "sd15" and sum(k in LOADERS for k in kinds) <= 1


def run(path, out_dir, caption="a red digit seven on a dark background"):
    """Execute one workflow: on the reference model where it can, else on tiny models of its family."""
    import folder_paths
    folder_paths.set_output_directory(out_dir)
    started = time.perf_counter()
    prompt = to_reference_prompt(path, caption) if runs_on_reference_model(path) else to_test_prompt(path)
    outputs = comfy_host.execute_prompt(prompt, prompt_id=os.path.basename(path))
    images = [img["filename"] for ui in outputs.values() for img in ui.get("images", [])]
    return images, time.perf_counter() - started


def write_report(out_dir, rows):
    cells = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{seconds:.1f} s</td><td>"
        + "".join(f'<img src="{html.escape(i)}" width="128">' for i in images) + "</td></tr>"
        for name, images, seconds in rows)
    page = ("<html><head><meta charset='utf-8'><title>comfyui-trainfree demo</title></head><body>"
            "<h1>comfyui-trainfree: example workflows</h1><p>Each workflow ran headless through ComfyUI's "
            "execution engine on built-in models, on the CPU.</p><table border='1' cellpadding='4'>"
            f"<tr><th>workflow</th><th>time</th><th>images</th></tr>{cells}</table></body></html>")
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(page)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_output")
    args = parser.parse_args()
    out_dir = os.path.abspath(args.out)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    boot()
    rows = []
    for path in sorted(glob.glob(os.path.join(WORKFLOWS, "*.json"))):
        images, seconds = run(path, out_dir)
        rows.append((os.path.basename(path), images, seconds))
        print(f"{os.path.basename(path)}: {len(images)} image(s) in {seconds:.1f} s")
    write_report(out_dir, rows)
    print(f"report: {os.path.join(out_dir, 'report.html')}")


if __name__ == "__main__":
    main()
