"""Two-model guidance (autoguidance; NPO / Self-NPO style negative models) as a MODEL -> MODEL patch."""
import logging
from types import SimpleNamespace

from . import host
from .base import ModelPatchNode

log = logging.getLogger("trainfree")
MODES = ("autoguidance (guide gets the prompt)", "negative model (guide gets the negative prompt)")


class TrainFreeTwoModelGuidance(ModelPatchNode):
    DESCRIPTION = ("Guidance from a second model. Autoguidance (Karras et al., NeurIPS 2024): D = D_guide(c) + "
                   "w (D_main(c) - D_guide(c)) with a weaker version of the model as guide (paper w about 2). "
                   "NPO / Self-NPO style: the guide is a model tuned towards what you do not want and sees the "
                   "negative prompt in place of the main model's unconditional pass. w is the sampler's cfg. The "
                   "guide's pass replaces the unconditional pass, so the cost stays that of CFG.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The main model."}),
            "guide_model": ("MODEL", {"tooltip": "The guiding model: a smaller / less trained checkpoint of the same "
                                                 "family (autoguidance), or a negative (NPO) model from its own "
                                                 "loader. It must share the main model's latent space and "
                                                 "conditioning."}),
            "mode": (list(MODES), {"default": MODES[0],
                                   "tooltip": "Which prompt the guide sees: the positive one (autoguidance) or the "
                                              "negative one (negative model in CFG's unconditional slot)."}),
        }}

    def patch(self, model, guide_model, mode):
        if host.model_family(model) != host.model_family(guide_model) or (
                host.is_flow_model(model) != host.is_flow_model(guide_model)):
            raise host.UnsupportedModel("the guide model is of another family than the main model; both must share "
                                        "latent space and conditioning")
        if guide_model is model:
            raise ValueError("the guide model is the main model itself, which makes the guidance zero; connect a "
                             "weaker checkpoint or a negative model")
        m = model.clone()

        def finish(run):
            log.info("TrainFree two-model guidance: %d guide passes", run.guide_passes)
            return {"guide_passes": run.guide_passes}

        scope = host.RunScope(m, host.new_key("two_model"),
                              lambda *_: SimpleNamespace(main_pending=False, guide_passes=0), finish)
        host.replace_uncond_with_guide(m, guide_model, scope, use_negative_prompt=mode == MODES[1])
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeTwoModelGuidance": TrainFreeTwoModelGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeTwoModelGuidance": "Two-Model Guidance: Autoguidance / NPO (TrainFree)"}
