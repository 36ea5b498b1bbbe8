"""Steered Diffusion as a SAMPLER: ComfyUI's guider gives each step's clean estimate, the pack corrects it with a
measurement loss taken on the VAE-decoded image (gradients through the decoder only, never through the diffusion
model) and takes ComfyUI's Euler step with the corrected estimate.

Memory per step: the latent, its clean estimate, and one image's decoder activations kept for the backward pass
(rows are steered one at a time, so the peak does not grow with the batch), plus the image-sized residuals.
"""
import logging
import time

import torch

import comfy.samplers

from ...guidance_ops import steered_diffusion as ops
from .gradients import differentiating
from .pixel_loss import PixelDecoder, reload_sampled_models
from .sampling_loop import throw_if_interrupted

LOG = logging.getLogger("trainfree")


def _check_sizes(title, measurement, vae, x):
    ratio = getattr(vae, "downscale_ratio", 8)
    height, width = measurement.restored_size()
    latent = (x.shape[-2] * ratio, x.shape[-1] * ratio)
    if (height, width) != latent:
        raise ValueError(f"{title}: the latent decodes to {latent[1]} x {latent[0]} pixels but the measurement "
                         f"restores a {width} x {height} image: connect TrainFree Measurement's start_image, "
                         f"VAE-encoded, as the sampler's latent_image")
    batch = measurement.observed.shape[0]
    if batch not in (1, x.shape[0]):
        raise ValueError(f"{title}: the measurement holds {batch} images but the latent {x.shape[0]}: use one "
                         f"observed image, or as many as the latent batch")
    if not torch.isfinite(x).all():
        raise ValueError(f"{title}: the latent contains NaN or infinite values: check the latent_image and noise")


def steered_sampler(measurement, vae, strength, iterations=1, title="TrainFree Steered Diffusion"):
    """A SAMPLER running guidance_ops' steered ``sample``, whose ``steer_estimate(x0, i)`` corrects the clean
    estimate row by row with ``steer(x0, residual_of, strength, iterations)``. The sampler's
    ``trainfree_report`` says what the last run did (numbers only)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        _check_sizes(title, measurement, vae, x)
        patcher = model.inner_model.model_patcher
        decoder = PixelDecoder(vae, patcher)
        observed = measurement.observed
        ones = x.new_ones([x.shape[0]])
        stats = {"steered": 0, "first": None, "started": time.perf_counter()}

        def residual_of(row, clamp=False):
            def residual(latent):
                target = observed[row:row + 1] if observed.shape[0] > 1 else observed[:1]
                pixels = decoder.decode(latent)
                return target.to(latent.device) - measurement.operator.forward(pixels.clamp(0, 1) if clamp else pixels)
            return residual

        def steer_estimate(x0, i):
            if strength == 0:
                return x0
            corrected, first = [], []
            with differentiating(patcher, title):
                for row in range(x0.shape[0]):
                    fixed, residual = ops.steer(x0[row:row + 1], residual_of(row), strength, iterations)
                    corrected.append(fixed)
                    first.append(ops.residual_rms(residual))
            reload_sampled_models(model.inner_model)
            if stats["first"] is None:
                stats["first"] = torch.cat(first).tolist()
            stats["steered"] += 1
            return torch.cat(corrected).to(x0.device, x0.dtype)

        def report(i, x_, denoised):
            if callback is not None:
                callback({"x": x_, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

        with torch.no_grad():
            out = ops.sample(lambda x_, sigma: model(x_, sigma * ones, **extra_args), x, sigmas, steer_estimate,
                             report, throw_if_interrupted)
            final = [ops.residual_rms(residual_of(row, clamp=True)(out[row:row + 1].float())).item()
                     for row in range(x.shape[0])]
        result = {"steps": len(sigmas) - 1, "steps_steered": stats["steered"], "strength": float(strength),
                  "iterations": iterations,
                  "residual_first_estimate": stats["first"], "residual_final": final,
                  "seconds": round(time.perf_counter() - stats["started"], 3)}
        holder.trainfree_report = result
        LOG.info("%s: steered %d of %d steps; measurement residual (RMS, pixels) %s -> %s", title,
                 result["steps_steered"], result["steps"], result["residual_first_estimate"], final)
        return out

    holder = comfy.samplers.KSAMPLER(sample)
    holder.trainfree_report = None
    return holder
