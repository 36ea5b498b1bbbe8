"""Dynamic CFG from online feedback as a MODEL -> MODEL patch: at each evaluation the candidate guidance scales are
tried on the sampler's own conditional and unconditional predictions, judges score each candidate's clean
estimate, and every image of the batch takes its best-scoring scale."""
import logging
import time
from types import SimpleNamespace

import torch

from ..guidance_ops import dynamic_cfg as dcfg
from ..guidance_ops import judges
from ..guidance_ops.pag import in_window
from . import host
from .base import ModelPatchNode, model_input

log = logging.getLogger("trainfree")
JUDGE = "TRAINFREE_JUDGE"
DEFAULT_SCALES = "1, 3, 5, 7.5, 10"
EXTRA_JUDGES = (2, 3)


def _judge_inputs(n, optional):
    suffix = "" if n == 1 else f"_{n}"
    which = "The" if n == 1 else ("A second" if n == 2 else "A third")
    return {
        f"judge{suffix}": (JUDGE, {"tooltip": f"{which} judge of the candidates' clean estimates (Digit Oracle, "
                                              f"CLIP or Prompt Judge)." + (" Optional." if optional else "")}),
        f"target{suffix}": ("STRING", {"default": "" if optional else "1", "tooltip":
                                       "The label the image should get from this judge: its text (e.g. 'seven' "
                                       "for the digit oracle, the prompt's line for a CLIP or prompt judge) or "
                                       "its number from 1." + (" Leave empty when the judge is not connected."
                                                              if optional else "")}),
        f"weight{suffix}": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05, "tooltip":
                                      "Weight of this judge's log-probability of its target in the score "
                                      "(score = sum of weight * log p(target | estimate))."}),
    }


class TrainFreeDynamicCFG(ModelPatchNode):
    DESCRIPTION = ("Dynamic CFG from online feedback (Papalampidi et al., ICLR 2026): at every model evaluation "
                   "each candidate guidance scale is applied to the conditional and unconditional predictions the "
                   "sampler already has (no extra model pass), the judges score each candidate's one-step clean "
                   "estimate (score = sum of weight * log p(target)), and each image of the batch greedily takes "
                   "its best scale. Outside the window, and for a single candidate, no judge runs. The cost is the "
                   "judges': a VAE decode and a classifier pass per candidate for pixel judges. Logs and reports "
                   "the chosen schedule per image. The paper's trained latent evaluators are not available: see "
                   "the README for what these judges cannot do.")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for n in EXTRA_JUDGES:
            optional.update(_judge_inputs(n, optional=True))
        optional["vae"] = ("VAE", {"tooltip": "The model's VAE: needed by (and only by) judges that read pixels "
                                              "(Digit Oracle, CLIP)."})
        return {"required": {
            "model": model_input(),
            "candidate_scales": ("STRING", {"default": DEFAULT_SCALES, "tooltip":
                                            "Guidance scales to choose from at each evaluation, comma-separated "
                                            "(at most 16). The default spans no guidance (1) to strong (10) in "
                                            "steps a judge can tell apart, with 7.5, SD1.5's usual cfg; the "
                                            "paper's Imagen 3 scales are not public. Each candidate costs one "
                                            "judging per evaluation. Ties go to the sampler's cfg, else to the "
                                            "smallest scale. One scale = a fixed cfg, no judging."}),
            **_judge_inputs(1, optional=False),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                        "Choose scales from this point of the schedule (0 = first step). "
                                        "Outside the window the sampler's cfg is used and no judge runs."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                      "Choose scales until this point of the schedule (1 = last step)."}),
        }, "optional": optional}

    def patch(self, model, candidate_scales, judge, target, weight, start_percent, end_percent, judge_2=None,
              target_2="", weight_2=1.0, judge_3=None, target_3="", weight_3=1.0, vae=None):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): swap them")
        scales = dcfg.parse_scales(candidate_scales)
        panel = self._panel([(judge, target, weight, ""), (judge_2, target_2, weight_2, "_2"),
                             (judge_3, target_3, weight_3, "_3")])
        pixel_judges = [type(j).__name__ for j, _, _ in panel if j.reads == "pixels"]
        if pixel_judges and vae is None:
            raise ValueError(f"the judge {pixel_judges[0]} reads pixels: connect the model's VAE to vae")
        if not pixel_judges and vae is not None:
            raise ValueError("vae is only read by judges that read pixels (Digit Oracle, CLIP), and these judges "
                             "read the model: disconnect vae")
        m = model.clone()
        key = host.new_key("dynamic_cfg")
        keys = [f"{key}/{i}" for i in range(len(panel))]

        def start(guider, noise=None, latent_image=None, sampler=None, sigmas=None, *_):
            sigma_start, sigma_end = host.sigma_window(guider.model_patcher, start_percent, end_percent)
            return SimpleNamespace(guider=guider, sigmas=[] if sigmas is None else sigmas.flatten().tolist(),
                                   sigma_start=sigma_start, sigma_end=sigma_end, evaluations=0,
                                   judged=0, judged_estimates=0, judge_seconds=0.0, schedule=[])

        def technique(cond, uncond, scale, sigma, x, model_options):
            run = scope.state
            if run is None:
                return uncond + (cond - uncond) * scale
            run.evaluations += 1
            rows = cond.shape[0]
            if not in_window(sigma, run.sigma_start, run.sigma_end):
                chosen = torch.full((rows,), float(scale), dtype=torch.float64)
            elif len(scales) == 1:
                chosen = torch.full((rows,), scales[0], dtype=torch.float64)
            else:
                chosen = self._choose(m, panel, keys, run, cond, uncond, scale, scales, model_options, vae)
            s = float(torch.as_tensor(sigma).flatten()[0])
            run.schedule.append({"step": host.step_of(run.sigmas, s) if len(run.sigmas) > 1 else None,
                                 "sigma": s, "scales": chosen.tolist()})
            if bool((chosen == float(scale)).all()):
                return uncond + (cond - uncond) * scale  # plain CFG, bit for bit: the patch adds nothing
            return dcfg.guided(cond, uncond, chosen)

        def finish(run):
            return self._report(run, scales)

        scope = host.RunScope(m, key, start, finish)
        for k, (j, _, _) in zip(keys, panel):
            host.prepare_judge(m, k, j)
        host.add_guidance_delta(m, technique, needs_uncond=any(w != 1.0 for w in scales), with_options=True)
        return (m,)

    @staticmethod
    def _panel(entries):
        panel = []
        for j, target, weight, suffix in entries:
            if j is None:
                if str(target).strip():
                    raise ValueError(f"target{suffix} is '{target}' but judge{suffix} is not connected: connect a "
                                     f"judge to judge{suffix} or clear target{suffix}")
                continue
            try:
                index = judges.target_index(j, target)
            except judges.JudgeError as e:
                raise ValueError(f"target{suffix}: {e}") from None
            panel.append((j, index, weight))
        return panel

    @staticmethod
    def _choose(m, panel, keys, run, cond, uncond, scale, scales, model_options, vae):
        began = time.perf_counter()
        estimates = dcfg.candidate_estimates(cond, uncond, scales)
        log_probs = [host.judge_log_probs(m, j, estimates, run.guider, k, model_options, vae).to(cond.device)
                     for k, (j, _, _) in zip(keys, panel)]
        scores = dcfg.weighted_score(log_probs, [t for _, t, _ in panel], [w for _, _, w in panel], len(scales))
        picks = dcfg.choose(scores, scales, preferred=float(scale))
        run.judged += 1
        run.judged_estimates += estimates.shape[0] * len(panel)
        run.judge_seconds += time.perf_counter() - began
        return torch.tensor(scales, dtype=torch.float64)[picks.cpu()]

    @staticmethod
    def _report(run, scales):
        rows = len(run.schedule[0]["scales"]) if run.schedule else 0
        per_row = [[e["scales"][r] for e in run.schedule] for r in range(rows)]
        report = {"candidates": list(scales), "evaluations": run.evaluations, "judged_evaluations": run.judged,
                  "judged_estimates": run.judged_estimates, "judge_seconds": run.judge_seconds,
                  "schedule": run.schedule, "scales_per_row": per_row,
                  "mean_scale_per_row": [sum(r) / len(r) for r in per_row]}
        log.info("TrainFree Dynamic CFG: %d of %d evaluations judged (%d candidate estimates, %.2f s judging); "
                 "chosen scales per image:\n%s", run.judged, run.evaluations, run.judged_estimates,
                 run.judge_seconds, "\n".join(f"  image {r}: " + " ".join(f"{w:g}" for w in row)
                                              for r, row in enumerate(per_row)))
        return report


NODE_CLASS_MAPPINGS = {"TrainFreeDynamicCFG": TrainFreeDynamicCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeDynamicCFG": "Dynamic CFG (Online Feedback) (TrainFree)"}
