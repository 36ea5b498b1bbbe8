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
# How a DiT's joint text + image attention is perturbed: diffusers' PAGJointAttnProcessor2_0 (the default) or
# this pack's earlier identity over the whole sequence.
KEEP_TEXT, WHOLE_SEQUENCE = "image-only (diffusers)", "whole sequence"
DIT_MODES = (KEEP_TEXT, WHOLE_SEQUENCE)


@dataclass
class PAGRun:
    sigma_start: float
    sigma_end: float
    timestep_of: object
    sampling: object
    evaluations: int = 0
    extra_passes: int = 0
    skipped: int = 0
    hits: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)  # the host's keep-text masks of this run, per token layout
    main_pending: bool = False
    extra_output: object = None


class TrainFreePAG(ModelPatchNode):
    DESCRIPTION = ("Perturbed-Attention Guidance (Ahn et al. 2024): guides away from a prediction whose chosen "
                   "self-attention maps are replaced by the identity (on SD3 / Flux, by default only the "
                   "image-to-image part of the joint attention, as diffusers does). One extra conditional pass per "
                   "guided step, batched with CFG's own passes. Works with CFG, with core patches and with itself.")

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
                                                    "of timestep below 1000, s_t = max(0, s - a(1000 - t)) (t: the "
                                                    "discrete timestep on SD, sigma x 1000 on SD3 / Flux). "
                                                    "0 = constant scale (paper)."}),
            "rescale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Guidance rescale phi (Lin et al., as diffusers' guidance_rescale): "
                                             "pull the std of the guided noise prediction (eps, v or flow "
                                             "velocity, the model's own output) back towards the conditional "
                                             "one's, against over-exposure. Acts on the whole guided result "
                                             "(CFG + PAG); unlike diffusers also at cfg 1. 0 = off (paper)."}),
            "dit_mode": (list(DIT_MODES), {
                "default": KEEP_TEXT,
                "tooltip": "SD3 / Flux only, where self-attention is joint over text and image tokens. "
                           "'image-only (diffusers)': only the image-to-image part of the attention map becomes the "
                           "identity; image tokens still read the prompt and text tokens attend as usual (diffusers' "
                           "SD3 PAG). 'whole sequence': the whole joint sequence gets the identity, so the perturbed "
                           "layer also loses the prompt (stronger, partly acts like CFG; this pack's earlier "
                           "default). SD1.5 / SDXL self-attention holds no text: leave the default there."}),
        }}

    def patch(self, model, scale, layers, start_percent, end_percent, adaptive_scale=0.0, rescale=0.0,
              dit_mode=KEEP_TEXT):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): swap them")
        family = host.require_family(model, "TrainFree PAG", tuple(DEFAULT_LAYERS))
        if dit_mode not in DIT_MODES:
            raise ValueError(f"input 'dit_mode' is {dit_mode!r}: choose one of {', '.join(DIT_MODES)}")
        if dit_mode != KEEP_TEXT and family not in host.DIT_FAMILIES:
            raise ValueError(f"input 'dit_mode' is {dit_mode!r}, but this is {host.FAMILY_NAMES[family]}, whose "
                             f"self-attention holds image tokens only, so there is no text to keep or perturb: set "
                             f"dit_mode to {KEEP_TEXT!r}")
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
            return PAGRun(*host.sigma_window(patcher, start_percent, end_percent),
                          lambda sigma: host.sigma_to_timestep(patcher, sigma), host.model_sampling(patcher))

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
            if not rescale:
                return guided
            to_prediction, to_denoised = host.prediction_space(run.sampling, args["sigma"], args["input"])
            return to_denoised(pag.rescale_to_reference(to_prediction(guided), to_prediction(cond), rescale))

        def finish(run):
            report = {"evaluations": run.evaluations, "extra_passes": run.extra_passes, "skipped": run.skipped,
                      "hits": dict(run.hits)}
            log.info("TrainFree PAG: %d extra passes in %d model evaluations (%d outside the window), layers %s",
                     run.extra_passes, run.evaluations, run.skipped,
                     ", ".join(layer_name(*s) for s in selected))
            return report

        scope = host.RunScope(m, key, start, finish)
        host.perturb_self_attention(m, selected, scope, keep_text=dit_mode == KEEP_TEXT)
        host.add_extra_cond_pass(m, scope, wanted)
        host.add_post_cfg(m, post_cfg)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreePAG": TrainFreePAG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreePAG": "Perturbed-Attention Guidance (TrainFree)"}
