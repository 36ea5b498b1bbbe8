"""StreamDiffusion's residual CFG as a MODEL -> MODEL patch: guidance with no (or one) unconditional pass."""
import logging
from types import SimpleNamespace

from ..guidance_ops import residual_cfg
from . import host
from .base import ModelPatchNode, model_input

log = logging.getLogger("trainfree")
MODES = ("one-time negative", "self-negative")


class TrainFreeResidualCFG(ModelPatchNode):
    DESCRIPTION = ("Residual CFG (StreamDiffusion, Kodaira et al. 2023): replaces the unconditional pass by a "
                   "'virtual residual noise' that points back to an anchor latent. Self-negative: the anchor is the "
                   "input latent (img2img), no unconditional pass at all. One-time negative: the anchor is the first "
                   "step's real unconditional prediction, one pass for the whole run. The sampler's cfg is gamma "
                   "(paper 1.2). Valid for few-step (LCM / Turbo) img2img; on long txt2img runs the anchor is not "
                   "a negative prompt and the result differs from CFG. Logs the passes it saved.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "mode": (list(MODES), {"default": MODES[0],
                                   "tooltip": "one-time negative: one real unconditional pass at the first step. "
                                              "self-negative: none; the anchor is the input latent."}),
            "delta": ("FLOAT", {"default": residual_cfg.DELTA, "min": 0.0, "max": 2.0, "step": 0.01,
                                "tooltip": "delta: strength of the virtual residual noise (1 = paper default; "
                                           "above 1 pushes further from the anchor)."}),
        }}

    def patch(self, model, mode, delta):
        m = model.clone()
        flow = host.is_flow_model(m)
        one_time = mode == MODES[0]

        def start(guider, noise, latent_image, *_):
            source = None if one_time else host.process_latent_in(guider.model_patcher, latent_image)
            return SimpleNamespace(anchors={}, source=source, current=None, evaluations=0, saved=0, virtual=False)

        def anchor_at(run, x):
            """The anchor of this latent size: a cascade (FreCaS) samples one run at several sizes, and each size
            gets its own one-time negative, or the source latent resized to it."""
            size = tuple(x.shape[2:])
            if size not in run.anchors:
                run.anchors[size] = residual_cfg.ResidualCFGState()
                if run.source is not None:
                    run.anchors[size].keep_source(residual_cfg.resized(run.source, size))
            return run.anchors[size]

        def choose(run, sigma, x, model_options, sampler_cfg):
            run.evaluations += 1
            run.current = anchor_at(run, x)
            run.virtual = run.current.ready and sampler_cfg != 1.0
            if not run.virtual:
                return None
            run.saved += not host.uncond_pass_runs(model_options)
            return 1.0

        def capture_uncond(args):
            run = scope.state
            if run is None or not one_time or args["uncond"] is None:
                return args["denoised"]
            anchor = anchor_at(run, args["input"])
            if not anchor.ready:
                anchor.keep_uncond(args["uncond_denoised"])
            return args["denoised"]

        def after(run, denoised, sigma, x, sampler_cfg):
            if not run.virtual:
                return denoised
            anchor = run.current.anchor.to(denoised.device)
            return residual_cfg.residual_cfg(denoised, x, sigma, sampler_cfg, anchor, delta, flow)

        def finish(run):
            log.info("TrainFree residual CFG (%s): %d of %d unconditional passes saved", mode, run.saved,
                     run.evaluations)
            return {"evaluations": run.evaluations, "saved_passes": run.saved}

        scope = host.RunScope(m, host.new_key("residual_cfg"), start, finish)
        host.add_post_cfg(m, capture_uncond)
        host.override_cfg_per_evaluation(m, scope, choose, after, title="TrainFree Residual CFG")
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeResidualCFG": TrainFreeResidualCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeResidualCFG": "Residual CFG (TrainFree)"}
