"""Inverting the deterministic sampler: DDIM / flow-ODE inversion, CFG++ inversion and null-text inversion.

All steps work in ComfyUI's sampling space, where ``x = x0 + sigma * eps`` for eps / v models (the variance-
exploding form of DDIM) and ``x = (1 - sigma) x0 + sigma * eps`` for flow models. In both, the first-order step
from ``sigma`` to ``sigma_next`` with a denoised prediction D is

    x_next = D + sigma_next * (x - D) / sigma

which is DDIM for eps models and the Euler step of the flow ODE for flow models. CFG++ (Chung et al., ICLR 2025,
arXiv 2406.08070) takes x0 from the guided prediction and the direction back to x from the unconditional one.

Inversion runs the schedule backwards. DDIM inversion (Song et al.; Mokady et al. 2022, arXiv 2211.09794)
evaluates the model at the current, less noisy latent with the next, noisier sigma and moves along that
prediction; CFG++ inversion swaps the roles of the two predictions (Tweedie with the unconditional noise,
renoising with the guided one). Both are the first iterate of solving ``step(y) = x`` for y; more fixed-point
iterations ``y <- y + (x - step(y))`` make the inversion exact for the sampler that will replay it.
"""
import math
from dataclasses import dataclass, field

import torch

from .interval import cfg as guided_prediction

SAMPLERS = ("euler", "cfg++")


def sample_step(x, sigma, sigma_next, guided, renoise=None):
    """One deterministic step towards lower noise: x0 from ``guided``, the noise direction from ``renoise``
    (the guided prediction itself for DDIM / Euler, the unconditional one for CFG++)."""
    renoise = guided if renoise is None else renoise
    return guided + (x - renoise) * (sigma_next / sigma)


def invert_step(x, sigma, sigma_next, guided, renoise=None, x_eval=None):
    """The explicit inversion step from ``sigma`` up to ``sigma_next``, with predictions made at ``(x_eval,
    sigma_next)``: x0 from ``renoise`` (Tweedie), renoised with the guided noise. DDIM inversion shows the network
    the current latent at the next timestep; in ComfyUI's space that point is ``x_eval`` (``x`` rescaled to the
    next sigma's input scaling; ``x`` itself for flow models)."""
    renoise = guided if renoise is None else renoise
    x_eval = x if x_eval is None else x_eval
    eps_guided = (x_eval - guided) / sigma_next
    eps_renoise = (x_eval - renoise) / sigma_next
    return x - sigma * eps_renoise + sigma_next * eps_guided


def fixed_point_update(y, x, stepped):
    """One iteration towards ``step(y) = x`` (the Jacobian of the step taken as the identity): ``stepped`` is
    the sampler's step applied to the current guess y."""
    return y + (x - stepped)


# ---------------------------------------------------------------- null-text inversion (Mokady et al. 2022)

NTI_GUIDANCE = 7.5
NTI_INNER_STEPS = 10
NTI_LEARNING_RATE = 1e-2
NTI_EARLY_STOP = 1e-5
NTI_EARLY_STOP_SLOPE = 2e-5


def nti_learning_rate(step, steps, base=NTI_LEARNING_RATE):
    """The paper's schedule, lr = 1e-2 * (1 - i / 100) over its 50 steps, stated for any step count as a decay
    to half the base rate at the last step."""
    return base * (1.0 - step / (2.0 * steps))


def nti_threshold(step, base=NTI_EARLY_STOP, slope=NTI_EARLY_STOP_SLOPE):
    """Early stop: the inner loop ends once the step's loss is below 1e-5 + i * 2e-5."""
    return base + step * slope


def optimise_null_embedding(null, predict_uncond, cond, x, sigma, sigma_next, target, scale, steps, lr,
                            threshold, to_loss_space=lambda t: t):
    """The inner loop of pivotal null-text inversion for one step: Adam on the unconditional embedding so that
    one guided DDIM step from ``x`` lands on the pivot ``target``. ``predict_uncond(embedding)`` gives the
    unconditional denoised prediction at (x, sigma) with gradients; ``cond`` is the conditional one (computed
    once). The loss is the mean squared error in the model's input space (``to_loss_space``), the space of the
    paper's latents, so its early-stop threshold keeps its meaning. Returns (embedding, iterations, last loss)."""
    null = null.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([null], lr=lr)
    target = to_loss_space(target)
    loss_value, done = math.inf, 0
    for done in range(1, steps + 1):
        guided = guided_prediction(cond, predict_uncond(null), scale)
        stepped = sample_step(x, sigma, sigma_next, guided)
        loss = torch.nn.functional.mse_loss(to_loss_space(stepped).float(), target.float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss_value = loss.item()
        if loss_value < threshold:
            break
    return null.detach(), done, loss_value


# ---------------------------------------------------------------- proximal guidance (Han et al., WACV 2024)

def proximal_threshold(delta, quantile):
    """ProxEdit's threshold tau: the ``quantile`` of |delta| per sample, shaped to broadcast over ``delta``."""
    flat = delta.flatten(1).abs().float()
    return torch.quantile(flat, quantile, dim=1).to(delta.dtype).view(-1, *[1] * (delta.ndim - 1))


def proximal(delta, tau, kind="l0"):
    """ProxEdit's proximal operator on the guidance difference: entries with |delta| below ``tau`` are zeroed (l0)
    or shrunk towards zero by it (l1); tau at the 0 quantile keeps everything."""
    if kind == "l0":
        return torch.where(delta.abs() >= tau, delta, torch.zeros_like(delta))
    return torch.sign(delta) * torch.clamp(delta.abs() - tau, min=0)


def proximal_mask(delta, tau, dilation=0):
    """Where the edit acts: 1 where |delta| is above ``tau``, grown by ``dilation`` latent pixels (a square max
    filter over the last two axes, as ProxEdit's reference code grows the mask), 0 elsewhere."""
    mask = (delta.abs() > tau).to(delta.dtype)
    if dilation > 0:
        planes = mask.reshape(-1, 1, *mask.shape[-2:])
        planes = torch.nn.functional.max_pool2d(planes, 2 * dilation + 1, stride=1, padding=dilation)
        mask = planes.reshape(mask.shape)
    return mask


# ---------------------------------------------------------------- the inversion object

@dataclass
class Inversion:
    """What an inversion hands to the sampling nodes, all in ComfyUI's sampling space.

    ``pivots[i]`` is the latent at ``sigmas[i]`` (sampling order: ``pivots[0]`` is the noise, ``pivots[-1]`` the
    encoded image); ``null_embeddings[i]``, when present, is the unconditional text embedding of step i (from
    ``sigmas[i]`` to ``sigmas[i + 1]``) found by null-text inversion for guidance ``guidance``. ``source`` and
    ``null_source`` are the prompt and unconditional conditioning tensors the inversion was made with
    (``{"cross": tensor, "pooled": tensor or absent}`` plus numbers in ``source_extra``). ``model`` fingerprints
    the model, so a mismatch is caught before sampling.
    """
    pivots: torch.Tensor
    sigmas: torch.Tensor
    sampler: str
    guidance: float
    model: str
    source: dict
    source_extra: dict = field(default_factory=dict)
    null_embeddings: torch.Tensor = None
    null_source: dict = None
    report: dict = field(default_factory=dict)

    @property
    def noise(self):
        return self.pivots[0]

    @property
    def steps(self):
        return len(self.sigmas) - 1


# ---------------------------------------------------------------- the loops (the model comes in as callables)

def invert(predict, x0, sigmas, iterations=0, on_step=lambda: None, input_scale=lambda sigma: 1.0):
    """Invert the deterministic sampler over the descending schedule ``sigmas`` starting from the clean latent
    ``x0``; ``predict(x, sigma)`` gives ``(guided, renoise)`` denoised predictions for the sampler being inverted;
    ``input_scale(sigma)`` is the factor the network's input gets at sigma. Returns the pivots in sampling order
    (``[0]`` the noise, ``[-1]`` is ``x0``)."""
    ascending = [float(s) for s in sigmas.flip(0)]
    z, pivots = x0, [x0]
    for sigma, sigma_next in zip(ascending[:-1], ascending[1:]):
        x_eval = z * (input_scale(sigma) / input_scale(sigma_next))
        guided, renoise = predict(x_eval, sigma_next)
        y = invert_step(z, sigma, sigma_next, guided, renoise, x_eval)
        for _ in range(iterations):
            guided, renoise = predict(y, sigma_next)
            y = fixed_point_update(y, z, sample_step(y, sigma_next, sigma, guided, renoise))
        z = y
        pivots.append(z)
        on_step()
    return torch.stack(pivots[::-1])


def replay(predict, noise, sigmas, after_step=None, on_step=lambda: None):
    """Sample from ``noise`` down the descending ``sigmas`` with the deterministic sampler; ``predict(x, sigma,
    i)`` gives ``(guided, renoise)``; ``after_step(x, i)`` may adjust the latent after step i."""
    x = noise
    values = [float(s) for s in sigmas]
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        guided, renoise = predict(x, sigma, i)
        x = sample_step(x, sigma, sigma_next, guided, renoise)
        if after_step is not None:
            x = after_step(x, i)
        on_step()
    return x


def null_text_inversion(pivots, sigmas, null, predict_cond, predict_uncond, scale=NTI_GUIDANCE,
                        inner_steps=NTI_INNER_STEPS, lr=NTI_LEARNING_RATE, early_stop=True, loss_scale=None,
                        on_step=lambda: None):
    """Pivotal null-text inversion. ``predict_cond(x, sigma)`` is the conditional denoised prediction (no
    gradient), ``predict_uncond(x, sigma, embedding)`` the unconditional one, differentiable in the embedding
    when gradients are enabled; ``loss_scale(sigma)`` maps a latent at sigma to the model's input scaling.
    Returns (per-step embeddings stacked, report)."""
    values = [float(s) for s in sigmas]
    x, found, iterations, losses = pivots[0], [], [], []
    steps = len(values) - 1
    for i in range(steps):
        sigma, sigma_next = values[i], values[i + 1]
        cond = predict_cond(x, sigma)
        scaling = 1.0 if loss_scale is None else loss_scale(sigma_next)
        null, done, loss = optimise_null_embedding(
            null, lambda e: predict_uncond(x, sigma, e), cond.clone(), x.clone(), sigma, sigma_next,
            pivots[i + 1].clone(), scale, inner_steps, nti_learning_rate(i, steps, lr),
            nti_threshold(i) if early_stop else -math.inf, lambda t: t * scaling)
        found.append(null)
        iterations.append(done)
        losses.append(loss)
        with torch.no_grad():
            uncond = predict_uncond(x, sigma, null)
            x = sample_step(x, sigma, sigma_next, guided_prediction(cond, uncond, scale))
        on_step()
    report = {"inner_iterations": sum(iterations), "max_inner_iterations": inner_steps * steps,
              "final_loss": losses[-1] if losses else 0.0}
    return torch.stack(found), report
