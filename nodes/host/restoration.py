"""Restoration by optimisation (RED-diff) as a SAMPLER for SamplerCustomAdvanced: the latent given to the sampler
is the starting point ``mu``, each sigma of the schedule is one Adam iteration on ``mu``, and the guider's
denoised prediction (every MODEL patch and wrapper acting) is the regulariser's denoiser, evaluated without
gradients. The measurement loss is differentiated through the VAE decoder only (``PixelDecoder``)."""
import logging
from dataclasses import dataclass

import torch

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.samplers

from ...guidance_ops import red_diff
from .family import FAMILY_NAMES, model_family
from .gradients import differentiating
from .pixel_loss import PixelDecoder, reload_sampled_models
from .runs import check_latent
from .samplers import alpha_function

log = logging.getLogger("trainfree")
TITLE = "TrainFree RED-diff"


class RestorationError(ValueError):
    pass


@dataclass
class Settings:
    """What one RED-diff sampler does: Adam's learning rate, the regulariser's lambda and weighting, the
    measurement's weight."""
    learning_rate: float
    strength: float
    observation_weight: float
    weighting: str


def red_diff_sampler(measurement, vae, settings):
    """A KSAMPLER restoring ``measurement`` (a ``degradations.Measurement``) through ``vae``'s decoder. The report
    of its last run is kept on it as ``trainfree_report``."""
    sampler = comfy.samplers.KSAMPLER(None)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        run = _Run(model, measurement, vae, settings, sigmas, extra_args or {})
        try:
            return run.restore(x, callback)
        finally:
            sampler.trainfree_report = run.report()
            log.info("%s: %s", TITLE, sampler.trainfree_report)

    sampler.sampler_function = sample
    sampler.trainfree_report = None
    return sampler


class _Run:
    def __init__(self, model, measurement, vae, settings, sigmas, extra_args):
        self.model, self.measurement, self.settings = model, measurement, settings
        self.sigmas, self.extra = sigmas, extra_args
        self.patcher = model.inner_model.model_patcher
        self.sampling = self.patcher.get_model_object("model_sampling")
        self.alpha = alpha_function(self.sampling)
        self.steps = red_diff.iteration_steps(sigmas)
        self.vae = vae
        self.evaluations = self.iterations = 0
        self.start_rms = self.final_rms = None
        self.peak_bytes = None

    def _check(self, latent):
        check_latent(self.patcher, latent)
        if self.extra.get("denoise_mask") is not None:
            raise RestorationError(f"{TITLE} restores the whole image from its measurement and cannot take a latent "
                                   f"noise mask: connect the latent without SetLatentNoiseMask (for inpainting, "
                                   f"connect the mask to TrainFree Measurement)")
        if float(self.sigmas[-1]) != 0:
            raise RestorationError(f"{TITLE}'s result is the restored latent itself: use sigmas that end at 0 "
                                   f"(BasicScheduler or another scheduler node, not the high part of SplitSigmas)")
        if not self.steps:
            raise RestorationError(f"{TITLE} needs at least one sigma above 0 (one Adam iteration per sigma): use a "
                                   f"schedule with steps")
        height, width = self.measurement.restored_size()
        if tuple(latent.shape[-2:]) != (height // 8, width // 8):
            raise RestorationError(f"the latent is {latent.shape[-1] * 8} x {latent.shape[-2] * 8} px but the "
                                   f"measurement restores a {width} x {height} px image: connect VAE Encode of "
                                   f"TrainFree Measurement's start_image to the sampler's latent_image")
        observed = self.measurement.observed
        if observed.shape[0] not in (1, latent.shape[0]):
            raise RestorationError(f"the measurement holds {observed.shape[0]} images but the latent_image "
                                   f"{latent.shape[0]}: connect VAE Encode of the measurement's start_image (one "
                                   f"latent per observed image)")
        if not torch.isfinite(observed).all():
            raise RestorationError("the observed image of the measurement holds NaN or infinite values: use an "
                                   "image without them in TrainFree Measurement")
        if getattr(self.vae, "latent_channels", latent.shape[1]) != latent.shape[1]:
            raise RestorationError(f"the VAE makes {self.vae.latent_channels}-channel latents but the model works on "
                                   f"{latent.shape[1]}: connect this model's VAE")

    def restore(self, x, callback):
        latent = getattr(self.model, "latent_image", None)
        latent = torch.zeros_like(x) if latent is None else latent
        self._check(latent)
        if not torch.isfinite(latent).all():
            raise RestorationError("the latent_image holds NaN or infinite values: connect VAE Encode of the "
                                   "measurement's start_image")
        settings, device = self.settings, x.device
        decoder = PixelDecoder(self.vae, self.patcher)
        noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=self.extra.get("seed"))
        scale = getattr(self.sampling, "noise_scale", 1.0)
        ones = x.new_ones([x.shape[0]])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start_rms = self._residual_rms(decoder, latent.to(device, torch.float32))
        with differentiating(self.patcher, TITLE):
            mu = latent.detach().to(device, torch.float32).clone().requires_grad_(True)
            adam = torch.optim.Adam([mu], lr=settings.learning_rate, betas=red_diff.ADAM_BETAS)
            for i in self.steps:
                comfy.model_management.throw_exception_if_processing_interrupted()
                sigma = self.sigmas[i]
                eps = noise_sampler(self.sigmas[i], self.sigmas[i + 1]) * scale
                denoised, loss = None, mu.new_zeros(())
                if settings.strength > 0:
                    with torch.inference_mode():  # as ComfyUI's samplers evaluate: no gradient through the denoiser
                        x_t = self.sampling.noise_scaling(sigma.reshape(1), eps, mu.detach())
                        denoised = self.model(x_t, sigma * ones, **self.extra).float()
                    self.evaluations += 1
                    weighted = red_diff.weighted_noise_residual(mu, denoised, float(sigma), self.alpha(sigma),
                                                                settings.strength, settings.weighting)
                    loss = loss + red_diff.regulariser_loss(mu, weighted)
                if settings.observation_weight > 0:
                    residual = self.measurement.residual(decoder.decode(mu))
                    loss = loss + settings.observation_weight * red_diff.observation_loss(residual)
                    self._reload_model()
                adam.zero_grad()
                if loss.requires_grad:
                    loss.backward()
                adam.step()
                self.iterations += 1
                if callback is not None:
                    callback({"x": mu.detach(), "i": i, "sigma": sigma, "sigma_hat": sigma,
                              "denoised": mu.detach() if denoised is None else denoised})
            result = mu.detach().clone()
        self.final_rms = self._residual_rms(decoder, result)
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()
        return result.to(x.dtype)

    def _residual_rms(self, decoder, latent):
        with torch.no_grad():
            # of the image VAE Decode gives (clamped to [0, 1])
            rms = red_diff.rms(self.measurement.residual(decoder.decode(latent).clamp(0, 1)))
        self._reload_model()
        return rms

    def _reload_model(self):
        """The VAE may have pushed the diffusion model off the device to fit: bring it back for the next iteration."""
        reload_sampled_models(self.model.inner_model)

    def report(self):
        family = FAMILY_NAMES.get(model_family(self.patcher), type(self.patcher.model.diffusion_model).__name__)
        s = self.settings
        return {"family": family, "iterations": self.iterations, "planned_iterations": len(self.steps),
                "model_evaluations": self.evaluations, "degradation": self.measurement.operator.kind,
                "noise_level": self.measurement.noise_level, "learning_rate": s.learning_rate,
                "lambda": s.strength, "weighting": s.weighting, "observation_weight": s.observation_weight,
                "start_residual_rms": self.start_rms, "final_residual_rms": self.final_rms,
                "peak_gpu_bytes": self.peak_bytes}
