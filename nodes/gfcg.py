"""Gradient-Free Classifier Guidance as a MODEL -> MODEL patch: a judge reads each clean estimate, and the
prediction is pushed away from the class the sample is most confused with."""
import logging
from collections import Counter
from types import SimpleNamespace

import torch

from ..guidance_ops import gfcg, judges
from ..guidance_ops.pag import in_window
from . import host
from .base import ModelPatchNode, prompt_lines

log = logging.getLogger("trainfree")
BUILT_IN_TIMESTEPS = 4


class TrainFreeGFCG(ModelPatchNode):
    DESCRIPTION = ("Gradient-Free Classifier Guidance (Shenoy et al., WACV 2026): at each guided evaluation a judge "
                   "reads the clean estimate (no gradients), picks the class it confuses the sample with most (the "
                   "reference) and a scale from its confidence, and the prediction is pushed away from the "
                   "reference class's prompt: D = D + s (D(prompt) - D(reference prompt)). One extra conditional "
                   "pass per guided evaluation (rows with the same reference share it), plus the judge's own cost. "
                   "Works with CFG (complementary) and at cfg 1.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Any model (SD1.5, SDXL, SD3, Flux)."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder, for the class prompts."}),
            "class_prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na photo of a dog",
                                         "tooltip": "One prompt per class (at least two). With a connected image "
                                                    "judge, one per judge label in the judge's order (the digit "
                                                    "oracle: zero to nine)."}),
            "target_class": ("STRING", {"default": "1", "tooltip":
                                        "The class the image should show: a class prompt's text or its line "
                                        "number (from 1); with an image judge also its label (e.g. 'seven')."}),
            "scale": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip":
                                "The largest guidance scale; the scale used is scale * p_ref / (p_target + p_ref) "
                                "(this pack's choice, see README). 0 turns GFCG off."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Guide from this point of the schedule (0 = first step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Guide until this point of the schedule (1 = last step). Outside the "
                                                 "window neither the judge nor the extra pass runs."}),
        }, "optional": {
            "judge": ("TRAINFREE_JUDGE", {"tooltip": "What classifies the estimates. Unconnected: the Diffusion "
                                                     f"Classifier over the class prompts, {BUILT_IN_TIMESTEPS} "
                                                     "timesteps (connect a Prompt Judge to choose others), or "
                                                     "the Digit Oracle Judge on the reference models."}),
            "vae": ("VAE", {"tooltip": "The model's VAE; needed by (and only by) judges that read pixels."}),
        }}

    def patch(self, model, clip, class_prompts, target_class, scale, start_percent, end_percent, judge=None,
              vae=None):
        texts = prompt_lines(class_prompts, "class_prompts")
        if len(texts) < 2:
            raise ValueError("class_prompts needs at least two classes (one prompt per line): the target and "
                             "the classes it can be confused with")
        class_conditionings = [host.encode_text(clip, text) for text in texts]
        if judge is None:
            judge = judges.PromptJudge(texts, BUILT_IN_TIMESTEPS, 0)
            judge.conditionings = host.PatchInput(class_conditionings)
        if len(judge.labels) != len(texts):
            raise ValueError(f"the judge has {len(judge.labels)} labels ({', '.join(judge.labels)}) but there are "
                             f"{len(texts)} class prompts: write one class prompt per label, in the judge's order")
        if judge.reads == "pixels" and vae is None:
            raise ValueError(f"the judge ({type(judge).__name__}) reads pixels: connect the model's VAE to vae")
        if judge.reads != "pixels" and vae is not None:
            raise ValueError("vae is only read by judges that read pixels, and this judge reads the model: "
                             "disconnect vae")
        target = self._target(texts, judge, target_class)
        m = model.clone()
        if scale == 0:
            return (m,)
        key = host.new_key("gfcg")

        def start(guider, *_):
            sigma_start, sigma_end = host.sigma_window(guider.model_patcher, start_percent, end_percent)
            return SimpleNamespace(guider=guider, sigma_start=sigma_start, sigma_end=sigma_end, evaluations=0,
                                   guided=0, reference_rows=0, references=Counter(), scale_sum=0.0)

        def post_cfg(args):
            run = scope.state
            if run is None:
                return args["denoised"]
            run.evaluations += 1
            if not in_window(args["sigma"], run.sigma_start, run.sigma_end):
                return args["denoised"]
            denoised, x, sigma = args["denoised"], args["input"], args["sigma"]
            options = args["model_options"]
            log_probs = host.judge_log_probs(m, judge, denoised, run.guider, key, options, vae)
            reference, p_target, p_reference = gfcg.reference_classes(log_probs.to(denoised.device), target)
            scales = gfcg.adaptive_scale(p_target, p_reference, scale)
            reference_prediction = torch.empty_like(denoised)
            sigmas = torch.as_tensor(sigma, device=x.device).flatten().expand(x.shape[0])
            for index in reference.unique().tolist():
                rows = reference == index
                reference_prediction[rows] = host.predict_prompt(m, run.guider, f"{key}/class", index, x[rows],
                                                                 sigmas[rows], options)
                run.references[texts[index]] += int(rows.sum())
            run.guided += 1
            run.reference_rows += x.shape[0]
            run.scale_sum += float(scales.mean())
            return gfcg.guide(denoised, args["cond_denoised"], reference_prediction, scales)

        def finish(run):
            report = {"evaluations": run.evaluations, "guided": run.guided, "reference_rows": run.reference_rows,
                      "references": dict(run.references),
                      "mean_scale": run.scale_sum / run.guided if run.guided else 0.0}
            log.info("TrainFree GFCG: guided %d of %d evaluations (%d reference rows), mean scale %.3f, "
                     "reference classes %s", run.guided, run.evaluations, run.reference_rows, report["mean_scale"],
                     dict(run.references))
            return report

        scope = host.RunScope(m, key, start, finish)
        host.prepare_prompts(m, f"{key}/class", class_conditionings)
        host.prepare_judge(m, key, judge)
        host.add_post_cfg(m, post_cfg)
        return (m,)

    @staticmethod
    def _target(texts, judge, target_class):
        lowered = [t.lower() for t in texts]
        if target_class.strip().lower() in lowered:
            return lowered.index(target_class.strip().lower())
        try:
            return judges.target_index(judge, target_class)
        except judges.JudgeError:
            raise ValueError(f"target_class '{target_class}' names no class: name a class prompt's text or line "
                             f"number (1 to {len(texts)})"
                             + (f", or one of the judge's labels ({', '.join(judge.labels)})"
                                if tuple(judge.labels) != tuple(texts) else "")) from None


NODE_CLASS_MAPPINGS = {"TrainFreeGFCG": TrainFreeGFCG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeGFCG": "Gradient-Free Classifier Guidance (TrainFree)"}
