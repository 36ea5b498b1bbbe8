"""RED-diff (Mardani et al. 2023) as a SAMPLER node: restoration by variational optimisation of the image under a
TrainFree Measurement, with the guider's model as the denoising regulariser."""
from ..guidance_ops import red_diff
from . import host
from .base import check_numbers
from .measurement import CATEGORY, check_restorer_inputs, restorer_inputs


class TrainFreeREDDiff:
    CATEGORY = CATEGORY
    DESCRIPTION = ("RED-diff (Mardani et al., 2023): restores an image from its measurement (inpainting, "
                   "super-resolution, denoising, colourisation; TrainFree Measurement) by fitting the restored latent "
                   "with Adam, one iteration per sigma of the schedule from high to low: a measurement loss through "
                   "the VAE decoder plus a denoising regulariser from the guider's prediction (no gradient through "
                   "the model). For SamplerCustomAdvanced: latent_image = VAE Encode of the measurement's "
                   "start_image (the starting point), sigmas = one iteration each (the paper: 100), the noise seed "
                   "draws each iteration's noise. The guider's prompt and cfg shape the regulariser (the official "
                   "code is unconditional: cfg 1 with an empty or generic prompt is closest). SD1.5, SDXL, SD3, "
                   "Flux.")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **restorer_inputs(),
            "learning_rate": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                                        "Adam's step size on the latent (the official README: 0.5 for 100 "
                                        "iterations). 0 leaves the start latent as it is."}),
            "lambda": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                                  "The paper's lambda: weight of the denoising regulariser (0.25 in the official "
                                  "README). 0: the measurement alone, no model evaluations. Raise it for noisy "
                                  "measurements (noise_level does not weigh the loss, as in the official code)."}),
            "observation_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                                             "Weight of the measurement loss mean((y - A(x))^2) / 2, pixels in "
                                             "[-1, 1] as the official code (1.0 there). 0: the regulariser alone."}),
            "weighting": (list(red_diff.WEIGHTINGS), {"tooltip":
                                                      "How the regulariser's weight follows the noise level s = "
                                                      "sigma / alpha: linear (w = lambda s, the official default), "
                                                      "sqrt, log (log(1 + s)), trunc_linear (min(s, 1)), const."}),
        }}

    def build(self, measurement, vae, learning_rate, observation_weight, weighting, **inputs):
        node = type(self).__name__
        strength = inputs.get("lambda")  # the paper's name, a Python keyword
        check_numbers(node, self.INPUT_TYPES(), {"learning_rate": learning_rate, "lambda": strength,
                                                 "observation_weight": observation_weight})
        if strength is None:
            raise ValueError(f"{node}: input 'lambda' is missing; enter the regulariser's weight (default 0.25)")
        check_restorer_inputs(node, measurement, vae)
        if weighting not in red_diff.WEIGHTINGS:
            raise ValueError(f"{node}: unknown weighting {weighting!r}: choose one of {', '.join(red_diff.WEIGHTINGS)}")
        settings = host.RedDiffSettings(learning_rate, strength, observation_weight, weighting)
        return (host.red_diff_sampler(measurement, vae, settings),)


NODE_CLASS_MAPPINGS = {"TrainFreeREDDiff": TrainFreeREDDiff}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeREDDiff": "RED-diff Restoration Sampler (TrainFree)"}
