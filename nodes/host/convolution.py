"""UNet convolutions run another way for part of a run (ScaleCrafter's re-dilation): the chosen Conv2d modules
are replaced by wrappers through ComfyUI's object patches (on the clone only; ComfyUI puts the originals back
when it unloads it or loads another clone), and an APPLY_MODEL wrapper tells them, per model evaluation, at
which factor to run."""
import weakref

import torch

import comfy.ops
import comfy.samplers
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample

from ...guidance_ops import redilation
from .family import SHARED_WEIGHTS, UnsupportedModel
from .runs import Wrappers

_ROOT = "diffusion_model."


def unet_conv_sites(net):
    """``({site: [module paths]}, levels)`` of an LDM UNet (``net``: the diffusion model or a ModelPatcher), sites
    named as in diffusers (``down_blocks.1``, ``down_blocks.1.downsamplers``, ``mid_block``, ``up_blocks.0``,
    ``up_blocks.0.upsamplers``), found by walking the blocks: ResBlocks give ``in_layers.2`` (diffusers' conv1)
    and ``out_layers.3`` (conv2); a Downsample's ``op`` or an Upsample's ``conv`` closes its level."""
    net = getattr(getattr(net, "model", None), "diffusion_model", net)
    if not isinstance(net, UNetModel):
        raise UnsupportedModel(f"re-dilation serves UNets (SD1.5, SD2.x, SDXL), not {type(net).__name__}")
    sites = {}

    def add(site, layer, path, names):
        if isinstance(layer, ResBlock) and layer.updown:
            raise UnsupportedModel("this UNet resamples inside its ResBlocks (resblock_updown), which the "
                                   "re-dilation tables do not describe")
        for name in names:
            conv = layer.get_submodule(name)
            while isinstance(conv, RedilatedConv):  # another patch's wrapper (of a loaded clone, or chained)
                conv = conv.wrapped
            if not isinstance(conv, torch.nn.Conv2d):
                raise UnsupportedModel(f"{path}.{name} is a {type(conv).__name__}, not a 2-D convolution: "
                                       f"re-dilation serves image UNets")
            sites.setdefault(site, []).append(f"{path}.{name}")

    level = 0
    for n, block in enumerate(net.input_blocks[1:], start=1):
        if isinstance(block[0], ResBlock):
            add(f"down_blocks.{level}", block[0], f"input_blocks.{n}.0", ("in_layers.2", "out_layers.3"))
        elif isinstance(block[0], Downsample):
            if block[0].use_conv:
                add(f"down_blocks.{level}.downsamplers", block[0], f"input_blocks.{n}.0", ("op",))
            level += 1
    for i, layer in enumerate(net.middle_block or ()):
        if isinstance(layer, ResBlock):
            add("mid_block", layer, f"middle_block.{i}", ("in_layers.2", "out_layers.3"))
    up = 0
    for n, block in enumerate(net.output_blocks):
        for i, layer in enumerate(block):
            if isinstance(layer, ResBlock):
                add(f"up_blocks.{up}", layer, f"output_blocks.{n}.{i}", ("in_layers.2", "out_layers.3"))
            elif isinstance(layer, Upsample):
                if layer.use_conv:
                    add(f"up_blocks.{up}.upsamplers", layer, f"output_blocks.{n}.{i}", ("conv",))
                up += 1
    return sites, level + 1


class RedilatedConv(torch.nn.Module):
    """Stands in a Conv2d's place. It holds the conv's own parameter and buffer dicts and reads and writes every
    other attribute through to the conv, so the model's keys stay the conv's and ComfyUI's weight patches (LoRA),
    casts and offloading act on it as before. The running evaluation says (factor, dispersed) to run at, None: the
    wrapped conv runs unchanged."""
    _OWN = ("wrapped", "path", "net", "training")

    def __init__(self, wrapped, path, net):
        super().__init__()
        for name, value in (("wrapped", wrapped), ("path", path), ("net", weakref.ref(net)),
                            ("_parameters", wrapped._parameters), ("_buffers", wrapped._buffers)):
            object.__setattr__(self, name, value)  # the conv is no child module: its keys stay where they were

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.wrapped, name, value)

    def __delattr__(self, name):
        delattr(self.wrapped, name)

    def forward(self, x, *args, **kwargs):
        setting = _factor_of(self.net(), self.path)
        if setting is None:
            return self.wrapped(x, *args, **kwargs)
        factor, dispersed = setting
        run = redilation.dispersed_conv if dispersed else redilation.redilated_conv
        conv = self.wrapped
        if getattr(conv, "comfy_cast_weights", False) or getattr(conv, "weight_function", None) \
                or getattr(conv, "bias_function", None):
            weight, bias, offload = comfy.ops.cast_bias_weight(conv, x, offloadable=True)
            try:
                return run(x, weight, bias, factor, conv.stride, conv.groups)
            finally:
                comfy.ops.uncast_bias_weight(conv, weight, bias, offload)
        return run(x, conv.weight, conv.bias, factor, conv.stride, conv.groups)


# UNet -> the state of the re-dilation run evaluating it. ComfyUI keeps one clone's object patches on shared weights,
# so the wrappers in place may be another clone's: they read what to do from here, not from the clone that made them.
_RUNNING = weakref.WeakKeyDictionary()


def _factor_of(net, path):
    """(factor, dispersed) the running evaluation gives the conv at ``path``, or None; counted per path."""
    state = _RUNNING.get(net)
    factors = None if state is None else state.factors
    factor = None if factors is None else factors.get(path)
    if factor is not None:
        state.conv_calls[path] = state.conv_calls.get(path, 0) + 1
    return factor


def redilate_convolutions(model, scope, paths, choose):
    """Wrap the convolutions at ``paths`` (relative to the diffusion model) of the clone ``model``; on each model
    evaluation of a run, ``choose(state, sigma, weak)`` gives ``{path: (factor, dispersed)}`` or None (all run
    unchanged; paths left out too),
    ``weak`` being True in the passes ``predict_weak_uncond`` makes. During the evaluation ``state.factors``
    holds that choice; each re-dilated call is counted in ``state.conv_calls[path]``."""
    net = model.model.diffusion_model
    for path in paths:
        conv = model.get_model_object(_ROOT + path)
        while isinstance(conv, RedilatedConv):  # another clone's wrapper while its patches are on the weights
            conv = conv.wrapped
        model.add_object_patch(_ROOT + path, RedilatedConv(conv, path, net))

    def apply_model(executor, x, t, *args, **kwargs):
        state = scope.state
        if state is None:
            return executor(x, t, *args, **kwargs)
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        outer, outer_running = state.factors, _RUNNING.get(net)
        state.factors = choose(state, t.max(), bool(options.get(scope.key)))
        if state.factors and not isinstance(net.get_submodule(next(iter(state.factors))), RedilatedConv):
            raise UnsupportedModel(SHARED_WEIGHTS.format(title="ScaleCrafter"))
        _RUNNING[net] = state
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            state.factors = outer
            if outer_running is None:
                _RUNNING.pop(net, None)
            else:
                _RUNNING[net] = outer_running
    model.add_wrapper_with_key(Wrappers.APPLY_MODEL, scope.key, apply_model)


def predict_weak_uncond(args, scope):
    """In a post-CFG function: the unconditional denoised prediction of this step once more, with the wrappers
    of ``scope`` told that this is the weak pass."""
    options = dict(args["model_options"])
    options["transformer_options"] = {**options.get("transformer_options", {}), scope.key: True}
    return comfy.samplers.calc_cond_batch(args["model"], [args["uncond"]], args["input"], args["sigma"], options)[0]
