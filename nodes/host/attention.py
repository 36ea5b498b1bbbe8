"""Perturbed self-attention: chosen layers give the rows of one batch chunk the identity attention map (UNets:
``attn1`` replaces; DiTs: block replaces that mark the call, one shared attention override that acts on the mark;
on joint text + image attention, optionally only the image-to-image block)."""
import inspect
from typing import NamedTuple

import torch

import comfy.ldm.modules.attention as comfy_attention
from comfy.ldm.flux.model import Flux as FluxTransformer

from ...guidance_ops import batch as rows
from ...guidance_ops import pag as pag_ops
from ...guidance_ops.layers import group_by_block
from .family import DIT_FAMILIES, UNET_FAMILIES, UnsupportedModel, model_family

# Feature probe: ComfyUI routes attention through a user override only since the ``wrap_attn`` decorator exists.
HAS_ATTENTION_OVERRIDE = hasattr(comfy_attention, "wrap_attn")
# Feature probe: newer Flux models state where the image tokens start in the single blocks' joint sequence
# (transformer_options["img_slice"]); on older ones PAG notes the text length at the last double block instead.
FLUX_STATES_IMG_SLICE = "img_slice" in inspect.getsource(FluxTransformer.forward_orig)


def perturb_self_attention(model, layers, scope, keep_text=True):
    """Perturb the selected self-attention layers for the rows of the chunk named by
    ``transformer_options[scope.key]``; all other rows attend normally.

    UNets: the layer returns its value (identity attention map); their self-attention holds image tokens only.
    DiTs (joint text + image attention): with ``keep_text`` only the image-to-image block of the attention map
    becomes the identity (each image token attends to itself and to every text token; text tokens attend as
    usual), as diffusers' PAGJointAttnProcessor2_0 does; without it the whole joint sequence gets the identity.

    Registered patches chain to what the model already had at the same place, so several perturbations (of
    this pack or of core nodes) compose. Each perturbed call is counted in ``scope.state.hits``.
    """
    family = model_family(model)
    if family in UNET_FAMILIES:
        _perturb_unet(model, layers, scope)
    elif family in DIT_FAMILIES:
        if not HAS_ATTENTION_OVERRIDE:
            raise UnsupportedModel("this ComfyUI version has no attention override hook, which perturbing a DiT "
                                   "needs; update ComfyUI")
        _perturb_dit(model, layers, scope, keep_text)
    else:
        raise UnsupportedModel("perturbed attention needs a UNet (SD1.5, SDXL) or a DiT (SD3, Flux)")


def _count_hit(scope, layer):
    state = scope.state
    if state is not None:
        state.hits[layer] = state.hits.get(layer, 0) + 1


def unet_attention(q, k, v, extra_options, **kwargs):
    """What a UNet attention layer computes when no replace patch is registered."""
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                               attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


def chain_unet_replace(model, which, kind, block, transformers, link):
    """Register ``link(previous)`` as the ``which`` ('attn1' / 'attn2') replace patch of UNet block (kind, block),
    for the transformers in ``transformers`` (None: all). ``previous`` is what ran there before: another patch or
    ComfyUI's attention. Registered at (block, id) like core nodes do, and also around any per-transformer patch
    already there, since ComfyUI looks up (block, id, transformer) first and it would shadow ours."""
    chain_unet_replace_in(model.model_options.setdefault("transformer_options", {}), which, kind, block,
                          transformers, link)


def chain_unet_replace_in(transformer_options, which, kind, block, transformers, link):
    """``chain_unet_replace`` on a transformer_options dict (a sampler's own model options)."""
    replace = transformer_options.setdefault("patches_replace", {}).setdefault(which, {})
    keys = [(kind, block)] + [k for k in replace if len(k) == 3 and k[:2] == (kind, block)
                              and (transformers is None or k[2] in transformers)]
    for target in keys:
        replace[target] = link(replace.get(target, unet_attention))


def _perturb_unet(model, layers, scope):
    for (kind, block), transformers in group_by_block(layers).items():
        chain_unet_replace(model, "attn1", kind, block, transformers,
                           lambda previous, kind=kind, block=block, transformers=transformers:
                           _unet_link(previous, kind, block, transformers, scope))


def _unet_link(previous, kind, block, transformers, scope):
    def attn1(q, k, v, extra_options, **kwargs):
        chunk = extra_options.get(scope.key)
        index = extra_options.get("block_index", 0)
        if chunk is None or (transformers is not None and index not in transformers):
            return previous(q, k, v, extra_options, **kwargs)
        cou = extra_options["cond_or_uncond"]
        mask = rows.chunk_rows(cou, q.shape[0], {chunk}, device=q.device)
        if not mask.any():
            return previous(q, k, v, extra_options, **kwargs)
        _count_hit(scope, (kind, block, index))
        if mask.all():
            return v
        rest_options = {**extra_options, "cond_or_uncond": rows.without_chunks(cou, {chunk})}
        keep = ~mask
        rest = previous(q[keep], k[keep], v[keep], rest_options, **kwargs)
        return rows.merge_rows(mask, v[mask], rest)
    return attn1


_PERTURBED = "trainfree_perturbed"  # transformer_options: the perturbations marked for the running block
_TEXT_TOKENS = "trainfree_text_tokens"  # transformer_options: Flux's text length, seen by its last double block


class _Mark(NamedTuple):
    """One perturbation of the running block: the chunk whose rows it perturbs, and ``text`` = (start, stop,
    length): where the text tokens sit in the block's joint sequence of ``length`` tokens (None: the whole
    sequence gets the identity)."""
    chunk: int
    scope: object
    layer: tuple
    text: tuple


def _perturb_dit(model, layers, scope, keep_text):
    net = model.model.diffusion_model
    options = model.model_options.setdefault("transformer_options", {})
    replace = options.setdefault("patches_replace", {}).setdefault("dit", {})
    for kind, block, _ in layers:
        target = (f"{kind}_block", block)
        text_of = text_position(net, kind, block) if keep_text else None
        replace[target] = _dit_block_link(replace.get(target), (kind, block, None), scope, text_of)
    if (keep_text and not FLUX_STATES_IMG_SLICE and any(kind == "single" for kind, _, _ in layers)
            and len(getattr(net, "double_blocks", ()))):
        target = ("double_block", len(net.double_blocks) - 1)
        replace[target] = text_length_link(replace.get(target))
    override = options.get("optimized_attention_override")
    if not getattr(override, "trainfree_identity", False):
        options["optimized_attention_override"] = _perturbed_attention_override(override)


def text_position(net, kind, block):
    """``text_of(args)`` -> (start, stop, length) of the text tokens in the block's joint attention, read from
    what the model hands the block. SD3 and Flux double blocks put the text first (unless a Flux-style block
    says ``flipped_img_txt``); Flux single blocks run on the concatenated text + image sequence."""
    if kind == "single":
        def single(args):
            to = args["transformer_options"]
            if FLUX_STATES_IMG_SLICE:  # newer ComfyUI states where the image part starts
                text = to["img_slice"][0]
            elif _TEXT_TOKENS in to:  # else the text length the last double block saw in this call
                text = to[_TEXT_TOKENS]
            else:
                raise UnsupportedModel("perturbing a Flux single block with the text kept needs the number of "
                                       "text tokens, which this model does not pass to its single blocks: set "
                                       "dit_mode to 'whole sequence' or perturb double blocks")
            return 0, text, args["img"].shape[1]
        return single
    blocks = getattr(net, "double_blocks", None)  # SD3 calls its blocks joint_blocks and never flips
    flipped = blocks is not None and bool(getattr(blocks[block], "flipped_img_txt", False))

    def double(args):
        text = 0 if args.get("txt") is None else args["txt"].shape[1]
        image = args["img"].shape[1]
        return (image, image + text, image + text) if flipped else (0, text, image + text)
    return double


def text_length_link(previous):
    """Note Flux's text length in the call's transformer_options, where the single blocks that follow find it
    (ComfyUI versions that do not state ``img_slice`` pass the text to the double blocks only)."""
    def block_fn(args, extra):
        args["transformer_options"][_TEXT_TOKENS] = args["txt"].shape[1]
        return previous(args, extra) if previous is not None else extra["original_block"](args)
    return block_fn


def _dit_block_link(previous, layer, scope, text_of):
    """Mark the block's attention calls with the chunk to perturb, then run the block (or the patch before us).
    The mark goes into the call's own transformer_options and is taken out when the block returns."""
    def block_fn(args, extra):
        to = args["transformer_options"]
        chunk = to.get(scope.key)
        if chunk is None:
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        before = to.get(_PERTURBED, ())
        to[_PERTURBED] = before + (_Mark(chunk, scope, layer, None if text_of is None else text_of(args)),)
        try:
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        finally:
            to[_PERTURBED] = before
    return block_fn


def _perturbed_attention_override(previous):
    """One override serves every DiT perturbation of the pack. Rows of chunks marked for the whole sequence
    get identity attention; rows of chunks marked to keep the text run ComfyUI's attention with a mask that
    makes the image-to-image block the identity; all other rows attend as before."""
    def call(func, *args, **kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        marks = to.get(_PERTURBED, ())
        if not marks:
            return call(func, *args, **kwargs)
        q, cou = args[0], to["cond_or_uncond"]
        tokens = q.shape[2] if kwargs.get("skip_reshape", False) else q.shape[1]
        groups, scopes = {}, {}  # where the text sits in this call (None: identity attention) -> chunks, a scope
        for mark in marks:
            text = text_in_call(mark, tokens)
            groups.setdefault(text, set()).add(mark.chunk)
            scopes.setdefault(text, mark.scope)
        perturbed = set().union(*groups.values())
        rest = ~rows.chunk_rows(cou, q.shape[0], perturbed, device=q.device)
        if rest.all():  # ComfyUI split the batch and the perturbed rows are in another call
            return call(func, *args, **kwargs)
        for mark in marks:
            _count_hit(mark.scope, mark.layer)
        parts = []
        for text, chunks in groups.items():
            sel = rows.chunk_rows(cou, q.shape[0], chunks, device=q.device)
            if not sel.any():
                continue
            if text is None:
                parts.append((sel, _attention_output_layout(args[2][sel], _heads(args, kwargs), kwargs)))
            else:
                ours = _keep_text_mask(scopes[text], text, q.dtype, q.device)
                masked = _rows_kwargs(kwargs, sel, [c for c in cou if c in chunks], extra_mask=ours)
                parts.append((sel, call(func, *_rows_of(args, sel), **masked)))
        if rest.any():
            parts.append((rest, call(func, *_rows_of(args, rest),
                                     **_rows_kwargs(kwargs, rest, rows.without_chunks(cou, perturbed)))))
        return _merge_parts(parts)

    override.trainfree_identity = True
    return override


def text_in_call(mark, tokens):
    """Where the text sits in this attention call, or None when the call gets identity attention as a whole:
    the mark asks for the whole sequence, or the call attends over the block's image tokens alone (SD3.5's
    second, image-only attention)."""
    if mark.text is None:
        return None
    start, stop, length = mark.text
    if tokens == length:
        return mark.text
    if tokens == length - (stop - start):
        return None
    raise UnsupportedModel(f"a perturbed block attends over {tokens} tokens, but it holds {stop - start} text "
                           f"and {length - stop + start} image tokens, so the text cannot be told from the image: "
                           f"set dit_mode to 'whole sequence'")


def _heads(args, kwargs):
    return args[3] if len(args) > 3 else kwargs["heads"]


def _rows_of(args, sel):
    return tuple(a[sel] for a in args[:3]) + tuple(args[3:])


def _keep_text_mask(scope, text, dtype, device):
    """PAG's keep-text mask for this token layout, made once per run (kept in the run's state, so it goes with
    the run) rather than in every attention call of every step."""
    key = (text, dtype, device)
    masks = scope.state.masks
    if key not in masks:
        masks[key] = pag_ops.keep_text_mask(text, dtype=dtype, device=device)
    return masks[key]


def _rows_kwargs(kwargs, sel, cond_or_uncond, extra_mask=None):
    """The attention call's keyword arguments for the rows ``sel``; ``extra_mask`` (PAG's additive mask) is added
    to any mask the model passes."""
    out = dict(kwargs)
    out["transformer_options"] = {**kwargs["transformer_options"], "cond_or_uncond": cond_or_uncond,
                                  _PERTURBED: ()}
    mask = kwargs.get("mask")
    if mask is not None and mask.ndim >= 3 and mask.shape[0] == sel.shape[0]:
        mask = mask[sel]
    if extra_mask is not None:
        dtype = extra_mask.dtype
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        mask = extra_mask if mask is None else mask.to(dtype) + extra_mask
    if mask is not None:
        out["mask"] = mask
    return out


def _merge_parts(parts):
    """Put each part's output back at its rows (dim 0)."""
    first = parts[0][1]
    out = first.new_empty((parts[0][0].shape[0],) + tuple(first.shape[1:]))
    for sel, value in parts:
        out[sel] = value.to(out.dtype)
    return out


def _attention_output_layout(v, heads, kwargs):
    """``v`` laid out the way ComfyUI's attention functions return their output."""
    if kwargs.get("skip_reshape", False):  # v is [B, H, N, D]
        b, h, n, d = v.shape
        return v if kwargs.get("skip_output_reshape", False) else v.transpose(1, 2).reshape(b, n, h * d)
    v = v.reshape(v.shape[0], v.shape[1], -1)  # [B, N, H*D]; SD3 hands v over as [B, N, H, D]
    if kwargs.get("skip_output_reshape", False):
        b, n, hd = v.shape
        return v.reshape(b, n, heads, hd // heads).transpose(1, 2)
    return v
