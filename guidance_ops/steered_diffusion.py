"""Steered Diffusion (Nair, Cherian, Lohit, Wang, Koike-Akino, Patel, Marks, ICCV 2023, arXiv 2310.00224; official
code github.com/merlresearch/SteeredDiffusion): plug-and-play restoration by correcting the sampler's clean
estimate at every step with a loss that measures how far it is from the observation.

From the paper's text (only its abstract and Figure 2's caption were readable here): the loss is taken on the
model's implicit prediction of the clean image x0 (not on the noisy latent, as earlier plug-and-play guidance),
an inner loop may repeat the correction N times per timestep, and the extra cost is negligible.

From the official code (``conditional_sample`` in its gaussian_diffusion.py):

- each step predicts the clean image x0_hat(x_t), corrects it to x0', then takes the sampler's step from x_t with
  x0' in place of x0_hat (the noise direction re-derived from x0', DDIM's eps = (x_t - sqrt(a) x0') / sqrt(1 - a));
- for the linear inverse problems (inpainting, super-resolution, colourisation) the correction is a projection of
  the clean estimate onto the observation, x0' = x0_hat + A^+(y - A x0_hat), with no gradient through the
  denoiser (hence "negligible additional computational cost");
- for losses of other networks (face parsing, identity, text) it is a gradient step x0' = x0_hat - s_t grad, with
  the gradient taken w.r.t. x_t through the denoiser and s_t = sqrt(1 - alpha_bar_{t+1}) times the loss weight;
- its inner loop is set to one pass (its renoising between passes is then unused); DDIM with eta = 1.

This module states the linear case for latent models, where the image is the VAE decoding D of the latent and
the projection cannot be written down: the correction is a steepest-descent step on the measurement loss
L(x0) = 1/2 ||y - A(D(x0))||^2 of the clean estimate, x0' = x0_hat - strength * tau * grad L(x0_hat), where tau
minimises the loss linearised along the gradient (an exact line search for a linear decoder). With an identity
decoder and strength 1 this step IS the official projection for inpainting and super-resolution (A A^T is a
multiple of the identity there, so the steepest-descent step lands on the observation), and the Moore-Penrose
projection for colourisation (the official code swaps the luma of YCbCr, an oblique projection). Our choices:
the line search (the decoder is not linear, and its Jacobian's scale differs between VAEs, so a fixed step
would need tuning per model), the deterministic first-order step (so that strength 0 is ComfyUI's Euler / DDIM
sampler exactly), the gradient only through the decoder (no backward pass through the diffusion model; the
official code's through-the-denoiser path belongs to its network losses, not to measurements), and the inner
loop as repeated descent steps on the clean estimate without renoising (``iterations``).
"""
import torch


def euler_step(x, sigma, sigma_next, denoised):
    """ComfyUI's Euler step (DDIM on eps models, the flow ODE's Euler step on flow models), written as ComfyUI's
    sampler computes it so that an unsteered run is its run bit for bit."""
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


def rows(t):
    """Sum over everything but the batch dimension, kept broadcastable."""
    return t.flatten(1).sum(1)


def measurement_loss(residual):
    """1/2 ||y - A(x)||^2 per sample."""
    return 0.5 * rows(residual.to(torch.promote_types(residual.dtype, torch.float32)) ** 2)


def residual_rms(residual):
    """The root-mean-square per sample (of a residual: in pixel units)."""
    return rows(residual.float() ** 2).div(residual[0].numel()).sqrt()


def line_search(residual, residual_ahead, probe):
    """The step along a direction d that minimises ||r0 - tau q||^2, where q = (r0 - r(probe)) / probe estimates
    A J d (the residual's change per unit step): tau = <r0, q> / ||q||^2 per sample, never negative (0 where the
    residual does not change along d)."""
    change = (residual - residual_ahead) / probe.reshape(-1, *[1] * (residual.ndim - 1))
    along = rows(residual * change)
    size = rows(change ** 2)
    tau = torch.where(size > 0, along / size.clamp_min(torch.finfo(size.dtype).tiny), torch.zeros_like(size))
    return tau.clamp_min(0)


def probe_size(x, direction, relative=1e-2):
    """A small step along ``direction``: ``relative`` times the estimate's RMS, in units of the direction's RMS,
    per sample (0 where the direction vanishes)."""
    scale, length = residual_rms(x).clamp_min(1e-3), residual_rms(direction)
    return torch.where(length > 0, relative * scale / length.clamp_min(1e-30), torch.zeros_like(length))


def steer(x0, residual_of, strength, iterations=1):
    """The corrected clean estimate and the residual of the uncorrected one: ``iterations`` steepest-descent steps
    with line search on 1/2 ||residual_of(x)||^2 from x0. ``residual_of(x)`` is y - A(D(x)), differentiable in
    ``x``; call with gradients possible (this enables them). Returns (x0', residual at x0_hat)."""
    estimate = x0.detach().to(torch.promote_types(x0.dtype, torch.float32))
    first = None
    for _ in range(iterations):
        estimate, residual = _descend(estimate, residual_of, strength)
        first = residual if first is None else first
    return estimate.to(x0.dtype), first


def _descend(x, residual_of, strength):
    estimate = x.clone().requires_grad_(True)
    with torch.enable_grad():
        residual = residual_of(estimate)
        gradient, = torch.autograd.grad(measurement_loss(residual).sum(), estimate)
    residual, estimate = residual.detach(), estimate.detach()
    direction = -gradient
    probe = probe_size(estimate, direction)
    shape = (-1, *[1] * (x.ndim - 1))
    with torch.no_grad():
        ahead = residual_of(estimate + probe.reshape(shape) * direction)
        tau = line_search(residual, ahead, torch.where(probe > 0, probe, torch.ones_like(probe)))
        tau = torch.where(probe > 0, tau, torch.zeros_like(tau))
        return estimate + (strength * tau).reshape(shape) * direction, residual


def sample(denoise, x, sigmas, steer_estimate, callback=None, step_done=None):
    """Steered sampling over ``sigmas``: ``denoise(x, sigma)`` is the sampler's clean estimate, ``steer_estimate
    (x0, i)`` returns the corrected one (or x0 itself where a step is not steered). ``callback(i, x, x0)`` sees
    each step's corrected estimate; ``step_done()`` runs after each step."""
    for i in range(len(sigmas) - 1):
        denoised = steer_estimate(denoise(x, sigmas[i]), i)
        if callback is not None:
            callback(i, x, denoised)
        x = euler_step(x, sigmas[i], sigmas[i + 1], denoised)
        if step_done is not None:
            step_done()
    return x
