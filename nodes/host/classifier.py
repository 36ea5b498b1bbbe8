"""The Diffusion Classifier's model evaluations: one sampling run per candidate prompt (ComfyUI prepares each
prompt as it would for sampling: areas, the model's extra inputs, MODEL patches), in which the image is noised to
each (t, eps) pair of a stage and denoised in batches; the error is taken in the model's own output space."""
import torch

from ...guidance_ops import diffusion_classifier as dc
from .cascade import timestep_sigma
from .family import is_flow_model, model_sampling, prediction_space
from .sampling_loop import run_loop


def timestep_sigmas(model, timesteps):
    sampling, flow = model_sampling(model), is_flow_model(model)
    return [timestep_sigma(sampling, t, flow) for t in timesteps]


def denoising_errors(model, candidates, latent, sigmas, noise, batch_size, progress):
    """``{text: [error per pair]}`` for the (sigma, eps) pairs; ``candidates`` maps text -> CONDITIONING;
    ``latent`` is one image's latent [1, C, H, W] as VAEEncode gives it."""
    top = torch.tensor([max(sigmas), 0.0])
    out = {}
    for text, conditioning in candidates.items():
        def body(loop):
            x0 = loop.latent_in(latent)
            errors = []
            for start in range(0, len(sigmas), batch_size):
                rows = torch.tensor(sigmas[start:start + batch_size], device=loop.device)
                eps = noise[start:start + batch_size].to(loop.device, x0.dtype)
                clean = x0.expand(len(rows), *x0.shape[1:])
                x = loop.sampling.noise_scaling(rows.reshape(-1, *([1] * (x0.ndim - 1))), eps, clean)
                denoised = loop.denoise(x, rows, cfg=1.0)
                to_prediction, _ = prediction_space(loop.sampling, rows, x)
                errors += dc.squared_error(to_prediction(denoised), to_prediction(clean)).tolist()
                loop.step_done(len(rows))
            return errors
        out[text] = run_loop(model, conditioning, None, 1.0, latent.shape, top, body, progress=progress)
    return out
