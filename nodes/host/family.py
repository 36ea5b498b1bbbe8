"""Which model a patch is given: its family, its attention sites, its sampling (sigma, timestep, prediction
space)."""
import torch

import comfy.model_base
import comfy.model_sampling
import comfy.supported_models
from comfy.ldm.flux.model import Flux as FluxTransformer
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.wan.model import WanModel

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "unet": "a UNet model", "sd3": "SD3", "flux": "Flux",
                "wan": "Wan (video)"}
UNET_FAMILIES = ("sd15", "sdxl", "unet")
DIT_FAMILIES = ("sd3", "flux")


class UnsupportedModel(ValueError):
    pass


# Module patches (object patches) of a model whose weights another loaded model shares can be taken off mid-run:
# ComfyUI keeps one model's object patches on shared weights.
SHARED_WEIGHTS = ("{title} found its module patches taken off the loaded model: another model sharing these weights "
                  "was loaded alongside it (a guide or second model from the same checkpoint, as two-model guidance "
                  "may use), and ComfyUI keeps one model's module patches on shared weights. Load that other model "
                  "from its own loader node.")


def model_family(model):
    """'sd15', 'sdxl', 'unet' (other openaimodel UNets), 'sd3', 'flux', 'wan' (Wan 2.1 / 2.2 video) or None."""
    net = model.model.diffusion_model
    if isinstance(net, UNetModel):
        if isinstance(model.model, comfy.model_base.SDXL):
            return "sdxl"
        if isinstance(model.model.model_config, comfy.supported_models.SD15):
            return "sd15"
        return "unet"
    if isinstance(net, FluxTransformer):
        return "flux"
    if isinstance(net, OpenAISignatureMMDITWrapper):
        return "sd3"
    if isinstance(net, WanModel):
        return "wan"
    return None


def same_family(model, other):
    """Whether two models share family, latent space and sampling type, so one's prediction may stand in for
    the other's (two models of an unknown family count as one only when their latent formats match)."""
    return (model_family(model) == model_family(other) and is_flow_model(model) == is_flow_model(other)
            and type(model.model.latent_format) is type(other.model.latent_format))


def require_same_family(model, other, input_name):
    """Refuse a second model (``input_name``) whose predictions cannot stand in for the first model's."""
    if not same_family(model, other):
        names = [FAMILY_NAMES.get(model_family(m), type(m.model.diffusion_model).__name__) for m in (model, other)]
        raise UnsupportedModel(f"input '{input_name}' holds a model of another kind ({names[1]}) than 'model' "
                               f"({names[0]}): connect a {input_name} of the same family, latent space and "
                               f"sampling type")


def require_family(model, node_title, families):
    family = model_family(model)
    if family not in families:
        kind = type(model.model.diffusion_model).__name__
        served = ", ".join(FAMILY_NAMES[f] for f in families)
        raise UnsupportedModel(f"{node_title} cannot serve this model ({kind}); it serves {served}. "
                               f"Connect a model of one of those families, or leave this node out.")
    return family


def attention_layers(model):
    """``{(kind, block): transformer count}`` for every self-attention site the pack can perturb."""
    net = model.model.diffusion_model
    if isinstance(net, UNetModel):
        found = {}
        groups = [("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks)]
        for kind, blocks in groups:
            for i, block in enumerate(blocks):
                for layer in block:
                    if isinstance(layer, SpatialTransformer):
                        found[(kind, i)] = len(layer.transformer_blocks)
        return found
    if isinstance(net, FluxTransformer):
        return {**{("double", i): 1 for i in range(len(net.double_blocks))},
                **{("single", i): 1 for i in range(len(net.single_blocks))}}
    if isinstance(net, OpenAISignatureMMDITWrapper):
        return {("double", i): 1 for i in range(len(net.joint_blocks))}
    return {}


def latent_channels(model):
    return model.model.latent_format.latent_channels


def model_sampling(model):
    return model.get_model_object("model_sampling")


def percent_to_sigma(model, percent):
    return float(model_sampling(model).percent_to_sigma(percent))


def sigma_window(model, start_percent, end_percent):
    """``(sigma_start, sigma_end)`` of a patch's window given as points of the schedule (0 = first step)."""
    return percent_to_sigma(model, start_percent), percent_to_sigma(model, end_percent)


def sigma_to_timestep(model, sigma):
    """A timestep on the 0..1000 scale the papers use: the discrete timestep for SD models, t * 1000 for flow
    models (whose sigma is t; Flux's own model_sampling reports t in 0..1, SD3's t * 1000)."""
    if is_flow_model(model):
        return float(torch.as_tensor(sigma).flatten()[0]) * 1000.0
    return float(model_sampling(model).timestep(sigma).flatten()[0])


def prediction_space(sampling, sigma, x):
    """``(to_prediction, to_denoised)``: maps between a denoised prediction and the model's own output space at
    ``sigma`` for input ``x`` (eps for eps models, v for v-prediction, the velocity for flow models), so that
    what the papers compute on the network's output can be. ComfyUI's ``calculate_denoised`` is affine in the
    model output, so its value at 0 and at 1 give the map exactly, for every model_sampling type."""
    zero = sampling.calculate_denoised(sigma, torch.zeros_like(x), x)
    slope = sampling.calculate_denoised(sigma, torch.ones_like(x), x) - zero
    return (lambda denoised: (denoised - zero) / slope), (lambda prediction: zero + slope * prediction)


def is_flow_model(model):
    """True for rectified-flow models (SD3, Flux): x = (1 - sigma) x0 + sigma eps in ComfyUI's space."""
    import comfy.model_sampling
    return isinstance(model_sampling(model), comfy.model_sampling.CONST)
