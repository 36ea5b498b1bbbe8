"""Adaptive Projected Guidance as a MODEL -> MODEL patch (any model family, image and video latents)."""
import math
from types import SimpleNamespace

from ..guidance_ops import apg
from . import host
from .base import ModelPatchNode

SDXL = apg.PRESETS["sdxl"]


class TrainFreeAPG(ModelPatchNode):
    DESCRIPTION = ("Adaptive Projected Guidance (Sadat et al., ICLR 2025): CFG with the guidance direction split "
                   "into parts parallel and orthogonal to the conditional prediction, the parallel part (which "
                   "over-saturates) down-weighted, its norm clipped and a reverse momentum, all on the denoised "
                   "predictions. The sampler's cfg is the guidance scale w. Unlike ComfyUI's core APG node, which "
                   "is one guidance unit stronger (its cfg w behaves like our w + 1), this follows the paper exactly.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Any model (SD1.5, SDXL, SD3, Flux, video models)."}),
            "eta": ("FLOAT", {"default": SDXL["eta"], "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Weight of the parallel component. 0 = paper default (least saturation); "
                                         "1 with no clipping and no momentum is plain CFG."}),
            "norm_threshold": ("FLOAT", {"default": SDXL["norm_threshold"], "min": 0.0, "max": 1000.0, "step": 0.5,
                                         "tooltip": "r: clip the guidance's norm (per sample, denoised latent units) "
                                                    "to this. Paper's SDXL value 15; it grows with latent size. "
                                                    "0 = no clipping."}),
            "momentum": ("FLOAT", {"default": SDXL["momentum"], "min": -0.99, "max": 0.99, "step": 0.01,
                                   "tooltip": "beta: reverse momentum over the model evaluations of one run "
                                              "(paper's SDXL value -0.5). 0 = off. Multi-stage samplers evaluate "
                                              "the model several times per step, which changes its effect."}),
        }}

    def patch(self, model, eta, norm_threshold, momentum):
        m = model.clone()
        threshold = math.inf if norm_threshold == 0 else norm_threshold
        # one momentum buffer per latent shape: a cascade (FreCaS) starts each resolution with fresh momentum
        scope = host.RunScope(m, host.new_key("apg"), lambda *_: SimpleNamespace(buffers={}))

        def technique(cond, uncond, scale, sigma, x):
            buffer = None
            if momentum and scope.state is not None:
                buffer = scope.state.buffers.setdefault(tuple(x.shape), apg.MomentumBuffer(momentum))
            return apg.apg(cond, uncond, scale, eta, threshold, buffer)

        host.add_guidance_delta(m, technique, needs_uncond=False)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeAPG": TrainFreeAPG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeAPG": "Adaptive Projected Guidance (TrainFree)"}
