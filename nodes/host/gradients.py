"""Gradients through the model inside ComfyUI, which runs every node under ``torch.inference_mode()``.

Autograd cannot keep inference tensors for the backward pass, and a model loaded by a node has inference-tensor
weights. ``trainable(model)`` gives a clone whose layers hand the forward pass an ordinary copy of each weight
(a weight wrapper, ComfyUI's own hook for modifying weights at use), made layer by layer as the forward pass
goes, so the backward pass can keep them; the stored weights are untouched. Evaluations that need gradients
run inside ``differentiating(model, title)``.
"""
import contextlib

import torch

from .family import FAMILY_NAMES, UnsupportedModel, model_family


def _ordinary(weight):
    if weight.is_inference() and not torch.is_inference_mode_enabled():
        return weight.clone()
    return weight


def trainable(model):
    """A clone of ``model`` whose forward passes can be differentiated (outside inference mode)."""
    clone = model.clone()
    for key, models in list(clone.additional_models.items()):
        # a model attached for a patch (a guide, a weak model) that shares these weights would be loaded after
        # this clone and leave its own, unwrapped weights in place; the evaluations that need gradients never use it
        clone.set_additional_models(key, [m for m in models if m.model is not clone.model])
    for name, module in clone.model.named_modules():
        if not hasattr(module, "comfy_cast_weights"):
            continue
        for part in ("weight", "bias"):
            if getattr(module, part, None) is not None:
                clone.add_weight_wrapper(f"{name}.{part}" if name else part, _ordinary)
    return clone


@contextlib.contextmanager
def differentiating(model, title):
    """Gradients enabled; a model whose layers this ComfyUI cannot differentiate (a fused kernel without a
    gradient, a weight outside ComfyUI's layers) gets a clear refusal instead of autograd's error."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    except RuntimeError as error:
        text = str(error)
        if not any(sign in text for sign in ("backward", "autograd", "Inference tensors")):
            raise
        family = FAMILY_NAMES.get(model_family(model), type(model.model.diffusion_model).__name__)
        raise UnsupportedModel(f"{title} needs gradients through the model, and this ComfyUI cannot differentiate "
                               f"{family} ({text.splitlines()[0][:120]}). Use negative-prompt inversion "
                               f"(TrainFree Sample From Inversion, 'negative-prompt inversion') or, for flow "
                               f"models, FlowOpt, which need no gradients.") from error

