"""Pixels of a latent with gradients: the restorers' measurement is taken on the VAE-decoded image, so its loss
must be differentiated through the decoder (never through the diffusion model unless a restorer asks for that).

ComfyUI loads the VAE under inference mode, so its weights cannot be saved for a backward pass; the decoder is
run through a clone of the VAE's patcher whose layers hand the forward pass ordinary copies of their weights
(``gradients.trainable``, the same weight wrapper the inversion family uses). The stored weights are untouched,
and the next ordinary decode reloads the VAE's own patcher.
"""
import torch

import comfy.model_management

from .gradients import trainable


def reload_sampled_models(guider):
    """A decode inside a sampling run loads the VAE, which may push the diffusion model (and the guider's other
    models) off the device to fit: load them again before the next model evaluation."""
    comfy.model_management.load_models_gpu([guider.model_patcher] + list(getattr(guider, "loaded_models", None) or []))


class PixelDecoder:
    """``decode(x)``: the image (B, H, W, C, about [0, 1], not clamped so that gradients pass) of ``x``, a latent
    in ``model``'s sampling space (as a sampler holds it)."""

    def __init__(self, vae, model):
        self.vae = vae
        self.model = model
        self.patcher = trainable(vae.patcher)

    def decode(self, x):
        vae = self.vae
        comfy.model_management.load_models_gpu([self.patcher])
        latent = self.model.model.process_latent_out(x)
        if getattr(vae, "latent_dim", 2) == 2 and latent.ndim == 5:
            latent = latent[:, :, 0]
        pixels = vae.first_stage_model.decode(latent.to(vae.device, vae.vae_dtype))
        return ((pixels.float() + 1.0) / 2.0).movedim(1, -1).to(x.device)

    def encode(self, image):
        """The latent (in the model's sampling space) of an image B, H, W, C in [0, 1]: ComfyUI's own encode."""
        latent = self.vae.encode(image[..., :3])
        return self.model.model.process_latent_in(latent.to(torch.float32))
