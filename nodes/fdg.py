"""Frequency-Decoupled Guidance as a MODEL -> MODEL patch (any model family, image and video latents)."""
from ..guidance_ops import fdg
from . import host
from .base import ModelPatchNode

LOW, HIGH = fdg.PRESETS["sdxl"]


class TrainFreeFDG(ModelPatchNode):
    DESCRIPTION = ("Frequency-Decoupled Guidance (Sadat et al. 2025): CFG applied separately to the low- and "
                   "high-frequency bands of a Laplacian pyramid of the denoised predictions, with a low scale for "
                   "the low band (colour, saturation, diversity) and a higher one for detail. Its two scales "
                   "replace the sampler's cfg; the unconditional pass always runs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Any model (SD1.5, SDXL, SD3, Flux, video models)."}),
            "low_scale": ("FLOAT", {"default": LOW, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Guidance scale of the low-frequency band. Paper (Table 8): SDXL 5, "
                                               "SD2.1 / SD3 3."}),
            "high_scale": ("FLOAT", {"default": HIGH, "min": 0.0, "max": 100.0, "step": 0.1,
                                     "tooltip": "Guidance scale of the high-frequency bands. Paper (Table 8): "
                                                "SDXL 10, SD2.1 / SD3 7; up to 12 at low CFG. Keep it >= low_scale."}),
            "levels": ("INT", {"default": fdg.DEFAULT_LEVELS, "min": 2, "max": 6,
                               "tooltip": "Pyramid levels: 2 (paper default) = one detail band at full resolution "
                                          "and one low band at half resolution."}),
            "low_parallel_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "FDG + APG: weight of the guidance part parallel to the "
                                                         "conditional prediction in the low band. 1 = plain FDG."}),
            "high_parallel_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                               "tooltip": "The same for the high bands. 1 = plain FDG."}),
        }}

    def patch(self, model, low_scale, high_scale, levels, low_parallel_weight, high_parallel_weight):
        m = model.clone()

        def technique(cond, uncond, scale, sigma, x):
            return fdg.fdg(cond, uncond, low_scale, high_scale, levels, low_parallel_weight, high_parallel_weight)

        host.add_guidance_delta(m, technique, needs_uncond=True)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeFDG": TrainFreeFDG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeFDG": "Frequency-Decoupled Guidance (TrainFree)"}
