"""Perturbed-Attention Guidance as a MODEL -> MODEL patch for SD1.5, SDXL, SD3 and Flux."""
import logging
from dataclasses import dataclass, field

from ..guidance_ops import pag
from ..guidance_ops.layers import LayerSelectionError, check_layers, layer_name, parse_layers
from . import host
from .base import ModelPatchNode

log = logging.getLogger("trainfree")

# Paper / reference-code defaults (techniques.md §1): SD1.5 and SDXL perturb the middle block (all of its
# transformers); diffusers' SD3 PAG pipeline perturbs transformer block 1, which we also use for Flux.
DEFAULT_LAYERS = {"sd15": "middle.0", "sdxl": "middle.0", "unet": "middle.0", "sd3": "double.1", "flux": "double.1"}


@dataclass
class PAGRun:
    sigma_start: float
    sigma_end: float
    timestep_of: object
    evaluations: int = 0
    extra_passes: int = 0
    skipped: int = 0
    hits: dict = field(default_factory=dict)
    main_pending: bool = False
    extra_output: object = None


class TrainFreePAG(ModelPatchNode):
    DESCRIPTION = ("Perturbed-Attention Guidance (Ahn et al. 2024): guides away from a prediction whose chosen "
                   "self-attention maps are replaced by the identity. One extra conditional pass per guided step, "
                   "batched with CFG's own passes. Works with CFG, with core patches and with itself.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5, SDXL, SD3 or Flux model."}),
            "scale": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                "tooltip": "PAG scale s (paper: 3.0 together with CFG, 5.0 alone). 0 turns PAG "
                                           "off and runs no extra pass."}),
            "layers": ("STRING", {"default": "auto", "multiline": False,
                                  "tooltip": "Self-attention layers to perturb. 'auto' = the paper's choice: "
                                             "middle.0 on SD1.5/SDXL, double.1 on SD3/Flux. UNets: input.N, "
                                             "middle.0, output.N, optionally .T for one transformer (middle.0.3). "
                                             "DiTs: double.N, single.N (Flux). Ranges: double.7-9. Separate "
                                             "entries with commas."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Guide from this point of the schedule (0 = first step). "
                                                   "Outside the window no extra pass runs."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Guide until this point of the schedule (1 = last step)."}),
        }, "optional": {
            "adaptive_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001,
                                         "tooltip": "diffusers' damping: the scale falls by this much per unit "
                                                    "of timestep below 1000, s_t = max(0, s - a(1000 - t)). "
                                                    "0 = constant scale (paper)."}),
            "rescale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Guidance rescale phi: pull the result's std back towards the "
                                             "conditional prediction's to counter over-exposure. 0 = off (paper)."}),
        }}

    def patch(self, model, scale, layers, start_percent, end_percent, adaptive_scale=0.0, rescale=0.0):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): swap them")
        family = host.require_family(model, "TrainFree PAG", tuple(DEFAULT_LAYERS))
        text = DEFAULT_LAYERS[family] if layers.strip().lower() in ("", "auto") else layers
        try:
            selected = check_layers(parse_layers(text), host.attention_layers(model))
        except LayerSelectionError as e:
            raise LayerSelectionError(f"input 'layers': {e}") from None
        m = model.clone()
        if scale == 0:
            return (m,)

        key = host.new_key("pag")

        def start(guider, *_):
            patcher = guider.model_patcher
            return PAGRun(host.percent_to_sigma(patcher, start_percent), host.percent_to_sigma(patcher, end_percent),
                          lambda sigma: host.sigma_to_timestep(patcher, sigma))

        def step_scale(run, sigma):
            return pag.adaptive_scale(scale, adaptive_scale, run.timestep_of(sigma)) if adaptive_scale else scale

        def wanted(run, sigma):
            run.evaluations += 1
            go = pag.in_window(sigma, run.sigma_start, run.sigma_end) and step_scale(run, sigma) > 0
            run.skipped += not go
            return go

        def post_cfg(args):
            run = scope.state
            if run is None or run.extra_output is None:
                return args["denoised"]
            if not run.hits:
                raise RuntimeError(
                    f"TrainFree PAG perturbed none of its layers ({text}): a patch applied after it replaced the "
                    f"same attention without passing it on. Put TrainFree PAG after that patch.")
            cond = args["cond_denoised"]
            guided = pag.pag_guidance(args["denoised"], cond, run.extra_output, step_scale(run, args["sigma"]))
            return pag.rescale_to_reference(guided, cond, rescale)

        def finish(run):
            report = {"evaluations": run.evaluations, "extra_passes": run.extra_passes, "skipped": run.skipped,
                      "hits": dict(run.hits)}
            log.info("TrainFree PAG: %d extra passes in %d model evaluations (%d outside the window), layers %s",
                     run.extra_passes, run.evaluations, run.skipped,
                     ", ".join(layer_name(*s) for s in selected))
            return report

        scope = host.RunScope(m, key, start, finish)
        host.perturb_self_attention(m, selected, scope)
        host.add_extra_cond_pass(m, scope, wanted)
        host.add_post_cfg(m, post_cfg)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreePAG": TrainFreePAG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreePAG": "Perturbed-Attention Guidance (TrainFree)"}
