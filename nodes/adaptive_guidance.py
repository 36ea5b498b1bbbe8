"""Adaptive Guidance as a MODEL -> MODEL patch: CFG until the guided prediction aligns with the conditional one,
then the conditional prediction alone, with no unconditional pass."""
import logging
from types import SimpleNamespace

from ..guidance_ops import adaptive_guidance as ag
from . import host
from .base import ModelPatchNode, model_input

log = logging.getLogger("trainfree")


class TrainFreeAdaptiveGuidance(ModelPatchNode):
    DESCRIPTION = ("Adaptive Guidance (Castillo et al., AAAI 2025): once the cosine similarity between the "
                   "conditional and the guided denoised prediction reaches the threshold, CFG stops for the rest "
                   "of the run and the unconditional pass is skipped (the paper: about 25% fewer model evaluations "
                   "at CFG's quality). Logs the step it stopped at and the passes saved.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "threshold": ("FLOAT", {"default": ag.PAPER_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.0005,
                                    "tooltip": "gamma-bar: guidance stops once cos(D_cond, D_cfg) >= this, on the "
                                               "denoised predictions (the paper's value 0.991; higher keeps CFG "
                                               "longer). 1 = never stop (plain CFG)."}),
        }}

    def patch(self, model, threshold):
        m = model.clone()

        def choose(run, sigma, x, model_options, sampler_cfg):
            run.evaluations += 1
            if not run.stopped:
                return None
            run.unguided += 1
            run.saved += sampler_cfg != 1.0 and not host.uncond_pass_runs(model_options)
            return 1.0

        def watch(args):
            run = scope.state
            if run is not None and not run.stopped and args["uncond"] is not None \
                    and ag.stops_guidance(args["cond_denoised"], args["denoised"], threshold):
                run.stopped, run.stopped_at = True, run.evaluations
            return args["denoised"]

        def finish(run):
            log.info("TrainFree Adaptive Guidance: CFG %s; %d of %d evaluations unguided, %d unconditional passes "
                     "saved", "kept for the whole run" if not run.stopped else
                     f"stopped after evaluation {run.stopped_at}", run.unguided, run.evaluations, run.saved)
            return {"evaluations": run.evaluations, "stopped_after": run.stopped_at, "unguided": run.unguided,
                    "saved_passes": run.saved}

        scope = host.RunScope(m, host.new_key("adaptive_guidance"),
                              lambda *_: SimpleNamespace(evaluations=0, stopped=False, stopped_at=None, unguided=0,
                                                         saved=0), finish)
        host.override_cfg_per_evaluation(m, scope, choose, title="TrainFree Adaptive Guidance")
        host.add_post_cfg(m, watch)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeAdaptiveGuidance": TrainFreeAdaptiveGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeAdaptiveGuidance": "Adaptive Guidance (TrainFree)"}
