"""Run every example workflow in workflows/ headless through ComfyUI's real execution engine.

Model loaders are swapped for built-in models (tiny random-weight models of the workflow's family, named by the
file suffix: ``<technique>_<family>.json``); resolution and steps are capped so a CPU runs each workflow in
seconds. Images and a one-page report (report.html) are written to --out.

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


def run(path, out_dir):
    import folder_paths
    folder_paths.set_output_directory(out_dir)
    started = time.perf_counter()
    outputs = comfy_host.execute_prompt(to_test_prompt(path), prompt_id=os.path.basename(path))
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
