"""An API prompt that stacks every patch of the pack on the reference model, for the server tests.

The patches and their settings come from the server's /object_info (defaults), so a new MODEL -> MODEL node joins
the stack, and the bad-input table, by itself. A second model input (guide, weak model) gets a second copy of the
reference model.
"""
REFERENCE = {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": "trainfree_digits.safetensors"}}
# Settings other than the defaults, where the default would leave the patch idle in a short run.
OVERRIDES = {"TrainFreeResidualCFG": {"mode": "self-negative"}}


def patch_nodes(object_info):
    """The pack's MODEL -> MODEL nodes, in the order the server lists them."""
    return [name for name, info in object_info.items()
            if name.startswith("TrainFree") and list(info["output"]) == ["MODEL"]
            and info["input"]["required"].get("model", [None])[0] == "MODEL"]


def patch_inputs(object_info, name):
    inputs = {}
    for section in ("required", "optional"):
        for input_name, spec in object_info[name]["input"].get(section, {}).items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if kind == "MODEL":
                inputs[input_name] = ["2", 0]
            elif isinstance(kind, list):
                inputs[input_name] = options.get("default", kind[0])
            elif "default" in options:
                inputs[input_name] = options["default"]
    return {**inputs, **OVERRIDES.get(name, {})}


def stack_prompt(object_info, patches=None, width=128, height=128, batch=1, steps=6, seed=3, cfg=5.0,
                 caption="a green digit two on a dark background"):
    prompt = {"1": REFERENCE, "2": REFERENCE}
    model = ["1", 0]
    for i, name in enumerate(patch_nodes(object_info) if patches is None else patches):
        key = str(10 + i)
        prompt[key] = {"class_type": name, "inputs": {**patch_inputs(object_info, name), "model": model}}
        model = [key, 0]
    prompt.update({
        "90": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["1", 1]}},
        "91": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "92": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "93": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["90", 0], "negative": ["91", 0], "latent_image": ["92", 0], "denoise": 1.0}},
        "94": {"class_type": "VAEDecode", "inputs": {"samples": ["93", 0], "vae": ["1", 2]}},
        "95": {"class_type": "SaveImage", "inputs": {"images": ["94", 0], "filename_prefix": "trainfree_stack"}},
    })
    return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
