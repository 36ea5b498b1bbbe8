"""Steered Diffusion (Nair et al., ICCV 2023) as a SAMPLER node: restoration under a TrainFree Measurement."""
from . import host
from .base import check_numbers
from .measurement import CATEGORY, check_restorer_inputs, restorer_inputs


class TrainFreeSteeredDiffusion:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Steered Diffusion (Nair et al., ICCV 2023): restores an image with any text-to-image model by "
                   "correcting each step's clean estimate towards the observation, then taking the ordinary Euler "
                   "(= DDIM) step with it. The correction is a steepest-descent step on the measurement loss "
                   "1/2 ||y - A(decode(x0))||^2 with a line search, the gradient taken through the VAE decoder only "
                   "(one decode forward and backward, one more decode per step; no backward pass through the "
                   "diffusion model). At strength 1 and a linear decoder it is the official code's projection of "
                   "the clean estimate onto the observation. From the paper and its official code: correct the clean "
                   "estimate, then step with it; no gradient through the denoiser for measurements. Ours: the line "
                   "search, the deterministic step (official: eta 1), the iterations without renoising. For "
                   "SamplerCustomAdvanced / SamplerCustom with the "
                   "latent of TrainFree Measurement's start_image (denoise 1, or lower to keep more of it). SD1.5, "
                   "SDXL, SD3, Flux. The run's report (steps steered, measurement residual) is logged.")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **restorer_inputs(),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                                   "Share of the line-search step taken each step. 1 = land on the observation as "
                                   "far as one step can (the paper's projection for linear problems); lower for "
                                   "noisy observations, which full steps would copy; 0 = ordinary Euler sampling."}),
            "iterations": ("INT", {"default": 1, "min": 1, "max": 20, "tooltip":
                                   "Correction steps per sampling step (the paper's repeated steps per timestep; "
                                   "here taken on the clean estimate, without renoising). Each costs one decode "
                                   "forward and backward and one more decode."}),
        }}

    def build(self, measurement, vae, strength, iterations=1):
        node = type(self).__name__
        check_numbers(node, self.INPUT_TYPES(), {"strength": strength, "iterations": iterations})
        check_restorer_inputs(node, measurement, vae)
        return (host.steered_sampler(measurement, vae, float(strength), int(iterations)),)


NODE_CLASS_MAPPINGS = {"TrainFreeSteeredDiffusion": TrainFreeSteeredDiffusion}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeSteeredDiffusion": "Steered Diffusion Sampler (TrainFree)"}
