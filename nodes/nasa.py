"""Negative-Away Steer Attention (SNOOPI's NASA) as a MODEL -> MODEL patch for SD1.5, SDXL, SD3 and Flux."""
import logging
from dataclasses import dataclass, field

from ..guidance_ops import nasa
from ..guidance_ops.pag import in_window
from . import host
from .base import ModelPatchNode

log = logging.getLogger("trainfree")

FAMILIES = tuple(nasa.DEFAULT_ALPHA)
AUTO = -1.0


@dataclass
class NASARun:
    sigma_start: float
    sigma_end: float
    modules: dict
    active: bool = False
    evaluations: int = 0
    steered: int = 0
    hits: dict = field(default_factory=dict)
    projections: dict = field(default_factory=dict)  # K- / V- per layer, device and dtype; dropped with the run
    main_pending: bool = False  # DiTs: the negative-text row rides on the sampler's main evaluation
    extra_output: object = None
    extra_passes: int = 0


def negative_embedding(conditioning, model):
    """The negative prompt's token embedding, refused when the model cannot read it."""
    if not conditioning or len(conditioning) != 1:
        raise ValueError(f"input 'negative' holds {len(conditioning or [])} conditionings; NASA reads exactly one "
                         f"negative prompt: join several with ConditioningConcat, or encode one prompt")
    tensor = conditioning[0][0]
    if getattr(tensor, "ndim", 0) != 3:
        raise ValueError("input 'negative' holds no token embedding [batch, tokens, width]: connect a "
                         "CLIPTextEncode (or similar) output")
    width = host.context_width(model)
    if tensor.shape[-1] != width:
        raise ValueError(f"input 'negative' has tokens of width {tensor.shape[-1]}, but this model "
                         f"({host.FAMILY_NAMES[host.model_family(model)]}) reads text of width {width}: encode the "
                         f"negative prompt with this model's own text encoder")
    return tensor.detach()


class TrainFreeNASA(ModelPatchNode):
    DESCRIPTION = ("Negative-Away Steer Attention (SNOOPI, Nguyen et al. ICCV 2025): every cross-attention "
                   "layer also attends to the negative prompt with its own key / value weights and subtracts "
                   "alpha times that output. Negative prompts for one / few-step models sampled at cfg 1, in "
                   "a single forward pass on SD1.5 / SDXL; on SD3 / Flux one more batch row per step carries "
                   "the negative text through the joint attention.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5, SDXL (or other SD UNet), SD3 or Flux model; meant for "
                                           "one / few-step (distilled) models sampled at cfg 1."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt to steer away from, encoded with this "
                                                     "model's text encoder (one prompt). Only its token "
                                                     "embedding is used; its pooled output is not."}),
            "alpha": ("FLOAT", {"default": AUTO, "min": AUTO, "max": 2.0, "step": 0.01, "round": 0.001,
                                "tooltip": "Steering weight alpha: each cross-attention outputs Z+ - alpha Z-. "
                                           "-1 = auto per family: 0.1 SD1.5 and 0.2 other SD UNets such as SD2.1 "
                                           "(the paper's), 0.3 SDXL, 0.5 SD3 / Flux (this pack's; the paper "
                                           "sweeps 0-1 there and uses 0.5 on the DiT PixArt-alpha). Too large "
                                           "lets the negative features dominate. 0 = off."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Steer from this point of the schedule (0 = first step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Steer until this point of the schedule (1 = last step). "
                                                 "Outside the window the model runs unchanged (on SD3 / Flux "
                                                 "without the extra row)."}),
        }}

    def patch(self, model, negative, alpha, start_percent, end_percent):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): swap them")
        family = host.require_family(model, "TrainFree NASA", FAMILIES)
        embedding = negative_embedding(negative, model)
        weight = nasa.default_alpha(family) if alpha == AUTO else alpha
        if weight < 0:
            raise ValueError(f"input 'alpha' is {alpha}: enter -1 for the family default or a weight from 0 to 2")
        m = model.clone()
        if weight == 0:
            return (m,)
        key = host.new_key("nasa")

        def start(guider, *_):
            patcher = guider.model_patcher
            return NASARun(*host.sigma_window(patcher, start_percent, end_percent),
                           host.cross_attention_modules(patcher, m))

        def on_evaluation(run, sigma):
            run.evaluations += 1
            run.active = in_window(sigma, run.sigma_start, run.sigma_end)
            run.steered += run.active

        def finish(run):
            report = {"alpha": weight, "layers": len(layers), "evaluations": run.evaluations,
                      "steered_evaluations": run.steered, "extra_rows": run.extra_passes,
                      "layer_calls": sum(run.hits.values()), "layers_hit": len(run.hits)}
            log.info("TrainFree NASA: alpha %.3g on %d cross-attention layers; %d of %d model evaluations steered "
                     "(%d negative-text rows)", weight, len(layers), run.steered, run.evaluations, run.extra_passes)
            return report

        scope = host.RunScope(m, key, start, finish)
        host.count_evaluations(m, scope, on_evaluation)
        layers = host.steer_cross_attention(m, embedding, weight, scope)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeNASA": TrainFreeNASA}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeNASA": "Negative-Away Steer Attention (NASA) (TrainFree)"}
