"""Cross-attention that also reads a negative prompt and steers away from it (NASA).

UNets: an ``attn2`` replace patch on every cross-attention site projects the negative prompt with that layer's own
key / value weights (the module fetched with ``get_model_object`` when the run starts) and subtracts its attention
output on the conditional rows. DiTs (joint text + image attention): one more batch row carries the negative
prompt's text stream next to the positive row's image stream (same latent, same pooled vector and guidance); in
every joint attention the positive image tokens subtract what the negative row's image tokens read from its text,
and both rows get the result, so their image streams stay identical while each text stream evolves as usual.
"""
import torch

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...guidance_ops import batch as rows
from ...guidance_ops import nasa as nasa_ops
from .attention import (FLUX_STATES_IMG_SLICE, HAS_ATTENTION_OVERRIDE, chain_unet_replace, text_length_link,
                        text_position, unet_attention)
from .evaluation import add_extra_cond_pass
from .family import DIT_FAMILIES, UNET_FAMILIES, UnsupportedModel, model_family
from .runs import PatchInput, Wrappers

POSITIVE = 0  # the chunk NASA steers: the sampler's conditional rows (cond_or_uncond 0)


def cross_attention_sites(model):
    """``{(kind, block, transformer): module path}`` of every UNet cross-attention (``attn2``) layer."""
    net = model.model.diffusion_model
    if not isinstance(net, UNetModel):
        return {}
    sites = {}
    groups = [("input", "input_blocks", net.input_blocks), ("middle", "middle_block", [net.middle_block]),
              ("output", "output_blocks", net.output_blocks)]
    for kind, attr, blocks in groups:
        for i, block in enumerate(blocks):
            for j, layer in enumerate(block):
                if isinstance(layer, SpatialTransformer):
                    prefix = f"diffusion_model.{attr}.{j}" if kind == "middle" else f"diffusion_model.{attr}.{i}.{j}"
                    for t in range(len(layer.transformer_blocks)):
                        sites[(kind, i, t)] = f"{prefix}.transformer_blocks.{t}.attn2"
    return sites


def joint_attention_layers(model):
    """``[(kind, block)]`` of every DiT block whose attention is joint over text and image tokens."""
    net = model.model.diffusion_model
    if model_family(model) == "flux":
        return [("double", i) for i in range(len(net.double_blocks))] + \
               [("single", i) for i in range(len(net.single_blocks))]
    if model_family(model) == "sd3":
        return [("double", i) for i in range(len(net.joint_blocks))]
    return []


def context_width(model):
    """The token width the model's cross-attention expects (its text encoder's output width)."""
    family = model_family(model)
    if family in UNET_FAMILIES:
        path = next(iter(cross_attention_sites(model).values()), None)
        if path is None:
            raise UnsupportedModel("this UNet has no cross-attention layer to steer")
        return model.get_model_object(path).to_k.in_features
    net = model.model.diffusion_model
    embedder = getattr(net, "txt_in", None) or getattr(net, "context_embedder", None)
    return embedder.in_features


def steer_cross_attention(model, negative, alpha, scope):
    """Steer every cross-attention of ``model`` away from the text embedding ``negative`` ([1 or B, tokens,
    width]) with weight ``alpha``, on the conditional rows, while ``scope.state.active`` (set per evaluation by
    the caller, e.g. with ``count_evaluations``). The run state also needs ``hits`` (a dict counted per layer);
    on UNets ``modules`` (``cross_attention_modules`` of the sampled model) and ``projections`` (a dict this
    module fills, dropped with the run); on DiTs the fields ``add_extra_cond_pass`` uses. Returns the layers
    patched."""
    negative = PatchInput(negative)  # kept for the patched model's life, as the patch's settings are
    family = model_family(model)
    if family in UNET_FAMILIES:
        return _steer_unet(model, negative, alpha, scope)
    if family in DIT_FAMILIES:
        if not HAS_ATTENTION_OVERRIDE:
            raise UnsupportedModel("this ComfyUI version has no attention override hook, which steering a DiT's "
                                   "joint attention needs; update ComfyUI")
        return _steer_dit(model, negative, alpha, scope)
    raise UnsupportedModel("negative-away attention needs a UNet (SD1.5, SDXL) or a DiT (SD3, Flux)")


def _count_hit(state, layer):
    state.hits[layer] = state.hits.get(layer, 0) + 1


# ---------------------------------------------------------------- UNets: attn2 replace patches

def _steer_unet(model, negative, alpha, scope):
    sites = cross_attention_sites(model)
    for kind, block in sorted({(kind, block) for kind, block, _ in sites}):
        chain_unet_replace(model, "attn2", kind, block, None,
                           lambda previous, kind=kind, block=block: _unet_link(previous, kind, block, sites,
                                                                               negative, alpha, scope))
    return sorted(sites)


def _negative_keys_values(state, path, negative, q):
    """K- and V- of one layer for this run, projected once per device / dtype with the layer's own weights
    (fetched from the sampled model when the run started, so ComfyUI's weight casting and patches apply)."""
    key = (path, q.device, q.dtype)
    if key not in state.projections:
        attn = state.modules[path]
        context = negative.value.to(device=q.device, dtype=q.dtype)
        state.projections[key] = (attn.to_k(context), attn.to_v(context))
    return state.projections[key]


def _to_rows(t, count):
    """The negative prompt's tensor for ``count`` batch rows (one prompt for all, or one per sample)."""
    if t.shape[0] == count:
        return t
    if t.shape[0] == 1:
        return t.expand(count, -1, -1)
    if count % t.shape[0] == 0:
        return t.repeat(count // t.shape[0], 1, 1)
    raise ValueError(f"the negative conditioning holds a batch of {t.shape[0]} prompts, which does not divide the "
                     f"{count} latents being sampled: encode one negative prompt, or one per latent")


def _unet_link(previous, kind, block, sites, negative, alpha, scope):
    def attn2(q, k, v, extra_options, **kwargs):
        out = previous(q, k, v, extra_options, **kwargs)
        state = scope.state
        if state is None or not state.active:
            return out
        mask = rows.chunk_rows(extra_options["cond_or_uncond"], q.shape[0], {POSITIVE}, device=q.device)
        if not mask.any():
            return out
        index = extra_options.get("block_index", 0)
        k_neg, v_neg = _negative_keys_values(state, sites[(kind, block, index)], negative, q)
        count = int(mask.sum())
        options = {**extra_options, "cond_or_uncond": [POSITIVE]}
        z_neg = unet_attention(q[mask], _to_rows(k_neg, count), _to_rows(v_neg, count), options)
        _count_hit(state, (kind, block, index))
        steered = out.clone()
        steered[mask] = nasa_ops.steer(out[mask], z_neg, alpha)
        return steered
    return attn2


def cross_attention_modules(patcher, model):
    """The cross-attention modules of the model being sampled (``patcher``), by path."""
    return {path: patcher.get_model_object(path) for path in cross_attention_sites(model).values()}


# ---------------------------------------------------------------- DiTs: one negative-text row

_MARK = "trainfree_nasa_text_"  # + scope key, in transformer_options: (layer, text position) of the running block


def _steer_dit(model, negative, alpha, scope):
    net = model.model.diffusion_model
    options = model.model_options.setdefault("transformer_options", {})
    replace = options.setdefault("patches_replace", {}).setdefault("dit", {})
    layers = joint_attention_layers(model)
    for kind, block in layers:
        target = (f"{kind}_block", block)
        replace[target] = _dit_block_link(replace.get(target), (kind, block), scope, text_position(net, kind, block))
    singles = any(kind == "single" for kind, _ in layers)
    if singles and not FLUX_STATES_IMG_SLICE:
        target = ("double_block", len(net.double_blocks) - 1)
        replace[target] = text_length_link(replace.get(target))
    options["optimized_attention_override"] = _steering_override(options.get("optimized_attention_override"),
                                                                 alpha, scope)
    add_extra_cond_pass(model, scope, lambda state, sigma: state.active,
                        lambda state, positive: _negative_conds(positive, negative))
    return layers


def _negative_conds(positive, held):
    """The positive conditioning with its token sequence replaced by the negative prompt's (pooled vector,
    guidance and every other input kept), so the extra row's image stream matches the positive row's."""
    negative, out = held.value, []
    for entry in positive:
        conds = entry["model_conds"]
        text = conds["c_crossattn"]
        if text.cond.shape[1] != negative.shape[1]:
            raise UnsupportedModel(
                f"the negative prompt has {negative.shape[1]} tokens and the positive {text.cond.shape[1]}; on "
                f"SD3 / Flux NASA runs the negative text in the same batch as the positive, which needs equal "
                f"lengths: shorten the longer prompt until both encode to the same length (ComfyUI pads Flux's T5 "
                f"text to 256 tokens and SD3's to 77, and a longer prompt grows past that)")
        # ComfyUI repeats it to the latent batch as it does any conditioning (CONDRegular.process_cond)
        tensor = negative.to(device=text.cond.device, dtype=text.cond.dtype)
        out.append({**entry, "model_conds": {**conds, "c_crossattn": type(text)(tensor)}})
    return out


def _dit_block_link(previous, layer, scope, text_of):
    def block_fn(args, extra):
        to = args["transformer_options"]
        state = scope.state
        if state is None or to.get(scope.key) is None:
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        mark_key = _MARK + scope.key
        before = to.get(mark_key)
        to[mark_key] = (layer, text_of(args))
        try:
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        finally:
            to[mark_key] = before
    return block_fn


def _steering_override(previous, alpha, scope):
    """Joint attention calls of the marked blocks: every row attends as before, then the image tokens of the
    positive rows and of their negative-text rows both get Z+ - alpha * (what the negative row's image tokens
    read from its text)."""
    mark_key = _MARK + scope.key

    def call(func, *args, **kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        mark = to.get(mark_key)
        out = call(func, *args, **kwargs)
        if mark is None:
            return out
        layer, (start, stop, length) = mark
        q, k, v = args[:3]
        skip_reshape = kwargs.get("skip_reshape", False)
        if (q.shape[2] if skip_reshape else q.shape[1]) != length:
            return out  # SD3.5's second, image-only attention: already identical on both rows
        cou, negative_chunk = to["cond_or_uncond"], to[scope.key]
        pos = rows.chunk_rows(cou, q.shape[0], {POSITIVE}, device=q.device)
        neg = rows.chunk_rows(cou, q.shape[0], {negative_chunk}, device=q.device)
        if not pos.any() and not neg.any():
            return out
        if not (pos.any() and neg.any()):
            raise RuntimeError("TrainFree NASA found the positive and the negative-text rows in separate model "
                               "calls (ComfyUI split the batch, for lack of memory or because their inputs "
                               "differ); NASA needs them in one call: lower the batch size or resolution")
        values = nasa_ops.text_values_only(v[neg], (start, stop), 2 if skip_reshape else 1)
        neg_kwargs = {**kwargs, "transformer_options": {**to, "cond_or_uncond": [negative_chunk]}}
        mask = kwargs.get("mask")
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == q.shape[0]:
            neg_kwargs["mask"] = mask[neg]
        text_part = func(q[neg], k[neg], values, *args[3:], **neg_kwargs)
        token_dim = 2 if kwargs.get("skip_output_reshape", False) else 1
        keep = torch.ones(out.shape[token_dim], dtype=torch.bool, device=out.device)
        keep[start:stop] = False
        image = keep.nonzero().flatten()
        steered = nasa_ops.steer(out[pos].index_select(token_dim, image), text_part.index_select(token_dim, image),
                                 alpha)
        out = out.clone()
        for sel in (pos, neg):
            out[sel] = out[sel].index_copy(token_dim, image, steered.to(out.dtype))
        _count_hit(scope.state, layer)
        return out

    return override


def count_evaluations(model, scope, on_evaluation):
    """``on_evaluation(state, sigma)`` before each of the sampler's model evaluations (a PREDICT_NOISE wrapper)."""
    def predict_noise(executor, x, timestep, model_options, seed):
        if scope.state is not None:
            on_evaluation(scope.state, timestep)
        return executor(x, timestep, model_options, seed)
    model.add_wrapper_with_key(Wrappers.PREDICT_NOISE, scope.key, predict_noise)

