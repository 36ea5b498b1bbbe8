"""CycleDiffusion (Wu and De la Torre 2022): the DPM-Encoder turns an image into a stochastic sampler's latent,
and a sampler replays that latent with another prompt (zero-shot image translation); DPM latents as files."""
import logging

import torch

from ..guidance_ops import cycle_diffusion as ops
from . import host
from .base import check_numbers
from .inversion import _check_schedule

log = logging.getLogger("trainfree")
DPM_LATENT = "TRAINFREE_DPM_LATENT"
CATEGORY = "trainfree/inversion"


def dpm_latent_input(tooltip="A DPM latent from TrainFree DPM-Encoder or TrainFree Load DPM Latent."):
    return (DPM_LATENT, {"tooltip": tooltip})


def check_model(latent, found):
    if found.split("|")[:3] != latent.model.split("|")[:3]:
        raise ValueError(f"this DPM latent was encoded with another kind of model ({latent.model.split('|')[0]}, "
                         f"{latent.model.split('|')[1]}) than the one sampling ({found.split('|')[0]}, "
                         f"{found.split('|')[1]}): sample with the model it was encoded with, or encode again")
    if found != latent.model:
        raise ValueError("this DPM latent was encoded with another checkpoint of the same family (the weights "
                         "differ): sample with the model it was encoded with, or encode the image again with this one")


def check_sigmas(latent, sigmas):
    stored = latent.sigmas.float()
    given = sigmas.detach().float().cpu()
    if given.shape != stored.shape or not torch.allclose(given, stored, rtol=1e-5, atol=1e-6):
        raise ValueError(f"the sigmas differ from the ones the DPM latent was encoded on ({len(stored) - 1} steps "
                         f"from {float(stored[0]):.4g} to {float(stored[-1]):.4g}; these: {len(given) - 1} steps from "
                         f"{float(given[0]):.4g} to {float(given[-1]):.4g}): connect the same scheduler settings "
                         f"(steps, denoise, split) that fed TrainFree DPM-Encoder")


def check_shape(latent, shape):
    if tuple(shape) != tuple(latent.start.shape):
        raise ValueError(f"the latent image is {list(shape)} but the DPM latent was encoded from "
                         f"{list(latent.start.shape)} (batch, channels, size): connect a latent of that shape (the "
                         f"encoded image's own latent, or an empty latent of its size and batch)")


class TrainFreeDPMEncoder:
    DESCRIPTION = ("CycleDiffusion's DPM-Encoder (Wu and De la Torre 2022): finds the latent of a stochastic sampler "
                   "(the noisy start and every step's noise) that samples back to this image with this prompt. Replay "
                   "it with TrainFree CycleDiffusion Sampler and a new prompt to translate the image ('a red digit' "
                   "-> 'a blue digit'). Supported samplers: euler_ancestral (eps / v models and flow models, any eta "
                   "and s_noise above 0) and ddpm. Strength = how much of the schedule is encoded: BasicScheduler's "
                   "denoise below 1 or SplitSigmas (the paper encodes up to t_0 < T).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DPM_LATENT, "STRING")
    RETURN_NAMES = ("dpm_latent", "report")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the translation will sample with."}),
            "positive": ("CONDITIONING", {"tooltip": "The source prompt: a caption of the input image ('a red "
                                                     "digit seven on a dark background'). Sampling will use the "
                                                     "target prompt instead."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "The CFG scale of the encoding passes (the paper encodes and translates at "
                                         "the same scale); above 1 needs a negative prompt."}),
            "latent": ("LATENT", {"tooltip": "The image to encode, encoded with this model's VAE (VAE Encode)."}),
            "sampler": ("SAMPLER", {"tooltip": "A stochastic sampler: euler_ancestral or ddpm from KSamplerSelect, "
                                               "or SamplerEulerAncestral (eta, s_noise). Sample with the same one's "
                                               "settings; deterministic samplers are refused."}),
            "sigmas": ("SIGMAS", {"tooltip": "The schedule the translation will use. A partial schedule sets the "
                                             "strength (BasicScheduler denoise 0.5-0.8, or SplitSigmas' low half)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Seed of the forward-process draws (the encoding is random: another seed "
                                        "gives another latent of the same image)."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "The unconditional prompt; needed for cfg other than 1 (the "
                                                     "same one as sampling uses)."}),
        }}

    def encode(self, model, positive, cfg, latent, sampler, sigmas, seed, negative=None):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), {"cfg": cfg, "seed": seed})
        name, options = host.identify_sampler(sampler)
        kind, eta, s_noise = ops.sampler_kind(name, options)
        samples = latent["samples"]
        host.check_latent(model, samples)
        _check_schedule(sigmas)
        if cfg != 1.0 and negative is None:
            raise ValueError(f"cfg {cfg} uses the unconditional prediction: connect a negative prompt (an empty "
                             f"CLIPTextEncode), or set cfg to 1")
        flow = host.is_flow_model(model)
        if flow and kind == ops.EULER_ANCESTRAL:
            s_noise *= host.flow_noise_scale(model)
        generator = torch.Generator().manual_seed(seed)

        def body(loop):
            x0 = loop.latent_in(samples)

            def draw():
                return torch.randn(x0.shape, generator=generator).to(x0)
            start, noises, trajectory = ops.encode(lambda x, sigma: loop.denoise(x, sigma), x0, loop.sigmas, kind,
                                                   eta, s_noise, flow, draw, loop.step_done)
            return start.cpu(), noises.cpu(), ops.relative_error(trajectory[-1], x0)

        start, noises, error = host.run_loop(model, positive, negative, cfg, samples.shape, sigmas, body, seed=seed)
        summary = (f"DPM-Encoder: {kind} (eta {eta:g}, s_noise {s_noise:g}), {len(sigmas) - 1} steps from sigma "
                   f"{float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}; ")
        if float(sigmas[-1]) == 0:
            summary += f"replaying with the source prompt ends {error:.3g} (relative RMS) from the image's latent"
        else:
            summary += "the schedule stops above sigma 0, so the replay ends on a noisy latent"
        log.info("TrainFree %s", summary)
        result = ops.DPMLatent(start=start.float(), noises=noises.float(), sigmas=sigmas.detach().float().cpu(),
                               sampler=kind, eta=eta, s_noise=s_noise, flow=flow, model=host.fingerprint(model),
                               report={"reconstruction_error": error, "cfg": float(cfg)})
        return {"ui": {"text": [summary]}, "result": (result, summary)}


class TrainFreeCycleDiffusionSampler:
    DESCRIPTION = ("Replays a DPM latent (TrainFree DPM-Encoder) as a SAMPLER for SamplerCustomAdvanced: the "
                   "encoded sampler's steps from the stored noisy start with the stored noises. With the source "
                   "prompt it reconstructs the image; with a target prompt (CFGGuider) it translates it "
                   "(CycleDiffusion). Connect its sigmas and latent outputs too: the sigmas must be the encoded "
                   "ones and the latent image of the encoded shape (its values and the run's noise are not used).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER", "SIGMAS", "LATENT")
    RETURN_NAMES = ("sampler", "sigmas", "latent")
    OUTPUT_TOOLTIPS = ("The replay, for SamplerCustomAdvanced's sampler input.",
                       "The encoded schedule, for SamplerCustomAdvanced's sigmas input.",
                       "An empty latent of the encoded shape, for SamplerCustomAdvanced's latent_image input.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dpm_latent": dpm_latent_input()}}

    def build(self, dpm_latent):
        def check(model, x, sigmas):
            check_model(dpm_latent, host.fingerprint(model))
            check_sigmas(dpm_latent, sigmas)
            check_shape(dpm_latent, x.shape)
        empty = {"samples": torch.zeros(dpm_latent.start.shape)}
        return (host.replay_sampler(dpm_latent, check), dpm_latent.sigmas.clone(), empty)


class TrainFreeSaveDPMLatent:
    DESCRIPTION = ("Saves a DPM latent (noisy start, per-step noises, schedule, sampler settings, model "
                   "fingerprint) as a safetensors file in ComfyUI's output/dpm_latents folder.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dpm_latent": dpm_latent_input("The DPM latent to keep."),
            "filename_prefix": ("STRING", {"default": "trainfree_dpm_latent",
                                           "tooltip": "File name start; a 5-digit counter and .safetensors are added. "
                                                      "A plain name: the file always goes to output/dpm_latents."}),
        }}

    def save(self, dpm_latent, filename_prefix):
        name = host.save_dpm_latent(dpm_latent, filename_prefix)
        return {"ui": {"text": [f"{host.DPM_SUBFOLDER}/{name}"]}}


class TrainFreeLoadDPMLatent:
    DESCRIPTION = ("Loads a DPM latent saved by TrainFree Save DPM Latent from ComfyUI's output/dpm_latents or "
                   "input/dpm_latents folder. Sampling from it checks that the model is the one it was encoded with.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DPM_LATENT,)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dpm_latent_file": (host.saved_dpm_latents() or ["(none saved yet)"],
                                {"tooltip": "A DPM latent file in output/dpm_latents or input/dpm_latents."}),
        }}

    @classmethod
    def IS_CHANGED(cls, dpm_latent_file):
        return host.dpm_latent_file_stamp(dpm_latent_file)

    def load(self, dpm_latent_file):
        return (host.load_dpm_latent(dpm_latent_file),)


NODE_CLASS_MAPPINGS = {"TrainFreeDPMEncoder": TrainFreeDPMEncoder,
                       "TrainFreeCycleDiffusionSampler": TrainFreeCycleDiffusionSampler,
                       "TrainFreeSaveDPMLatent": TrainFreeSaveDPMLatent,
                       "TrainFreeLoadDPMLatent": TrainFreeLoadDPMLatent}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeDPMEncoder": "DPM-Encoder (CycleDiffusion) (TrainFree)",
                              "TrainFreeCycleDiffusionSampler": "CycleDiffusion Sampler (TrainFree)",
                              "TrainFreeSaveDPMLatent": "Save DPM Latent (TrainFree)",
                              "TrainFreeLoadDPMLatent": "Load DPM Latent (TrainFree)"}
