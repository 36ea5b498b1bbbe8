"""Perturbed-Attention Guidance (Ahn et al., ECCV 2024, arXiv 2403.17377).

Perturbed self-attention (PSA) replaces the attention map of the chosen self-attention layers by the identity,
so each token attends only to itself and the layer returns its value projection (the output projection still
runs afterwards). On the joint text + image attention of SD3 / Flux, diffusers makes only the image-to-image
block of the map the identity (``keep_text_mask``), so the perturbed layer still reads the prompt. Guidance
then pushes away from the prediction made with PSA (paper eq. 11, in the form used together with CFG by
diffusers and ComfyUI):

    D = D_cfg + s_t * (D_c - D_perturbed)

The combination is linear, so it is the same in x0, eps or v space; guidance rescale is not, and works on the
noise prediction as in the paper that introduced it.
"""
import torch


def identity_attention(v):
    """PSA: the attention map is the identity, so the attention output is the value itself."""
    return v


def keep_text_mask(text, dtype=torch.float32, device=None):
    """PSA on joint text + image attention as diffusers' PAGJointAttnProcessor2_0 does it: an additive mask over
    a sequence of ``length`` tokens whose text tokens are ``start:stop`` (``text`` = (start, stop, length)).
    Only the image-to-image block of the attention map becomes the identity: each image token attends to itself
    and to every text token, and text tokens attend to everything."""
    start, stop, length = text
    image = torch.ones(length, dtype=torch.bool, device=device)
    image[start:stop] = False
    blocked = image[:, None] & image[None, :] & ~torch.eye(length, dtype=torch.bool, device=device)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


def adaptive_scale(scale, adaptive, timestep):
    """diffusers' optional damping ``s_t = max(0, s - a * (1000 - t))`` for a discrete timestep ``t`` in [0, 1000].

    ``adaptive = 0`` gives the constant scale of the paper.
    """
    return max(0.0, scale - adaptive * (1000.0 - float(timestep)))


def pag_guidance(denoised, cond_denoised, perturbed_denoised, scale):
    """Add the perturbed-attention guidance term to an already guided prediction."""
    return denoised + scale * (cond_denoised - perturbed_denoised)


def rescale_to_reference(guided, reference, phi):
    """Guidance rescale (Lin et al. 2024, eq. 15-16): match the per-sample std of ``guided`` to ``reference``
    and blend with weight ``phi`` (0 = off), which counters the over-exposure large guidance causes. Both are
    noise predictions (the model's own output space, as in the paper and diffusers); the std is not invariant
    under the move to denoised space, so the caller converts first.

    The statistics run in float32 (float64 for float64 input), since a float16 sum of squares over a latent
    overflows; the result is in ``guided``'s dtype.
    """
    if phi == 0:
        return guided
    work = torch.promote_types(guided.dtype, torch.float32)
    wide, reference = guided.to(work), reference.to(work)
    dims = tuple(range(1, guided.ndim))
    ratio = reference.std(dim=dims, keepdim=True) / wide.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return (phi * wide * ratio + (1.0 - phi) * wide).to(guided.dtype)


def in_window(sigma, sigma_start, sigma_end):
    """True when ``sigma`` lies in the closed window [sigma_end, sigma_start] (sigmas fall during sampling)."""
    s = float(torch.as_tensor(sigma).flatten()[0])
    return sigma_end <= s <= sigma_start
