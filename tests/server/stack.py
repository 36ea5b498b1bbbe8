"""An API prompt that stacks every patch of the pack on the reference model, for the server tests; optionally
followed by every inversion node (inversion, null-text, prompt-to-prompt, save / load, sampling, FlowOpt on the
Flux-class model, whose sampler runs through the DiT block cache), a FreCaS cascade on the stacked model, and the
cache schedule nodes (a schedule searched, and one loaded, each sampled through DeepCache), the pack's samplers,
LinearAG (calibrated, then sampled with the calibration), the Diffusion Classifier (on the sampled image),
GFCG steered by each judge, CycleDiffusion (a DPM-Encoder's latent saved, the example workflows' one loaded and
translated), and steering by a scorer (EluCD, tree sampling, beam search, best-of-N).

The patches and their settings come from the server's /object_info (defaults), so a new MODEL -> MODEL node joins
the stack, and the bad-input table, by itself. A second model input (guide, weak model) gets a second copy of the
reference model; a required CLIP the reference model's, a required CONDITIONING the stack's negative prompt.
"""
REFERENCE = {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": "trainfree_digits.safetensors"}}
# Settings other than the defaults, where the default would leave the patch idle in a short run or cost too much.
OVERRIDES = {"TrainFreeResidualCFG": {"mode": "self-negative"},
             "TrainFreeScaleCrafter": {"preset": "generic 4x pixels"}}  # the official tables fit four-level UNets


# Patches kept out of the SD1.5-class stack: the DiT block cache acts in the Flux-class chain.
DIT_PATCHES = ("TrainFreeBlockCache",)
# Patches that need a calibration made for the run's step count: they act in a chain of their own.
CALIBRATED_PATCHES = ("TrainFreeLinearAG",)
# Patches steered by a judge, whose passes multiply a run's cost: they act in the judge chain.
JUDGED_PATCHES = ("TrainFreeGFCG", "TrainFreeDynamicCFG")
# Patches that climb a scorer (they need one, and the VAE): they act in the scorer chain.
SCORED_PATCHES = ("TrainFreeEluCD",)
LOADED_SCHEDULE = "deepcache_sd15_reference_00001.json"  # workflows/input/cache_schedules: 25 steps, branch 0
LOADED_SCHEDULE_STEPS = 25
INVERSION_NODES = ("TrainFreeInvert", "TrainFreeNullTextInversion", "TrainFreePromptToPrompt", "TrainFreeSaveInversion",
                   "TrainFreeLoadInversion", "TrainFreeSampleFromInversion", "TrainFreeFlowOpt")
CACHE_NODES = ("TrainFreeCacheScheduleSearch", "TrainFreeLoadCacheSchedule")
SAMPLER_NODES = ("TrainFreeCFGPPSampler", "TrainFreeMomentumSampler")
LINEAR_AG_NODES = ("TrainFreeLinearAGCalibrate",) + CALIBRATED_PATCHES
CLASSIFIER_NODES = ("TrainFreeDiffusionClassifier",)
JUDGE_NODES = ("TrainFreeDigitOracleJudge", "TrainFreePromptJudge", "TrainFreeCLIPJudge") + JUDGED_PATCHES
RESTORATION_NODES = ("TrainFreeDegrade", "TrainFreeMeasurement", "TrainFreeREDDiff",
                     "TrainFreeSteeredDiffusion")
SCORER_NODES = ("TrainFreeDigitScorer", "TrainFreeJudgeScorer", "TrainFreeDiffusionTreeSampling",
                "TrainFreeLatentBeamSearch", "TrainFreeBestOfN") + SCORED_PATCHES
CYCLE_NODES = ("TrainFreeDPMEncoder", "TrainFreeSaveDPMLatent", "TrainFreeLoadDPMLatent",
               "TrainFreeCycleDiffusionSampler")
LOADED_DPM_LATENT = "trainfree_red_seven_00001.safetensors"  # workflows/input/dpm_latents (cycle_diffusion_sd15)
# the nodes the chains ``inversion=True`` adds hold
CHAIN_NODES = (INVERSION_NODES + ("TrainFreeFreCaS",) + DIT_PATCHES + CACHE_NODES + SAMPLER_NODES + LINEAR_AG_NODES
               + CLASSIFIER_NODES + JUDGE_NODES + RESTORATION_NODES + CYCLE_NODES + SCORER_NODES)
# the decoded images of those chains (and the classifier's chart)
CHAIN_IMAGES = ("87", "88", "79", "65", "56", "57", "38", "39", "34", "26", "105", "131", "138", "148",
                "129", "153", "158", "161", "164")
CHAIN_IMAGE_SLOTS = {"26": 2, "131": 1}  # output slots of those images other than 0: the classifier's chart, the
# measurement's start image


def patch_nodes(object_info):
    """The pack's MODEL -> MODEL nodes for the SD1.5-class stack, in the order the server lists them."""
    return [name for name, info in object_info.items()
            if name.startswith("TrainFree") and list(info["output"]) == ["MODEL"]
            and info["input"]["required"].get("model", [None])[0] == "MODEL"
            and name not in DIT_PATCHES + CALIBRATED_PATCHES + JUDGED_PATCHES + SCORED_PATCHES]


def patch_inputs(object_info, name):
    inputs = {}
    for section in ("required", "optional"):
        for input_name, spec in object_info[name]["input"].get(section, {}).items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if kind == "MODEL":
                inputs[input_name] = ["2", 0]
            elif section == "required" and kind == "CLIP":
                inputs[input_name] = ["1", 1]
            elif section == "required" and kind == "CONDITIONING":
                inputs[input_name] = ["91", 0]  # the stack's negative prompt
            elif isinstance(kind, list):
                inputs[input_name] = options.get("default", kind[0])
            elif "default" in options:
                inputs[input_name] = options["default"]
    return {**inputs, **OVERRIDES.get(name, {})}


def stack_prompt(object_info, patches=None, width=128, height=128, batch=1, steps=6, seed=3, cfg=5.0,
                 caption="a green digit two on a dark background", inversion=False):
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
    if inversion:
        prompt.update(inversion_chain(model, caption, steps))
        prompt.update(flow_chain(object_info, caption, steps))
        prompt.update(cascade_chain(model, steps))
        prompt.update(cache_chain(object_info, caption, steps))
        prompt.update(sampler_chain(object_info, model, steps))
        prompt.update(linear_ag_chain(caption, steps))
        prompt.update(classifier_chain(caption))
        prompt.update(judge_chain(caption, steps, seed))
        prompt.update(restoration_chain())
        prompt.update(cycle_chain(steps))
        prompt.update(scorer_chain(model, caption, seed))
    return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}


def _inverted(scheduler_id, invert_id, model, positive, latent, scheduler, steps, fixed_point_iterations):
    """A schedule and the inversion of ``latent`` on it (guidance 1, the Euler / DDIM step)."""
    return {scheduler_id: {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler,
                                                                      "steps": steps, "denoise": 1.0}},
            invert_id: {"class_type": "TrainFreeInvert", "inputs": {
                "model": model, "positive": positive, "latent": latent, "sigmas": [scheduler_id, 0],
                "sampler": "euler", "guidance": 1.0, "fixed_point_iterations": fixed_point_iterations}}}


def inversion_chain(model, caption, steps):
    """The sampled image inverted, null-text optimised (and saved) and edited with prompt-to-prompt (colour word
    swapped), decoded as node "87"; the example workflows' saved inversion loaded and sampled, decoded as "88"."""
    target = caption.replace(caption.split()[1], "blue" if caption.split()[1] != "blue" else "red", 1)
    return {
        **_inverted("80", "81", model, ["90", 0], ["93", 0], "normal", steps, fixed_point_iterations=1),
        "82": {"class_type": "TrainFreeNullTextInversion", "inputs": {"model": model, "inversion": ["81", 0],
                                                                      "negative": ["91", 0], "cfg": 7.5,
                                                                      "inner_steps": 1, "learning_rate": 0.01,
                                                                      "early_stop": True}},
        "83": {"class_type": "TrainFreePromptToPrompt", "inputs": {
            "model": model, "clip": ["1", 1], "inversion": ["82", 0], "source_text": caption, "target_text": target,
            "edit": "word swap", "cfg": 7.5, "unconditional": "null-text (from the inversion)",
            "cross_replace": 0.8, "self_replace": 0.4, "blend_words": f"{caption.split()[1]}, {target.split()[1]}"}},
        "84": {"class_type": "TrainFreeSaveInversion", "inputs": {"inversion": ["82", 0],
                                                                  "filename_prefix": "trainfree_stack"}},
        "85": {"class_type": "TrainFreeLoadInversion",  # the example workflows' saved inversion
               "inputs": {"inversion_file": "trainfree_red_seven_00001.safetensors"}},
        "86": {"class_type": "TrainFreeSampleFromInversion", "inputs": {
            "model": model, "inversion": ["85", 0], "positive": ["90", 0], "cfg": 7.5,
            "unconditional": "null-text (from the inversion)"}},
        "87": {"class_type": "VAEDecode", "inputs": {"samples": ["83", 0], "vae": ["1", 2]}},
        "88": {"class_type": "VAEDecode", "inputs": {"samples": ["86", 0], "vae": ["1", 2]}},
        "89": {"class_type": "SaveImage", "inputs": {"images": ["87", 0], "filename_prefix": "trainfree_p2p"}},
        "78": {"class_type": "SaveImage", "inputs": {"images": ["88", 0], "filename_prefix": "trainfree_loaded"}},
    }


def cascade_chain(model, steps):
    """FreCaS from 64 to 128 px on the stacked model (every patch acts in both stages), decoded as node "65"."""
    return {
        "60": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "61": {"class_type": "TrainFreeFreCaS", "inputs": {
            "model": model, "sampler": ["60", 0], "width": 128, "height": 128, "batch_size": 1, "base_width": 64,
            "base_height": 64, "stage_steps": f"{max(1, steps - 2)}, 2", "stage_end_timesteps": "200, 0",
            "gamma": 1.5, "fa_cfg": True, "fa_cfg_high": 35.0, "ca_fusion": 0.6,
            "transition": "vae (decode, upsample, encode)", "vae": ["1", 2]}},
        "62": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "63": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["90", 0], "negative": ["91", 0],
                                                     "cfg": 5.0}},
        "64": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["62", 0], "guider": ["63", 0],
                                                                 "sampler": ["61", 0], "sigmas": ["61", 1],
                                                                 "latent_image": ["61", 2]}},
        "65": {"class_type": "VAEDecode", "inputs": {"samples": ["64", 0], "vae": ["1", 2]}},
        "66": {"class_type": "SaveImage", "inputs": {"images": ["65", 0], "filename_prefix": "trainfree_frecas"}},
    }


def flow_chain(object_info, caption, steps):
    """The Flux-class reference model: a sampled image inverted along the flow and edited with FlowOpt, decoded
    as node "79"."""
    model, clip, vae = ["70", 0], ["70", 1], ["70", 2]
    return {
        "70": {"class_type": "TrainFreeReferenceModel", "inputs": {"model_file": "trainfree_digits_flux.safetensors"}},
        "68": {"class_type": "TrainFreeBlockCache", "inputs": {**patch_inputs(object_info, "TrainFreeBlockCache"),
                                                               "model": model}},
        "71": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": clip}},
        "72": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "73": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "74": {"class_type": "KSampler", "inputs": {
            "model": ["68", 0], "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["71", 0], "negative": ["72", 0], "latent_image": ["73", 0],
            "denoise": 1.0}},
        **_inverted("75", "76", model, ["71", 0], ["74", 0], "simple", steps, fixed_point_iterations=0),
        "77": {"class_type": "TrainFreeFlowOpt", "inputs": {"model": model, "inversion": ["76", 0],
                                                            "positive": ["71", 0], "negative": ["72", 0],
                                                            "cfg": 5.0, "n_max": steps, "iterations": 2,
                                                            "eta": 0.0}},
        "79": {"class_type": "VAEDecode", "inputs": {"samples": ["77", 0], "vae": vae}},
        "69": {"class_type": "SaveImage", "inputs": {"images": ["79", 0], "filename_prefix": "trainfree_flowopt"}},
    }


def _cached_sampler(key, deepcache_key, schedule, steps, seed):
    """A 64 px sample of the reference model through DeepCache following ``schedule``."""
    return {
        deepcache_key: {"class_type": "TrainFreeDeepCache", "inputs": {
            "model": ["1", 0], "cache_interval": 3, "schedule": "from schedule input", "start_percent": 0.0,
            "end_percent": 1.0, "cache_branch": 0, "cache_schedule": schedule}},
        key: {"class_type": "KSampler", "inputs": {
            "model": [deepcache_key, 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["90", 0], "negative": ["91", 0], "latent_image": ["55", 0],
            "denoise": 1.0}}}


def cache_chain(object_info, caption, steps):
    """On the reference model (the search needs exactly one cache patch, which the stack may already hold): a
    schedule searched (CacheQuant's dynamic programming on the caption) and sampled through a second DeepCache,
    decoded as node "56"; the example workflows' saved schedule loaded and sampled at its 25 steps, as "57"."""
    return {
        "50": {"class_type": "TrainFreeDeepCache", "inputs": {**patch_inputs(object_info, "TrainFreeDeepCache"),
                                                              "model": ["1", 0]}},
        "51": {"class_type": "TrainFreeCacheScheduleSearch", "inputs": {
            "model": ["50", 0], "clip": ["1", 1], "calibration_prompts": caption, "negative_prompt": "", "seed": 0,
            "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64,
            "method": "dynamic programming (CacheQuant)", "budget": 0.7, "population": 4, "generations": 0,
            "filename_prefix": "trainfree_stack"}},
        "52": {"class_type": "TrainFreeLoadCacheSchedule", "inputs": {"schedule_file": LOADED_SCHEDULE}},
        "55": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        **_cached_sampler("53", "54", ["51", 0], steps, seed=2),
        **_cached_sampler("48", "49", ["52", 0], LOADED_SCHEDULE_STEPS, seed=2),
        "56": {"class_type": "VAEDecode", "inputs": {"samples": ["53", 0], "vae": ["1", 2]}},
        "57": {"class_type": "VAEDecode", "inputs": {"samples": ["48", 0], "vae": ["1", 2]}},
        "58": {"class_type": "SaveImage", "inputs": {"images": ["56", 0], "filename_prefix": "trainfree_searched"}},
        "59": {"class_type": "SaveImage", "inputs": {"images": ["57", 0], "filename_prefix": "trainfree_loaded_cache"}},
    }


def sampler_chain(object_info, model, steps):
    """The pack's samplers on the stacked model through SamplerCustomAdvanced: CFG++ (its guider's cfg is the
    paper's lambda) decoded as node "38", the momentum sampler at CFG 5 as "39"."""
    def sampled(key, sampler_key, guider_key, cfg):
        return {guider_key: {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["90", 0],
                                                                   "negative": ["91", 0], "cfg": cfg}},
                key: {"class_type": "SamplerCustomAdvanced", "inputs": {
                    "noise": ["43", 0], "guider": [guider_key, 0], "sampler": [sampler_key, 0],
                    "sigmas": ["42", 0], "latent_image": ["92", 0]}}}
    return {
        "40": {"class_type": "TrainFreeCFGPPSampler", "inputs": patch_inputs(object_info, "TrainFreeCFGPPSampler")},
        "41": {"class_type": "TrainFreeMomentumSampler",
               "inputs": patch_inputs(object_info, "TrainFreeMomentumSampler")},
        "42": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "normal", "steps": steps,
                                                          "denoise": 1.0}},
        "43": {"class_type": "RandomNoise", "inputs": {"noise_seed": 4}},
        **sampled("45", "40", "44", 0.6),
        **sampled("47", "41", "46", 5.0),
        "38": {"class_type": "VAEDecode", "inputs": {"samples": ["45", 0], "vae": ["1", 2]}},
        "39": {"class_type": "VAEDecode", "inputs": {"samples": ["47", 0], "vae": ["1", 2]}},
        "36": {"class_type": "SaveImage", "inputs": {"images": ["38", 0], "filename_prefix": "trainfree_cfgpp"}},
        "37": {"class_type": "SaveImage", "inputs": {"images": ["39", 0], "filename_prefix": "trainfree_momentum"}},
    }


def linear_ag_chain(caption, steps):
    """LinearAG on the reference model: calibrated on the caption (one run, 64 px) and sampled at the same steps,
    CFG, sampler and scheduler with the calibration from its input, decoded as node "34"."""
    return {
        "30": {"class_type": "TrainFreeLinearAGCalibrate", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "calibration_prompts": caption, "negative_prompt": "",
            "runs_per_prompt": 1, "seed": 0, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "width": 64, "height": 64, "filename_prefix": "trainfree_stack"}},
        "31": {"class_type": "TrainFreeLinearAG", "inputs": {
            "model": ["1", 0], "calibration_file": "(from the calibration input)", "calibration": ["30", 0]}},
        "32": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "33": {"class_type": "KSampler", "inputs": {
            "model": ["31", 0], "seed": 2, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["90", 0], "negative": ["91", 0], "latent_image": ["32", 0],
            "denoise": 1.0}},
        "34": {"class_type": "VAEDecode", "inputs": {"samples": ["33", 0], "vae": ["1", 2]}},
        "35": {"class_type": "SaveImage", "inputs": {"images": ["34", 0], "filename_prefix": "trainfree_linear_ag"}},
    }


def classifier_chain(caption):
    """The Diffusion Classifier on the first sampled image (encoded by its vae input): the caption against another
    colour and another digit, on a tiny plan; its chart saved from node "26"."""
    other_colour = caption.replace(caption.split()[1], "blue" if caption.split()[1] != "blue" else "red", 1)
    other_digit = caption.replace(caption.split()[3], "five" if caption.split()[3] != "five" else "six", 1)
    return {
        "25": {"class_type": "ImageFromBatch", "inputs": {"image": ["94", 0], "batch_index": 0, "length": 1}},
        "26": {"class_type": "TrainFreeDiffusionClassifier", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "candidates": "\n".join([caption, other_colour, other_digit]),
            "timesteps_per_stage": "2, 4", "keep_per_stage": "2, 1", "seed": 0, "batch_size": 4,
            "image": ["25", 0], "vae": ["1", 2]}},
        "27": {"class_type": "SaveImage", "inputs": {"images": ["26", 2], "filename_prefix": "trainfree_classifier"}},
    }


def judge_chain(caption, steps, seed=0):
    """GFCG steered by the digit oracle (reading the VAE-decoded estimates; the ten digits as classes), then by a
    prompt judge (the caption against another digit), then dynamic CFG judged by the oracle and a CLIP judge (an
    untrained stand-in CLIP vision model: the reference models have none), on the reference model; decoded as
    node "105".

    The prompt judge's seed is the run's, so the patched models are built anew in every run, as the stacked
    model is. A patched model that ComfyUI's cache keeps from one run to the next gains a LoadedModel each time a
    sampler loads it (``load_models_gpu`` makes one per call, and its weakref.finalize on a cloned model keeps it
    while the model lives; core nodes do it too): the host's growth, which the leak test would charge to the
    pack."""
    words = caption.split()
    digits = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    classes = [" ".join(words[:3] + [d] + words[4:]) for d in digits]
    rival = classes[5] if words[3] != "five" else classes[6]
    return {
        "100": {"class_type": "TrainFreeDigitOracleJudge", "inputs": {}},
        "101": {"class_type": "TrainFreeGFCG", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "class_prompts": "\n".join(classes), "target_class": words[3],
            "scale": 2.0, "start_percent": 0.0, "end_percent": 1.0, "judge": ["100", 0], "vae": ["1", 2]}},
        "102": {"class_type": "TrainFreePromptJudge", "inputs": {"clip": ["1", 1], "prompts": f"{caption}\n{rival}",
                                                                 "timesteps": 2, "seed": seed}},
        "103": {"class_type": "TrainFreeGFCG", "inputs": {
            "model": ["101", 0], "clip": ["1", 1], "class_prompts": f"{caption}\n{rival}", "target_class": "1",
            "scale": 2.0, "start_percent": 0.0, "end_percent": 1.0, "judge": ["102", 0]}},
        "107": {"class_type": "HarnessReferenceCLIPVision", "inputs": {"family": "sd15"}},
        "108": {"class_type": "TrainFreeCLIPJudge", "inputs": {"clip_vision": ["107", 0], "clip": ["1", 1],
                                                               "prompts": f"{caption}\na blurry image"}},
        "109": {"class_type": "TrainFreeDynamicCFG", "inputs": {
            "model": ["103", 0], "candidate_scales": "1, 5", "judge": ["100", 0], "target": words[3], "weight": 1.0,
            "start_percent": 0.0, "end_percent": 1.0, "judge_2": ["108", 0], "target_2": "1", "weight_2": 0.5,
            "vae": ["1", 2]}},
        "104": {"class_type": "KSampler", "inputs": {
            "model": ["109", 0], "seed": 4, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["90", 0], "negative": ["91", 0], "latent_image": ["92", 0], "denoise": 1.0}},
        "105": {"class_type": "VAEDecode", "inputs": {"samples": ["104", 0], "vae": ["1", 2]}},
        "106": {"class_type": "SaveImage", "inputs": {"images": ["105", 0], "filename_prefix": "trainfree_gfcg"}},
    }


def restoration_chain():
    """The first sampled image degraded (4x smaller) and measured; the measurement's start image is node "131".
    RED-diff restores it on the reference model (3 iterations, the caption at cfg 1, the sampler chain's noise
    "43"), decoded as node "138"."""
    degradation = {"degradation": "super-resolution", "factor": 4, "noise_level": 0.05}
    return {
        "130": {"class_type": "TrainFreeDegrade", "inputs": {"image": ["94", 0], **degradation, "seed": 0}},
        "131": {"class_type": "TrainFreeMeasurement", "inputs": {"image": ["130", 0], **degradation}},
        "132": {"class_type": "SaveImage", "inputs": {"images": ["131", 1], "filename_prefix": "trainfree_measured"}},
        "133": {"class_type": "VAEEncode", "inputs": {"pixels": ["131", 1], "vae": ["1", 2]}},
        "134": {"class_type": "TrainFreeREDDiff", "inputs": {
            "measurement": ["131", 0], "vae": ["1", 2], "learning_rate": 0.5, "lambda": 0.25,
            "observation_weight": 1.0, "weighting": "linear"}},
        "135": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3,
                                                           "denoise": 1.0}},
        "136": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["90", 0],
                                                      "negative": ["91", 0], "cfg": 1.0}},
        "137": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["43", 0], "guider": ["136", 0], "sampler": ["134", 0], "sigmas": ["135", 0],
            "latent_image": ["133", 0]}},
        "138": {"class_type": "VAEDecode", "inputs": {"samples": ["137", 0], "vae": ["1", 2]}},
        "139": {"class_type": "SaveImage", "inputs": {"images": ["138", 0], "filename_prefix": "trainfree_red_diff"}},
        **steered_chain(),
    }


def steered_chain():
    """Steered Diffusion restoring a 64 px image from a 16 px observation (the sampled image 8x smaller), 3 steps,
    decoded as node "148"."""
    degradation = {"degradation": "super-resolution", "noise_level": 0.05}
    return {
        "140": {"class_type": "TrainFreeDegrade", "inputs": {"image": ["94", 0], **degradation, "factor": 8,
                                                             "seed": 0}},
        "141": {"class_type": "TrainFreeMeasurement", "inputs": {"image": ["140", 0], **degradation, "factor": 4}},
        "142": {"class_type": "VAEEncode", "inputs": {"pixels": ["141", 1], "vae": ["1", 2]}},
        "143": {"class_type": "TrainFreeSteeredDiffusion", "inputs": {"measurement": ["141", 0], "vae": ["1", 2],
                                                                      "strength": 0.8, "iterations": 1}},
        "144": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3,
                                                           "denoise": 1.0}},
        "145": {"class_type": "RandomNoise", "inputs": {"noise_seed": 6}},
        "146": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["90", 0], "negative": ["91", 0],
                                                      "cfg": 3.0}},
        "147": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["145", 0], "guider": ["146", 0],
                                                                  "sampler": ["143", 0], "sigmas": ["144", 0],
                                                                  "latent_image": ["142", 0]}},
        "148": {"class_type": "VAEDecode", "inputs": {"samples": ["147", 0], "vae": ["1", 2]}},
        "149": {"class_type": "SaveImage", "inputs": {"images": ["148", 0], "filename_prefix": "trainfree_steered"}},
    }


def cycle_chain(steps):
    """CycleDiffusion on the reference model: the sampled image DPM-encoded with the ancestral sampler (partial
    schedule, source caption) and saved; the example workflows' saved DPM latent (a real red seven) loaded and
    translated to the caption through SamplerCustomAdvanced on its own schedule, decoded as node "129"."""
    return {
        "120": {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}},
        "121": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": steps,
                                                           "denoise": 0.6}},
        "122": {"class_type": "TrainFreeDPMEncoder", "inputs": {
            "model": ["1", 0], "positive": ["90", 0], "cfg": 1.0, "latent": ["93", 0], "sampler": ["120", 0],
            "sigmas": ["121", 0], "seed": 0}},
        "123": {"class_type": "TrainFreeSaveDPMLatent", "inputs": {"dpm_latent": ["122", 0],
                                                                   "filename_prefix": "trainfree_stack"}},
        "124": {"class_type": "TrainFreeLoadDPMLatent", "inputs": {"dpm_latent_file": LOADED_DPM_LATENT}},
        "125": {"class_type": "TrainFreeCycleDiffusionSampler", "inputs": {"dpm_latent": ["124", 0]}},
        "127": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["90", 0],
                                                      "negative": ["91", 0], "cfg": 1.0}},
        "128": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["43", 0], "guider": ["127", 0], "sampler": ["125", 0], "sigmas": ["125", 1],
            "latent_image": ["125", 2]}},
        "129": {"class_type": "VAEDecode", "inputs": {"samples": ["128", 0], "vae": ["1", 2]}},
        "126": {"class_type": "SaveImage", "inputs": {"images": ["129", 0], "filename_prefix": "trainfree_cycle"}},
    }


def scorer_chain(model, caption, seed):
    """Steering by a scorer, 3 steps: EluCD on the stacked model (every patch composed with it) climbing the Digit
    Scorer of the caption (decoded as node "153"); on the reference model, tree sampling (2 paths' budget) and best-of-N (2 paths) with the Digit Scorer, and beam
    search (2 beams, 2 candidates, lookahead 2) with a Judge Scorer of the digit oracle, through SamplerCustomAdvanced
    on the stack's latent (decoded as "158", "161", "164").

    EluCD patches the stacked model, which is built anew in every run: a patched clone of the reference model that
    ComfyUI's cache kept from run to run would gain a LoadedModel each time its sampler ran again (see
    ``judge_chain``), the host's growth, which the leak test would charge to the pack."""
    steps, digit = 3, caption.split()[3]
    search = {"TrainFreeDiffusionTreeSampling": {"scorer": ["150", 0], "budget": 2 * steps, "mode": "search (DTS*)",
                                                 "lambda": 1.0, "max_children": 2},
              "TrainFreeLatentBeamSearch": {"scorer": ["152", 0], "budget": 4 * steps, "beams": 2, "candidates": 2,
                                            "lookahead": 2},
              "TrainFreeBestOfN": {"scorer": ["150", 0], "budget": 2 * steps}}
    prompt = {
        "150": {"class_type": "TrainFreeDigitScorer", "inputs": {"prompt": caption}},
        "151": {"class_type": "TrainFreeDigitOracleJudge", "inputs": {}},
        "152": {"class_type": "TrainFreeJudgeScorer", "inputs": {"judge": ["151", 0], "target": digit}},
        "154": {"class_type": "TrainFreeEluCD", "inputs": {
            "model": model, "scorer": ["150", 0], "vae": ["1", 2], "scale": 0.05, "joint_temperature": 1.0,
            "marginal_temperature": 0.5, "softplus_beta": 3.0, "schedule": "linear decay + sine (EDM)",
            "gamma": 0.3, "start_percent": 0.0, "end_percent": 1.0}},
        "155": {"class_type": "KSampler", "inputs": {
            "model": ["154", 0], "seed": 7, "steps": steps, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["90", 0], "negative": ["91", 0], "latent_image": ["92", 0],
            "denoise": 1.0}},
        "153": {"class_type": "VAEDecode", "inputs": {"samples": ["155", 0], "vae": ["1", 2]}},
        "156": {"class_type": "SaveImage", "inputs": {"images": ["153", 0], "filename_prefix": "trainfree_elucd"}},
        "165": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": steps,
                                                           "denoise": 1.0}},
        "166": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "167": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["90", 0], "negative": ["91", 0],
                                                      "cfg": 3.0}},
    }
    for (node, inputs), (sampler_id, run_id, image_id, save_id) in zip(
            search.items(), [("157", "168", "158", "170"), ("160", "169", "161", "171"),
                             ("163", "172", "164", "173")]):
        prompt.update({
            sampler_id: {"class_type": node, "inputs": {**inputs, "vae": ["1", 2]}},
            run_id: {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["166", 0], "guider": ["167", 0], "sampler": [sampler_id, 0], "sigmas": ["165", 0],
                "latent_image": ["92", 0]}},
            image_id: {"class_type": "VAEDecode", "inputs": {"samples": [run_id, 0], "vae": ["1", 2]}},
            save_id: {"class_type": "SaveImage", "inputs": {"images": [image_id, 0],
                                                            "filename_prefix": "trainfree_search"}},
        })
    return prompt
