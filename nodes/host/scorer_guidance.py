"""A scorer's gradient with respect to a clean estimate in the sampling space, through the VAE decoder (classifier
guidance on the predicted clean image, EluCD): the estimate is decoded with gradients (``PixelDecoder``, whose VAE
clone hands the decoder ordinary copies of its inference-mode weights), the scorer reads the pixels, and the
gradient comes back to the latent. The diffusion model is never differentiated."""
import torch

from .pixel_loss import PixelDecoder, reload_sampled_models


class ScorerGradient:
    """Per run: ``gradient(denoised, objective) -> (gradient like denoised, objective values [B])`` where
    ``objective(pixels [B, 3, H, W] in 0..1) -> [B]``. Counts the decodes with a backward pass it made."""

    def __init__(self, vae, guider, title):
        self.decoder = PixelDecoder(vae, guider.model_patcher)
        self.guider = guider
        self.title = title
        self.passes = 0

    def gradient(self, denoised, objective):
        if denoised.ndim != 4:
            raise ValueError(f"{self.title} reads images, but these latents have {denoised.ndim - 2} spatial "
                             f"dimensions (a video model): it serves image models only")
        with torch.inference_mode(False), torch.enable_grad():
            latent = denoised.detach().float().clone().requires_grad_(True)
            pixels = self.decoder.decode(latent).movedim(-1, 1)
            # the scorer sees the image clamped to 0..1, as ComfyUI shows it; the gradient passes the clamp as the
            # paper's passes x0's clipping (it differentiates the clipped x0 itself)
            pixels = pixels + (pixels.clamp(0, 1) - pixels).detach()
            values = objective(pixels)
            (gradient,) = torch.autograd.grad(values.sum(), latent)
        self.passes += 1
        reload_sampled_models(self.guider)
        return gradient.detach().to(denoised.dtype), values.detach()
