"""Two-model guidance (autoguidance; NPO / Self-NPO style negative models) as a MODEL -> MODEL patch."""
import logging
from types import SimpleNamespace

from ..guidance_ops import two_model
from . import host
from .base import ModelPatchNode

log = logging.getLogger("trainfree")
MODES = ("autoguidance (guide gets the prompt)", "negative model (guide gets the negative prompt)",
         "SINE (guide is a fine-tuned model mixed into the prompt branch)")


class TrainFreeTwoModelGuidance(ModelPatchNode):
    DESCRIPTION = ("Guidance from a second model. Autoguidance (Karras et al., NeurIPS 2024): D = D_guide(c) + "
                   "w (D_main(c) - D_guide(c)) with a weaker version of the model as guide (paper w about 2). "
                   "NPO / Self-NPO style: the guide is a model tuned towards what you do not want and sees the "
                   "negative prompt in place of the main model's unconditional pass; in these two modes the guide's "
                   "pass replaces the unconditional pass, so the cost stays that of CFG. SINE (Zhang et al., CVPR "
                   "2023): while the timestep is above K the conditional branch is v * D(c) + (1 - v) * "
                   "D_finetuned(c_hat), where c_hat (sine_prompt) is the prompt the guide was fine-tuned with; one "
                   "extra guide pass per such step. w is the sampler's cfg.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The main model."}),
            "guide_model": ("MODEL", {"tooltip": "The guiding model: a smaller / less trained checkpoint of the same "
                                                 "family (autoguidance), or a negative (NPO) model from its own "
                                                 "loader. It must share the main model's latent space and "
                                                 "conditioning."}),
            "mode": (list(MODES), {"default": MODES[0],
                                   "tooltip": "autoguidance: the guide sees the prompt and replaces the "
                                              "unconditional pass. negative model: it sees the negative prompt "
                                              "there. SINE: a model fine-tuned on one image is mixed into the "
                                              "prompt branch early in sampling."}),
        }, "optional": {
            "sine_weight": ("FLOAT", {"default": two_model.SINE_V, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "SINE only: v, the main model's share of the prompt branch "
                                                 "(paper 0.7)."}),
            "sine_until_timestep": ("INT", {"default": two_model.SINE_K, "min": 0, "max": 1000,
                                            "tooltip": "SINE only: K; the fine-tuned model takes part while the "
                                                       "timestep (0-1000) is above it (paper 400)."}),
            "sine_prompt": ("CONDITIONING", {"tooltip": "SINE only, and required there: the fine-tuned model's own "
                                                        "prompt c_hat, the source image's prompt with the rare token "
                                                        "it was fine-tuned on (e.g. 'a photo of sks dog'). The main "
                                                        "model keeps the sampler's positive prompt (the edit)."}),
        }}

    def patch(self, model, guide_model, mode, sine_weight=two_model.SINE_V, sine_until_timestep=two_model.SINE_K,
              sine_prompt=None):
        host.require_same_family(model, guide_model, "guide_model")
        if guide_model is model:
            raise ValueError("the guide model is the main model itself, which makes the guidance zero; connect a "
                             "weaker checkpoint or a negative model")
        sine = mode == MODES[2]
        if sine and sine_prompt is None:
            raise ValueError("SINE needs the fine-tuned model's own prompt: connect to sine_prompt a CLIPTextEncode "
                             "of the source image's prompt with the rare token the guide model was fine-tuned on")
        if not sine and sine_prompt is not None:
            raise ValueError(f"sine_prompt is only used in SINE mode, not in '{mode}': disconnect it or choose the "
                             f"SINE mode")
        m = model.clone()

        def finish(run):
            log.info("TrainFree two-model guidance: %d guide passes", run.guide_passes)
            return {"guide_passes": run.guide_passes}

        scope = host.RunScope(m, host.new_key("two_model"),
                              lambda guider, *_: SimpleNamespace(main_pending=False, guide_passes=0, guider=guider),
                              finish)
        if sine:
            host.attach_model(m, scope.key, guide_model)
            host.add_run_conditioning(m, scope.key, sine_prompt)
            host.add_post_cfg(m, self._sine(scope, guide_model, m, sine_weight, sine_until_timestep))
        else:
            host.replace_uncond_with_guide(m, guide_model, scope, use_negative_prompt=mode == MODES[1])
        return (m,)

    @staticmethod
    def _sine(scope, guide, model, v, k):
        def post_cfg(args):
            run = scope.state
            if run is None or args["uncond"] is None or not two_model.sine_active(
                    host.sigma_to_timestep(model, args["sigma"]), k):
                return args["denoised"]
            own_prompt = host.run_conditioning(run.guider, scope.key)
            finetuned = host.predict_with(guide, own_prompt, args["input"], args["sigma"])
            run.guide_passes += 1
            cond, uncond, scale = args["cond_denoised"], args["uncond_denoised"], args["cond_scale"]
            sine = two_model.sine_guidance(cond, finetuned, uncond, scale, v)
            return args["denoised"] + (sine - (uncond + (cond - uncond) * scale))
        return post_cfg


NODE_CLASS_MAPPINGS = {"TrainFreeTwoModelGuidance": TrainFreeTwoModelGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeTwoModelGuidance": "Two-Model Guidance: Autoguidance / NPO (TrainFree)"}
