"""An API prompt that stacks every patch of the pack on the reference model, for the server tests."""
REFERENCE = {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": "trainfree_digits.safetensors"}}
# Each patch with its widget values; the model input is chained, the second model (if any) is the guide loader.
PATCHES = {
    "TrainFreePAG": {"scale": 3.0, "layers": "auto", "start_percent": 0.0, "end_percent": 1.0,
                     "adaptive_scale": 0.0, "rescale": 0.0},
    "TrainFreeAPG": {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5},
    "TrainFreeFDG": {"low_scale": 5.0, "high_scale": 10.0, "levels": 2, "low_parallel_weight": 1.0,
                     "high_parallel_weight": 1.0},
    "TrainFreeGuidanceInterval": {"sigma_low": 0.28, "sigma_high": 5.42},
    "TrainFreeResidualCFG": {"mode": "self-negative", "delta": 1.0},
    "TrainFreeNoiseDampedCFG": {"weak_model": ["2", 0], "damped_percent": 0.7},
    "TrainFreeTwoModelGuidance": {"guide_model": ["2", 0], "mode": "autoguidance (guide gets the prompt)",
                                  "sine_weight": 0.7, "sine_until_timestep": 400},
}


def stack_prompt(patches=tuple(PATCHES), width=128, height=128, batch=1, steps=6, seed=3, cfg=5.0,
                 caption="a green digit two on a dark background"):
    prompt = {"1": REFERENCE, "2": REFERENCE}
    model = ["1", 0]
    for i, name in enumerate(patches):
        key = str(10 + i)
        prompt[key] = {"class_type": name, "inputs": dict(PATCHES[name], model=model)}
        model = [key, 0]
    prompt.update({
        "30": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["1", 1]}},
        "31": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "32": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "33": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["30", 0], "negative": ["31", 0], "latent_image": ["32", 0], "denoise": 1.0}},
        "34": {"class_type": "VAEDecode", "inputs": {"samples": ["33", 0], "vae": ["1", 2]}},
        "35": {"class_type": "SaveImage", "inputs": {"images": ["34", 0], "filename_prefix": "trainfree_stack"}},
    })
    return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
