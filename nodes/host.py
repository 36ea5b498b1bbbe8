"""The host adapter: the only module of the pack that touches ComfyUI internals.

Everything here goes through ComfyUI's sanctioned hooks (model_options cfg functions, ``patches_replace``,
wrappers, ``optimized_attention_override``). Differences between ComfyUI versions are found by feature
probes, never by version strings. Node modules import this module and ``guidance_ops``, nothing else.

Per-run state lives in a ``RunScope``: an OUTER_SAMPLE wrapper creates it when sampling starts and drops it
when sampling ends (also on error or interrupt), so batch size, resolution and step count may change freely
between runs.
"""
import inspect
import logging
import uuid
from typing import NamedTuple

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.patcher_extension
import comfy.supported_models
import comfy.utils
import comfy.text_encoders.flux
from comfy.ldm.flux.model import Flux as FluxTransformer
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.wan.model import WanModel

from ..guidance_ops import batch as rows
from ..guidance_ops import pag as pag_ops
from ..guidance_ops.layers import group_by_block

log = logging.getLogger("trainfree")
Wrappers = comfy.patcher_extension.WrappersMP

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "unet": "a UNet model", "sd3": "SD3", "flux": "Flux",
                "wan": "Wan (video)"}
UNET_FAMILIES = ("sd15", "sdxl", "unet")
DIT_FAMILIES = ("sd3", "flux")
# Feature probe: ComfyUI routes attention through a user override only since the ``wrap_attn`` decorator exists.
HAS_ATTENTION_OVERRIDE = hasattr(comfy_attention, "wrap_attn")
# Feature probe: ComfyUI 0.3.75's ModelPatcher.clone deep-copies model_options with copy.deepcopy, which would give
# each clone its own copy of a patch's RunScope unless the scope copies to itself (RunScope.__deepcopy__); later
# versions copy only the dicts and lists (comfy.utils.deepcopy_list_dict) and leave the objects in them shared.
CLONE_DEEP_COPIES_OBJECTS = not hasattr(comfy.utils, "deepcopy_list_dict")
# Feature probe: newer Flux models state where the image tokens start in the single blocks' joint sequence
# (transformer_options["img_slice"]); on older ones PAG notes the text length at the last double block instead.
FLUX_STATES_IMG_SLICE = "img_slice" in inspect.getsource(FluxTransformer.forward_orig)
_RUNS = "trainfree_runs"
_GUIDANCE_OFF = "trainfree_guidance_off"  # model_options flag: a patch switched guidance off for this evaluation


class UnsupportedModel(ValueError):
    pass


def probes():
    """The feature probes and the branch this ComfyUI takes: ``{name: (value, kind)}``. A 'branch' probe picks
    between two code paths that differ between supported versions (the test hosts must cover both); a
    'requirement' is a hook the pack needs and every supported version has."""
    return {"clone_deep_copies_objects": (CLONE_DEEP_COPIES_OBJECTS, "branch"),
            "flux_states_img_slice": (FLUX_STATES_IMG_SLICE, "branch"),
            "attention_override_hook": (HAS_ATTENTION_OVERRIDE, "requirement")}


def model_family(model):
    """'sd15', 'sdxl', 'unet' (other openaimodel UNets), 'sd3', 'flux', 'wan' (Wan 2.1 / 2.2 video) or None."""
    net = model.model.diffusion_model
    if isinstance(net, UNetModel):
        if isinstance(model.model, comfy.model_base.SDXL):
            return "sdxl"
        if isinstance(model.model.model_config, comfy.supported_models.SD15):
            return "sd15"
        return "unet"
    if isinstance(net, FluxTransformer):
        return "flux"
    if isinstance(net, OpenAISignatureMMDITWrapper):
        return "sd3"
    if isinstance(net, WanModel):
        return "wan"
    return None


def same_family(model, other):
    """Whether two models share family, latent space and sampling type, so one's prediction may stand in for
    the other's (two models of an unknown family count as one only when their latent formats match)."""
    return (model_family(model) == model_family(other) and is_flow_model(model) == is_flow_model(other)
            and type(model.model.latent_format) is type(other.model.latent_format))


def require_same_family(model, other, input_name):
    """Refuse a second model (``input_name``) whose predictions cannot stand in for the first model's."""
    if not same_family(model, other):
        names = [FAMILY_NAMES.get(model_family(m), type(m.model.diffusion_model).__name__) for m in (model, other)]
        raise UnsupportedModel(f"input '{input_name}' holds a model of another kind ({names[1]}) than 'model' "
                               f"({names[0]}): connect a {input_name} of the same family, latent space and "
                               f"sampling type")


def require_family(model, node_title, families):
    family = model_family(model)
    if family not in families:
        kind = type(model.model.diffusion_model).__name__
        served = ", ".join(FAMILY_NAMES[f] for f in families)
        raise UnsupportedModel(f"{node_title} cannot serve this model ({kind}); it serves {served}. "
                               f"Connect a model of one of those families, or leave this node out.")
    return family


def attention_layers(model):
    """``{(kind, block): transformer count}`` for every self-attention site the pack can perturb."""
    net = model.model.diffusion_model
    if isinstance(net, UNetModel):
        found = {}
        groups = [("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks)]
        for kind, blocks in groups:
            for i, block in enumerate(blocks):
                for layer in block:
                    if isinstance(layer, SpatialTransformer):
                        found[(kind, i)] = len(layer.transformer_blocks)
        return found
    if isinstance(net, FluxTransformer):
        return {**{("double", i): 1 for i in range(len(net.double_blocks))},
                **{("single", i): 1 for i in range(len(net.single_blocks))}}
    if isinstance(net, OpenAISignatureMMDITWrapper):
        return {("double", i): 1 for i in range(len(net.joint_blocks))}
    return {}


def model_sampling(model):
    return model.get_model_object("model_sampling")


def percent_to_sigma(model, percent):
    return float(model_sampling(model).percent_to_sigma(percent))


def sigma_to_timestep(model, sigma):
    """A timestep on the 0..1000 scale the papers use: the discrete timestep for SD models, t * 1000 for flow
    models (whose sigma is t; Flux's own model_sampling reports t in 0..1, SD3's t * 1000)."""
    if is_flow_model(model):
        return float(torch.as_tensor(sigma).flatten()[0]) * 1000.0
    return float(model_sampling(model).timestep(sigma).flatten()[0])


def prediction_space(sampling, sigma, x):
    """``(to_prediction, to_denoised)``: maps between a denoised prediction and the model's own output space at
    ``sigma`` for input ``x`` (eps for eps models, v for v-prediction, the velocity for flow models), so that
    what the papers compute on the network's output can be. ComfyUI's ``calculate_denoised`` is affine in the
    model output, so its value at 0 and at 1 give the map exactly, for every model_sampling type."""
    zero = sampling.calculate_denoised(sigma, torch.zeros_like(x), x)
    slope = sampling.calculate_denoised(sigma, torch.ones_like(x), x) - zero
    return (lambda denoised: (denoised - zero) / slope), (lambda prediction: zero + slope * prediction)


def new_key(technique):
    return f"trainfree_{technique}_{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- per-run state

class RunScope:
    """Per-run state of one patch.

    ``state`` is ``make_state(guider, noise, latent_image, ...)`` (the guider and the arguments of its
    outer_sample) while a sampling run is under way, None otherwise. ``finish(state)`` runs when the run ends,
    also on error or interrupt, and returns the report kept in ``last_report`` (numbers, no tensors).
    """

    def __init__(self, model, key, make_state, finish=None):
        self.key = key
        self.state = None
        self.last_report = None
        self._make_state, self._finish = make_state, finish
        guard_latent(model)
        model.add_wrapper_with_key(Wrappers.OUTER_SAMPLE, key, self._outer_sample)
        model.model_options.setdefault("transformer_options", {}).setdefault(_RUNS, {})[key] = self

    def __deepcopy__(self, memo):  # ComfyUI 0.3.75 deep-copies model_options on clone; the scope is shared
        return self

    def _outer_sample(self, executor, *args, **kwargs):
        outer = self.state  # a nested run (a sampler inside a sampler) gets its own state
        self.state = self._make_state(executor.class_obj, *args)
        try:
            return executor(*args, **kwargs)
        finally:
            if self._finish is not None:
                self.last_report = self._finish(self.state)
            self.state = outer


_LATENT_GUARD = "trainfree_latent_guard"


def guard_latent(model):
    """Check the latent's channels once per run, before sampling (one wrapper however many patches ask for it)."""
    if not model.wrappers.get(Wrappers.OUTER_SAMPLE, {}).get(_LATENT_GUARD):
        model.add_wrapper_with_key(Wrappers.OUTER_SAMPLE, _LATENT_GUARD, _check_latent_wrapper)


def _check_latent_wrapper(executor, noise, latent_image, *args, **kwargs):
    check_latent(executor.class_obj.model_patcher, latent_image)
    return executor(noise, latent_image, *args, **kwargs)


def check_latent(model, latent):
    """A latent from another family's empty-latent node or VAE fails deep inside the model; say so plainly."""
    expected = getattr(model.model.latent_format, "latent_channels", None)
    if expected is not None and latent.ndim >= 4 and latent.shape[1] != expected:
        family = FAMILY_NAMES.get(model_family(model), type(model.model.diffusion_model).__name__)
        raise ValueError(f"the latent has {latent.shape[1]} channels but this model ({family}) works on "
                         f"{expected}-channel latents: make the latent with this model's empty-latent node "
                         f"(EmptyLatentImage for SD1.5 / SDXL, EmptySD3LatentImage for SD3 / Flux) or encode it "
                         f"with this model's VAE")


def run_reports(model):
    """``{key: last_report}`` of every patch on ``model`` that keeps a run scope (what the last run did)."""
    return {key: scope.last_report for key, scope in model.model_options.get("transformer_options", {})
            .get(_RUNS, {}).items()}


def add_post_cfg(model, fn):
    model.set_model_sampler_post_cfg_function(fn)


def is_flow_model(model):
    """True for rectified-flow models (SD3, Flux): x = (1 - sigma) x0 + sigma eps in ComfyUI's space."""
    import comfy.model_sampling
    return isinstance(model_sampling(model), comfy.model_sampling.CONST)


def add_guidance_delta(model, technique, needs_uncond):
    """Register a guidance technique that replaces plain CFG's combination of the two denoised predictions.

    ``technique(cond, uncond, scale, sigma, x)`` returns the technique's denoised prediction; the patch adds its
    difference from plain CFG to whatever the sampler has so far, so patches before and after it still act.
    With ``needs_uncond`` the unconditional pass also runs at cfg 1 (the technique has its own scales).
    """
    def post_cfg(args):
        if args["uncond"] is None or args["model_options"].get(_GUIDANCE_OFF):
            return args["denoised"]  # no unconditional prediction, or a patch turned guidance off here
        cond, uncond, scale = args["cond_denoised"], args["uncond_denoised"], args["cond_scale"]
        plain = uncond + (cond - uncond) * scale
        return args["denoised"] + (technique(cond, uncond, scale, args["sigma"], args["input"]) - plain)
    guard_latent(model)
    model.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=needs_uncond)


def _reads_cfg(guider):
    """Whether the guider combines its passes with ``guider.cfg`` (CFGGuider, as KSampler uses it). Guiders that
    bring their own predict_noise (DualCFGGuider, PerpNegGuider) read other scales, so a per-step cfg would be
    ignored."""
    import comfy.samplers
    return type(guider).predict_noise is comfy.samplers.CFGGuider.predict_noise


def override_cfg_per_evaluation(model, scope, choose, after=None, title="This patch"):
    """A PREDICT_NOISE wrapper: ``choose(state, sigma, x, model_options, sampler_cfg)`` gives the CFG scale for
    this model evaluation or None to keep the sampler's. 1.0 switches guidance off: ComfyUI skips the
    unconditional pass unless a patch forces it, and techniques registered with ``add_guidance_delta`` stand
    aside as well. Then ``after(state, denoised, sigma, x, sampler_cfg)`` may rewrite the result. The
    sampler's scale is restored afterwards."""
    def predict_noise(executor, x, timestep, model_options, seed):
        state = scope.state
        guider = executor.class_obj
        if state is None:
            return executor(x, timestep, model_options, seed)
        if not _reads_cfg(guider):
            raise UnsupportedModel(f"{title} sets the CFG scale step by step, which the {type(guider).__name__} "
                                   f"guider does not read (it combines its passes its own way): sample with "
                                   f"KSampler, SamplerCustom or the CFGGuider node, or remove {title}")
        sampler_cfg = guider.cfg
        cfg = choose(state, timestep, x, model_options, sampler_cfg)
        if cfg is not None:
            guider.cfg = cfg
            if cfg == 1.0:
                model_options = {**model_options, _GUIDANCE_OFF: True}
        try:
            out = executor(x, timestep, model_options, seed)
        finally:
            guider.cfg = sampler_cfg
        return out if after is None else after(state, out, timestep, x, sampler_cfg)
    model.add_wrapper_with_key(Wrappers.PREDICT_NOISE, scope.key, predict_noise)


def uncond_pass_runs(model_options):
    """Whether ComfyUI runs the unconditional pass at cfg 1 (a patch asked for it)."""
    return bool(model_options.get("disable_cfg1_optimization", False))


def process_latent_in(model, latent):
    return model.model.process_latent_in(latent)


def predict_with(other, conds, x, sigma):
    """The denoised prediction of another (already loaded) model for one conditioning."""
    import comfy.samplers
    other.pre_run()
    return comfy.samplers.calc_cond_batch(other.model, [conds], x, sigma, other.model_options)[0]


def attach_model(model, key, other):
    """Have ComfyUI load ``other`` together with ``model`` for sampling."""
    if other.model is model.model and other.patches_uuid != model.patches_uuid:
        raise UnsupportedModel("the second model shares its weights with the first but carries other weight "
                               "patches (a LoRA); ComfyUI cannot hold both at once. Load it from its own loader.")
    model.set_additional_models(key, [other])


def add_run_conditioning(model, key, conditioning):
    """Have the sampler prepare one more conditioning (a CONDITIONING value) with its own prompts on every run:
    areas, masks, the model's extra inputs and ControlNets, exactly as for the positive prompt. During the run
    ``run_conditioning(guider, key)`` hands it out in the form ``predict_with`` takes."""
    import comfy.sampler_helpers

    def outer_sample(executor, *args, **kwargs):
        executor.class_obj.conds[key] = comfy.sampler_helpers.convert_cond(conditioning)
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(Wrappers.OUTER_SAMPLE, key, outer_sample)


def run_conditioning(guider, key):
    return guider.conds[key]


def replace_uncond_with_guide(model, guide, scope, use_negative_prompt):
    """Two-model guidance: on the sampler's main evaluation, the unconditional slot is filled by ``guide``'s
    prediction (with the positive prompt for autoguidance, the negative one for NPO-style guidance), so CFG and
    every other patch combine the main model's conditional prediction with the guide's."""
    attach_model(model, scope.key, guide)

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        state = _take_main_evaluation(scope)
        if state is None:
            return executor(model_, conds, x_in, timestep, model_options)
        main = executor(model_, [conds[0], None] + list(conds[2:]), x_in, timestep, model_options)
        if conds[1] is None:  # cfg 1 (or guidance switched off): the unconditional slot is not used
            return main
        guide_conds = conds[1] if use_negative_prompt else conds[0]
        guided = predict_with(guide, guide_conds, x_in, timestep)
        state.guide_passes += 1
        return [main[0], guided] + list(main[2:])

    _track_main_evaluation(model, scope)
    model.add_wrapper_with_key(Wrappers.CALC_COND_BATCH, scope.key, calc_cond_batch)


# ---------------------------------------------------------------- the sampler's main evaluation

def _track_main_evaluation(model, scope):
    """Mark each model evaluation of the sampler, so that a CALC_COND_BATCH wrapper can tell the sampler's own
    cond/uncond batch (the first one after the mark) from the extra passes other patches make."""
    def predict_noise(executor, *args, **kwargs):
        state = scope.state
        if state is None:
            return executor(*args, **kwargs)
        state.main_pending = True
        try:
            return executor(*args, **kwargs)
        finally:
            state.main_pending = False
    model.add_wrapper_with_key(Wrappers.PREDICT_NOISE, scope.key, predict_noise)


def _take_main_evaluation(scope):
    """The run state if this cond batch is the sampler's main one (consuming the mark), else None."""
    state = scope.state
    if state is None or not state.main_pending:
        return None
    state.main_pending = False
    return state


# ---------------------------------------------------------------- extra conditional pass

def add_extra_cond_pass(model, scope, wanted):
    """Batch one more copy of the positive conditioning into ComfyUI's own cond/uncond model call.

    Only the sampler's main evaluation is extended (the first cond batch after each PREDICT_NOISE), never the
    extra passes other patches make. ``wanted(state, sigma)`` decides per evaluation; when it says yes,
    ``transformer_options[scope.key]`` holds the chunk index of the extra copy during that call (attention
    patches read it to find their rows) and ``state.extra_output`` receives its denoised prediction.
    """
    key = scope.key

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        state = _take_main_evaluation(scope)
        if state is not None:
            state.extra_output = None
        if state is None or conds[0] is None or not wanted(state, timestep):
            return executor(model_, conds, x_in, timestep, model_options)
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), key: len(conds)}
        out = executor(model_, list(conds) + [conds[0]], x_in, timestep, options)
        state.extra_output = out[-1]
        state.extra_passes += 1
        return out[:-1]

    _track_main_evaluation(model, scope)
    model.add_wrapper_with_key(Wrappers.CALC_COND_BATCH, key, calc_cond_batch)


# ---------------------------------------------------------------- perturbed self-attention

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


def _unet_attention(q, k, v, extra_options, **kwargs):
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                               attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


def _perturb_unet(model, layers, scope):
    replace = model.model_options.setdefault("transformer_options", {}).setdefault(
        "patches_replace", {}).setdefault("attn1", {})
    for (kind, block), transformers in group_by_block(layers).items():
        # Register at (block, id) like core nodes do, and also wrap any per-transformer patch already there,
        # since ComfyUI looks up (block, id, transformer) first and it would shadow ours.
        keys = [(kind, block)] + [k for k in replace if len(k) == 3 and k[:2] == (kind, block)
                                  and (transformers is None or k[2] in transformers)]
        for target in keys:
            replace[target] = _unet_link(replace.get(target, _unet_attention), kind, block, transformers, scope)


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
        text_of = _text_position(net, kind, block) if keep_text else None
        replace[target] = _dit_block_link(replace.get(target), (kind, block, None), scope, text_of)
    if (keep_text and not FLUX_STATES_IMG_SLICE and any(kind == "single" for kind, _, _ in layers)
            and len(getattr(net, "double_blocks", ()))):
        target = ("double_block", len(net.double_blocks) - 1)
        replace[target] = _text_length_link(replace.get(target))
    override = options.get("optimized_attention_override")
    if not getattr(override, "trainfree_identity", False):
        options["optimized_attention_override"] = _perturbed_attention_override(override)


def _text_position(net, kind, block):
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


def _text_length_link(previous):
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
        groups = {}  # where the text sits in this call (None: identity attention) -> chunks
        for mark in marks:
            groups.setdefault(_text_in_call(mark, tokens), set()).add(mark.chunk)
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
                masked = _rows_kwargs(kwargs, sel, [c for c in cou if c in chunks], keep_text=text, dtype=q.dtype)
                parts.append((sel, call(func, *_rows_of(args, sel), **masked)))
        if rest.any():
            parts.append((rest, call(func, *_rows_of(args, rest),
                                     **_rows_kwargs(kwargs, rest, rows.without_chunks(cou, perturbed)))))
        return _merge_parts(parts)

    override.trainfree_identity = True
    return override


def _text_in_call(mark, tokens):
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


def _rows_kwargs(kwargs, sel, cond_or_uncond, keep_text=None, dtype=None):
    """The attention call's keyword arguments for the rows ``sel``; with ``keep_text`` (where the text sits),
    PAG's mask is added to any mask the model passes."""
    out = dict(kwargs)
    out["transformer_options"] = {**kwargs["transformer_options"], "cond_or_uncond": cond_or_uncond,
                                  _PERTURBED: ()}
    mask = kwargs.get("mask")
    if mask is not None and mask.ndim >= 3 and mask.shape[0] == sel.shape[0]:
        mask = mask[sel]
    if keep_text is not None:
        ours = pag_ops.keep_text_mask(keep_text, dtype=dtype, device=sel.device)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        mask = ours if mask is None else mask.to(dtype) + ours
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


# ---------------------------------------------------------------- building models from ComfyUI's classes

def _host_unet_config(unet_config):
    """``unet_config`` with the fields this ComfyUI's Flux requires: newer versions need ``txt_ids_dims``, older
    ones reject it."""
    import comfy.ldm.flux.model as flux
    config = dict(unet_config)
    if config.get("image_model") == "flux":
        if "txt_ids_dims" in flux.FluxParams.__dataclass_fields__:
            config.setdefault("txt_ids_dims", [])
        else:
            config.pop("txt_ids_dims", None)
    return config


def build_diffusion_model(config_name, unet_config, state_dict=None):
    """A ModelPatcher around ``comfy.supported_models.<config_name>`` with ``unet_config`` (float32)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    config = getattr(comfy.supported_models, config_name)(_host_unet_config(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    if state_dict is not None:  # files use the families' original key names; each host renames them its way
        model.diffusion_model.load_state_dict(config.process_unet_state_dict(dict(state_dict)), strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def flux_state_dict_for_saving(state_dict):
    """A Flux transformer's weights under the original Flux key names (q/k norms as ``*_norm.scale``), which every
    ComfyUI version loads; newer versions name them ``*_norm.weight`` in memory."""
    return {(k[:-len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v for k, v in state_dict.items()}


def build_sd1_text_encoder(transformer_config, state_dict=None):
    """A CLIP (text encoder + the real SD1 tokenizer) whose transformer has ``transformer_config``."""
    import functools
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(transformer_config),
                                return_projected_pooled=False)

    def build(**params):
        return comfy.sd1_clip.SD1ClipModel(clip_model=encoder, **params)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, build)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    if state_dict is not None:
        clip.cond_stage_model.load_state_dict(state_dict, strict=True)
    return clip


class _SmallFluxTokenizer(comfy.text_encoders.flux.FluxTokenizer):
    """Flux's two tokenizers (the real CLIP and T5 vocabularies), with the T5 sequence padded to ``t5_length``
    tokens instead of 256 (the small reference model is trained on that length)."""
    def __init__(self, embedding_directory=None, tokenizer_data={}, t5_length=16):
        import comfy.sd1_clip
        import comfy.text_encoders.sd3_clip
        self.clip_l = comfy.sd1_clip.SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.t5xxl = comfy.text_encoders.sd3_clip.T5XXLTokenizer(
            embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, min_length=t5_length)


class _SmallFluxTextEncoder(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's Flux text encoder pair (CLIP-L-class pooled vector + T5-class sequence) at small widths: only the
    two encoders are built from the given configurations; encoding is FluxClipModel's own."""
    def __init__(self, device="cpu", dtype=None, model_options={}, clip_config=None, t5_config=None):
        import comfy.sd1_clip
        import comfy.text_encoders.t5
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=dict(clip_config),
                                                 return_projected_pooled=False, model_options=model_options)
        self.t5xxl = comfy.sd1_clip.SDClipModel(
            device=device, dtype=dtype, textmodel_json_config=dict(t5_config), special_tokens={"end": 1, "pad": 0},
            model_class=comfy.text_encoders.t5.T5, enable_attention_masks=False, return_attention_masks=False,
            model_options={**model_options, "model_name": "t5xxl"})
        self.dtypes = {dtype}


def build_flux_text_encoder(clip_config, t5_config, t5_length, state_dict=None):
    """A CLIP for Flux conditioning (T5 sequence as context, CLIP pooled output as vector) with small encoders."""
    import functools
    import comfy.sd
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(_SmallFluxTokenizer, t5_length=t5_length),
        functools.partial(_SmallFluxTextEncoder, clip_config=clip_config, t5_config=t5_config))
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    if state_dict is not None:
        clip.cond_stage_model.load_state_dict(state_dict, strict=True)
    return clip


def build_kl_autoencoder(ddconfig, embed_dim, state_dict=None):
    """The bare ``AutoencoderKL`` module (for training), or a comfy VAE around it when ``state_dict`` is given."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = {"ddconfig": dict(ddconfig), "embed_dim": embed_dim}
    if state_dict is None:
        return AutoencoderKL(**params)
    import comfy.sd
    vae = comfy.sd.VAE(sd=state_dict, config={"params": params})
    vae.latent_channels = embed_dim
    return vae


def unpack_weights(tensors):
    """float32 weights from a file's packed form: float16 tensors, and int8 tables stored as ``<name>.int8`` with
    a per-row ``<name>.scale``."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".int8"):
            name = key[:-len(".int8")]
            out[name] = value.float() * tensors[name + ".scale"].float()
        elif not (key.endswith(".scale") and key[:-len(".scale")] + ".int8" in tensors):
            out[key] = value.float() if value.dtype.is_floating_point else value
    return out


def load_reference_model(path):
    """(MODEL, CLIP, VAE) of a reference model file written by training/train_reference.py."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["trainfree_reference"])
    tensors = load_file(path)
    parts = {"unet.": {}, "clip.": {}, "vae.": {}}
    for key, value in tensors.items():
        prefix = key[:key.index(".") + 1]
        parts[prefix][key[len(prefix):]] = value
    parts = {prefix: unpack_weights(part) for prefix, part in parts.items()}
    model = build_diffusion_model(info["model_config"], info["unet_config"], parts["unet."])
    if "t5_config" in info:
        clip = build_flux_text_encoder(info["clip_config"], info["t5_config"], info["t5_length"], parts["clip."])
    else:
        clip = build_sd1_text_encoder(info["clip_config"], parts["clip."])
    vae = build_kl_autoencoder(info["vae_ddconfig"], info["latent_channels"], parts["vae."])
    return model, clip, vae, info
