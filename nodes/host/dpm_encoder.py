"""CycleDiffusion's ComfyUI contact: which of ComfyUI's samplers a SAMPLER is (by the function it runs, not by a
version string), the replay of a DPM-Encoder latent as a SAMPLER for SamplerCustomAdvanced, and DPM latents as
files in ComfyUI's folders."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfy.k_diffusion.sampling
import comfy.samplers

from ...guidance_ops import cycle_diffusion as ops
from .files import FileStore
from .sampling_loop import throw_if_interrupted

DPM_SUBFOLDER = "dpm_latents"
_FIELDS = ("sampler", "eta", "s_noise", "flow", "model", "report")


def identify_sampler(sampler):
    """``(name, options)`` of a SAMPLER: the name of ComfyUI's k-diffusion sampler whose function it runs (``None``
    for any other sampler object), and the options it was built with (SamplerEulerAncestral's eta, s_noise)."""
    function = getattr(sampler, "sampler_function", None)
    if not isinstance(sampler, comfy.samplers.KSAMPLER) or function is None:
        return None, {}
    for name in comfy.samplers.KSAMPLER_NAMES:
        if getattr(comfy.k_diffusion.sampling, f"sample_{name}", None) is function:
            return name, dict(sampler.extra_options or {})
    # ComfyUI's other samplers: dpm_fast / dpm_adaptive (closures), uni_pc (its own module); anything else (a
    # custom node's sampler) is unknown
    module = getattr(function, "__module__", "") or ""
    if not module.startswith("comfy."):
        return None, {}
    found = getattr(function, "__name__", "").removeprefix("sample_").removesuffix("_function")
    return ("uni_pc" if "uni_pc" in module else found) or None, dict(sampler.extra_options or {})


def flow_noise_scale(model):
    """The factor ComfyUI's rectified-flow ancestral step puts on its noise besides s_noise (a flow model's
    ``noise_scale`` where this ComfyUI has one, else 1)."""
    return float(getattr(model.get_model_object("model_sampling"), "noise_scale", 1.0))


def replay_sampler(latent, check):
    """A SAMPLER that replays ``latent`` (ops.DPMLatent): ``check(model_patcher, x, sigmas)`` raises when the run
    does not fit it; the run's own noise and latent image are not used (the start is the stored x)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        patcher = model.inner_model.model_patcher
        check(patcher, x, sigmas)
        ones = x.new_ones([x.shape[0]])

        def denoise(x_, sigma):
            return model(x_, sigma * ones, **extra_args)

        def on_step(i, x_, denoised):
            throw_if_interrupted()
            if callback is not None:
                callback({"x": x_, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        with torch.no_grad():
            start, noises = latent.start.to(x), latent.noises.to(x)
            return ops.replay(denoise, start, noises, sigmas, latent.sampler, latent.eta, latent.s_noise,
                              latent.flow, on_step)
    return comfy.samplers.KSAMPLER(sample)


# ---------------------------------------------------------------- files

_STORE = FileStore(DPM_SUBFOLDER, ".safetensors", "DPM latent", "save one with TrainFree Save DPM Latent")
saved_names, file_stamp = _STORE.names, _STORE.stamp


def save(latent, prefix):
    """Write to ComfyUI's output/dpm_latents as ``<prefix>_NNNNN.safetensors``; returns the file name."""
    name, path = _STORE.new_path(prefix)
    tensors = {"start": latent.start, "noises": latent.noises, "sigmas": latent.sigmas}
    meta = {"trainfree_dpm_latent": json.dumps({f: getattr(latent, f) for f in _FIELDS})}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path, metadata=meta)
    return name


def load(name):
    path = _STORE.path(name)
    with safe_open(path, "pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("trainfree_dpm_latent", "null") or "null")
    if meta is None:
        raise ValueError(f"{name} is not a DPM latent saved by this pack (its metadata is missing)")
    tensors = load_file(path)
    return ops.DPMLatent(start=tensors["start"], noises=tensors["noises"], sigmas=tensors["sigmas"], **meta)
