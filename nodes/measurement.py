"""What a restoration restores from: an observed image and how it was degraded (inpainting under a mask,
super-resolution from a smaller image, denoising at a noise level, colourisation from grey); and a node that
degrades a clean image the same way, to try the restorers on images whose truth is known."""
import torch

from ..guidance_ops import degradations

from .base import check_numbers

CATEGORY = "trainfree/restoration"
MEASUREMENT = "TRAINFREE_MEASUREMENT"
KIND_TOOLTIP = ("How the image was degraded. inpainting: the pixels under the mask are missing. super-resolution: "
                "the image is 'factor' times smaller than the result (block averages). denoising: the image carries "
                "noise of std 'noise_level'. colourisation: only the grey (BT.601 luma) is kept.")


def restorer_inputs():
    """The inputs every restorer takes first: what was observed, and the VAE its measurement goes through."""
    return {
        "measurement": (MEASUREMENT, {"tooltip": "What was observed and how (TrainFree Measurement)."}),
        "vae": ("VAE", {"tooltip": "The model's VAE: the measurement is taken on the decoded image, and its loss "
                                   "is differentiated through the decoder."}),
    }


def check_restorer_inputs(node, measurement, vae):
    if not all(hasattr(measurement, name) for name in ("operator", "observed", "residual", "restored_size")):
        raise ValueError(f"{node}: 'measurement' must come from TrainFree Measurement (got "
                         f"{type(measurement).__name__})")
    if not torch.isfinite(measurement.observed).all():
        raise ValueError(f"{node}: the measurement's observed image contains NaN or infinite values: check the "
                         f"image fed to TrainFree Measurement")
    if vae is None or not hasattr(vae, "first_stage_model"):
        raise ValueError(f"{node}: connect the model's VAE (Load Checkpoint's VAE output or a VAE loader); the "
                         f"measurement is taken on the decoded image")


def _inputs(image_tooltip):
    return {
        "required": {
            "image": ("IMAGE", {"tooltip": image_tooltip}),
            "degradation": (list(degradations.KINDS), {"tooltip": KIND_TOOLTIP}),
            "factor": ("INT", {"default": 4, "min": 2, "max": 16,
                               "tooltip": "super-resolution only: how many times larger the result is per side."}),
            "noise_level": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Std of the noise in the observed image, in 0-1 pixel units (0.1 "
                                                 "is heavy noise). Required above 0 for denoising."}),
        },
        "optional": {
            "mask": ("MASK", {"tooltip": "inpainting only: 1 where the image is missing (to be filled in), the "
                                         "image's size."}),
        },
    }


def _operator(node, degradation, factor, noise_level, image, mask):
    if degradation != "inpainting" and mask is not None:
        raise ValueError(f"{node}: a mask is connected but the degradation is {degradation}; choose inpainting or "
                         f"disconnect the mask")
    if degradation == "denoising" and noise_level <= 0:
        raise ValueError(f"{node}: denoising needs the noise level of the image: enter noise_level above 0")
    if degradation == "inpainting" and mask is not None:
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape[1:]) != tuple(image.shape[1:3]) or mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"{node}: the mask is {tuple(mask.shape[1:])} (x{mask.shape[0]}) but the image is "
                             f"{tuple(image.shape[1:3])} (x{image.shape[0]}): make the mask the image's size, e.g. "
                             f"with a ResizeMask / ImageToMask of that image")
    return degradations.operator(degradation, mask=mask, factor=factor)


class TrainFreeMeasurement:
    DESCRIPTION = ("The observed (degraded) image and how it was degraded, for TrainFree RED-diff and TrainFree "
                   "Steered Diffusion. Also gives the image a restoration starts from (consistent with the "
                   "observation, at the restored size): VAE-encode it for the sampler's latent_image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (MEASUREMENT, "IMAGE")
    RETURN_NAMES = ("measurement", "start_image")
    FUNCTION = "measure"

    @classmethod
    def INPUT_TYPES(cls):
        return _inputs("The observed image: damaged, small, noisy or grey (for inpainting, the image with the "
                       "area to fill in anything).")

    def measure(self, image, degradation, factor, noise_level, mask=None):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        op = _operator(type(self).__name__, degradation, factor, noise_level, image, mask)
        observed = op.forward(image) if degradation in ("inpainting", "colourisation") else image
        measurement = degradations.Measurement(op, observed.float(), float(noise_level))
        height, width = measurement.restored_size()
        if height % 8 or width % 8:
            raise ValueError(f"{type(self).__name__}: the restored image would be {width} x {height}; latent models "
                             f"need multiples of 8: crop or scale the observed image first")
        return measurement, measurement.start()


class TrainFreeDegrade:
    DESCRIPTION = ("Degrades a clean image as TrainFree Measurement describes (mask, block averages, noise, grey), "
                   "to try a restorer on an image whose truth is known. Feed its output to TrainFree Measurement "
                   "with the same settings.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("observed",)
    FUNCTION = "degrade"

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _inputs("The clean image.")
        inputs["required"]["seed"] = ("INT", {"default": 0, "min": 0, "max": 2**63 - 1,
                                              "tooltip": "Seed of the added noise."})
        return inputs

    def degrade(self, image, degradation, factor, noise_level, seed, mask=None):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        op = _operator(type(self).__name__, degradation, factor, noise_level, image, mask)
        if degradation == "super-resolution" and (image.shape[1] % factor or image.shape[2] % factor):
            raise ValueError(f"{type(self).__name__}: the image ({image.shape[2]} x {image.shape[1]}) does not "
                             f"divide into {factor} x {factor} blocks: crop it or choose another factor")
        observed = degradations.degrade(image.float(), op, noise_level, torch.Generator().manual_seed(seed))
        if degradation == "colourisation":
            observed = op.right_inverse(observed)  # a grey RGB image, as a user's greyscale photo is
        return (observed,)


NODE_CLASS_MAPPINGS = {"TrainFreeMeasurement": TrainFreeMeasurement, "TrainFreeDegrade": TrainFreeDegrade}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeMeasurement": "Measurement (TrainFree)",
                              "TrainFreeDegrade": "Degrade Image (TrainFree)"}
