"""Guidance interval as a MODEL -> MODEL patch: CFG only at mid-range noise levels; no unconditional pass outside."""
import logging
import math
from types import SimpleNamespace

from ..guidance_ops import interval
from . import host
from .base import ModelPatchNode, model_input

log = logging.getLogger("trainfree")
_, LOW, HIGH = interval.PRESETS["sdxl"]
NO_LIMIT = 1000.0


class TrainFreeGuidanceInterval(ModelPatchNode):
    DESCRIPTION = ("Guidance interval (Kynkaanniemi et al., NeurIPS 2024): apply CFG only while the noise level "
                   "is inside [sigma_low, sigma_high]; elsewhere the conditional prediction is used alone and the "
                   "unconditional pass is not computed at all. Logs how many passes it saved.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "sigma_low": ("FLOAT", {"default": LOW, "min": 0.0, "max": 1000.0, "step": 0.01,
                                    "tooltip": "Lower end, in EDM sigma units (SD's own sigmas; flow models are "
                                               "converted, sigma_edm = t / (1 - t)). Paper's SDXL value 0.28."}),
            "sigma_high": ("FLOAT", {"default": HIGH, "min": 0.0, "max": NO_LIMIT, "step": 0.01,
                                     "tooltip": f"Upper end, EDM sigma units. Paper's SDXL value 5.42 (with cfg 16 "
                                                f"inside the interval). {NO_LIMIT:g} = no upper limit (a flow "
                                                f"model's first step, pure noise, is at EDM sigma infinity)."}),
        }}

    def patch(self, model, sigma_low, sigma_high):
        if sigma_low > sigma_high:
            raise ValueError(f"sigma_low ({sigma_low}) is above sigma_high ({sigma_high}): swap them")
        m = model.clone()
        flow = host.is_flow_model(m)
        low = interval.comfy_sigma(sigma_low, flow)
        high = math.inf if sigma_high >= NO_LIMIT else interval.comfy_sigma(sigma_high, flow)

        def choose(run, sigma, x, model_options, sampler_cfg):
            run.evaluations += 1
            if interval.guidance_active(sigma, low, high):
                return None
            run.unguided += 1
            run.saved += sampler_cfg != 1.0 and not host.uncond_pass_runs(model_options)
            return 1.0

        def finish(run):
            log.info("TrainFree guidance interval: CFG on %d of %d model evaluations; %d unconditional passes saved",
                     run.evaluations - run.unguided, run.evaluations, run.saved)
            return {"evaluations": run.evaluations, "unguided": run.unguided, "saved_passes": run.saved}

        scope = host.RunScope(m, host.new_key("interval"),
                              lambda *_: SimpleNamespace(evaluations=0, unguided=0, saved=0), finish)
        host.override_cfg_per_evaluation(m, scope, choose, title="TrainFree Guidance Interval")
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeGuidanceInterval": TrainFreeGuidanceInterval}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeGuidanceInterval": "Guidance Interval (TrainFree)"}
