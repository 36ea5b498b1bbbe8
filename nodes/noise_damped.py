"""ScaleCrafter's noise-damped classifier-free guidance as a MODEL -> MODEL patch."""
import logging
from types import SimpleNamespace

from ..guidance_ops import noise_damped
from . import host
from .base import ModelPatchNode

log = logging.getLogger("trainfree")


class TrainFreeNoiseDampedCFG(ModelPatchNode):
    DESCRIPTION = ("Noise-damped CFG (ScaleCrafter, He et al., ICLR 2024): during the early steps the unconditional "
                   "base of CFG comes from a second, weakly modified model while the guidance direction comes from "
                   "the strongly modified one: D = D_u(weak) + w (D_c - D_u)(strong). ScaleCrafter pairs a strongly "
                   "re-dilated UNet with a weakly re-dilated one for high resolutions; any two models of one family "
                   "work. Costs one extra unconditional pass of the weak model per damped step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The strongly modified model (its conditional and unconditional "
                                           "predictions give the guidance direction)."}),
            "weak_model": ("MODEL", {"tooltip": "The weakly modified (or unmodified) model of the same family that "
                                                "provides the unconditional base during the damped steps."}),
            "damped_percent": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Share of the schedule, from the start, that is damped. "
                                                    "ScaleCrafter damps the first 35 of 50 steps (0.7)."}),
        }}

    def patch(self, model, weak_model, damped_percent):
        host.require_same_family(model, weak_model, "weak_model")
        m = model.clone()
        key = host.new_key("noise_damped")
        host.attach_model(m, key, weak_model)

        def start(guider, *_):
            return SimpleNamespace(sigma_end=host.percent_to_sigma(guider.model_patcher, damped_percent), passes=0)

        def post_cfg(args):
            run = scope.state
            sigma = float(args["sigma"].flatten()[0])
            if run is None or args["uncond"] is None or sigma <= run.sigma_end:
                return args["denoised"]
            weak_uncond = host.predict_with(weak_model, args["uncond"], args["input"], args["sigma"])
            run.passes += 1
            cond, uncond, scale = args["cond_denoised"], args["uncond_denoised"], args["cond_scale"]
            damped = noise_damped.noise_damped_cfg(cond, uncond, weak_uncond, scale)
            return args["denoised"] + (damped - (uncond + (cond - uncond) * scale))

        def finish(run):
            log.info("TrainFree noise-damped CFG: %d extra passes of the weak model", run.passes)
            return {"weak_passes": run.passes}

        scope = host.RunScope(m, key, start, finish)
        host.add_post_cfg(m, post_cfg)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeNoiseDampedCFG": TrainFreeNoiseDampedCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeNoiseDampedCFG": "Noise-Damped CFG (TrainFree)"}
