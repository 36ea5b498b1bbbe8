"""Negative-Away Steer Attention (NASA), from SNOOPI (Nguyen et al., ICCV 2025, arXiv 2412.02687).

In every cross-attention layer the image queries Q attend to the positive prompt and, with the same key and value
projections, to the negative prompt; the negative's attention output is subtracted before the output projection:

    Z = softmax(Q K+^T / sqrt(d)) V+  -  alpha * softmax(Q K-^T / sqrt(d)) V-,   K- = c_n W_k, V- = c_n W_v

One forward pass; the negative prompt never enters a noise-space combination (unlike CFG).

On joint text + image attention (SD3, Flux) there is no separate cross-attention layer. The paper treats "the
image-text part" of it analogously; here that part is what the image queries read from the text tokens inside the
joint softmax (the joint attention with the image tokens' values set to zero), taken from a row that carries the
negative prompt's text stream next to the same image stream (``text_values_only``).
"""
import math

import torch

# alpha per family. SD1.5 and SD2.1 are the paper's NASA-I values (PixArt-alpha, a DiT: 0.5). The paper gives no
# single value for SDXL, SD3 or Flux (its figures sweep 0..1 on SDXL-DMD2 and FLUX-schnell): SDXL takes the UNet
# value a step above SD2.1, SD3 and Flux take PixArt-alpha's DiT value; these three are this pack's choice.
DEFAULT_ALPHA = {"sd15": 0.1, "unet": 0.2, "sdxl": 0.3, "sd3": 0.5, "flux": 0.5}
PAPER_ALPHA = ("sd15", "unet")


def default_alpha(family):
    return DEFAULT_ALPHA[family]


def steer(positive_out, negative_out, alpha):
    """Z+ - alpha Z- (the attention outputs, before the output projection)."""
    return positive_out - alpha * negative_out.to(positive_out.dtype)


def softmax_attention(q, k, v, heads):
    """Plain scaled dot-product attention on [B, N, heads * dim] tensors, as the paper writes it."""
    b, n, inner = q.shape
    dim = inner // heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, dim).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim), dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, n, inner)


def nasa_attention(q, k_pos, v_pos, k_neg, v_neg, heads, alpha):
    """NASA's cross-attention output for queries ``q`` (paper, Sec. NASA): two softmax attentions, subtracted."""
    return steer(softmax_attention(q, k_pos, v_pos, heads), softmax_attention(q, k_neg, v_neg, heads), alpha)


def text_values_only(v, text, token_dim):
    """``v`` with every token outside ``text`` = (start, stop) set to zero: attention with these values gives the
    part of the joint attention output that comes from the text tokens (the softmax still runs over all keys)."""
    start, stop = text
    keep = torch.zeros(v.shape[token_dim], dtype=v.dtype, device=v.device)
    keep[start:stop] = 1
    shape = [1] * v.ndim
    shape[token_dim] = -1
    return v * keep.reshape(shape)
