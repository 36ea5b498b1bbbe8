"""LinearAG: a calibration node that fits, on your own model, how the unconditional prediction follows from the
trajectory's past estimates, and a MODEL -> MODEL patch that then skips the unconditional pass on every other
step."""
import logging
from types import SimpleNamespace

from ..guidance_ops import linear_ag
from . import host
from .base import ModelPatchNode, check_numbers, model_input, prompt_lines

log = logging.getLogger("trainfree")

CALIBRATION_TYPE = "TRAINFREE_LINEAR_AG"
FROM_INPUT = "(from the calibration input)"


class TrainFreeLinearAGCalibrate:
    CATEGORY = "trainfree/guidance"
    DESCRIPTION = ("Fits LinearAG's coefficients on your model: samples the calibration prompts with full CFG, "
                   "records every step's conditional and unconditional predictions, and fits per regressed step "
                   "(every other one) D_u ~ b0 D_c + b1 D_c(prev) + g1 D_u(prev) by least squares. Saves them to "
                   f"output/{host.CALIBRATION_SUBFOLDER}/ for the LinearAG patch; the fit holds for these steps, "
                   "sampler, scheduler, CFG and negative prompt.")
    RETURN_TYPES = (CALIBRATION_TYPE, "STRING")
    RETURN_NAMES = ("calibration", "summary")
    FUNCTION = "calibrate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to calibrate (with the MODEL patches you will sample with)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder, for the calibration prompts."}),
            "calibration_prompts": ("STRING", {"multiline": True, "default":
                                               "a photo of a cat on a sofa\na mountain lake at sunset",
                                               "tooltip": "One prompt per line; each is sampled runs_per_prompt "
                                                          "times (the paper fits on a few hundred trajectories; a "
                                                          "few already fit three numbers per step)."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "The negative prompt you will sample with: the regression "
                                                      "predicts this prompt's prediction."}),
            "runs_per_prompt": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": "Seeds per prompt."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip": "First seed."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200, "tooltip": "Sampling steps (exactly)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "CFG scale."}),
            "sampler_name": (host.sampler_names(), {"default": "euler", "tooltip":
                                                    "A sampler with one model evaluation per step (euler, ddim, "
                                                    "dpmpp_2m, ...)."}),
            "scheduler": (host.scheduler_names(), {"tooltip": "Scheduler."}),
            "width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Image height."}),
            "filename_prefix": ("STRING", {"default": "linear_ag", "tooltip":
                                           f"Saved as output/{host.CALIBRATION_SUBFOLDER}/<prefix>_NNNNN.json."}),
        }}

    def calibrate(self, model, clip, calibration_prompts, negative_prompt, runs_per_prompt, seed, steps, cfg,
                  sampler_name, scheduler, width, height, filename_prefix):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        prompts = prompt_lines(calibration_prompts, "calibration_prompts")
        if cfg == 1.0:
            raise ValueError("cfg is 1, where there is no unconditional pass to regress: enter the CFG you sample with")
        recorder, trajectory = model.clone(), []

        def record(args):
            if args["uncond"] is not None:
                trajectory.append((args["cond_denoised"].detach().float().cpu(),
                                   args["uncond_denoised"].detach().float().cpu()))
            return args["denoised"]
        host.add_post_cfg(recorder, record)
        negative = host.encode_text(clip, negative_prompt)
        latent = host.empty_latent(model, width, height)
        progress = host.progress_bar(len(prompts) * runs_per_prompt)
        runs = []
        for p, prompt in enumerate(prompts):
            positive = host.encode_text(clip, prompt)
            for r in range(runs_per_prompt):
                trajectory.clear()
                host.sample_latent(recorder, positive, negative, cfg, sampler_name, scheduler, steps,
                                   seed + p * runs_per_prompt + r, latent)
                if len(trajectory) != steps:
                    raise ValueError(f"{sampler_name} evaluated the model {len(trajectory)} times in {steps} steps; "
                                     f"choose a sampler with one evaluation per step (euler, ddim, dpmpp_2m)")
                runs.append(list(trajectory))
                progress.update(1)
        coefficients = linear_ag.calibrate(runs)
        errors = linear_ag.relative_error(coefficients, runs)
        meta = {"cfg": cfg, "sampler": sampler_name, "scheduler": scheduler, "negative_prompt": negative_prompt,
                "runs": len(runs), "relative_error": {str(k): round(v, 6) for k, v in errors.items()}}
        name = host.save_calibration(linear_ag.dump(steps, coefficients, meta), filename_prefix)
        summary = (f"LinearAG calibrated on {len(runs)} runs of {steps} steps: {len(coefficients)} regressed steps, "
                   f"relative error of the regressed unconditional prediction {min(errors.values()):.2e} to "
                   f"{max(errors.values()):.2e}; saved as {name}")
        log.info("TrainFree %s", summary)
        return {"ui": {"text": [summary]}, "result": ((steps, coefficients, meta, name), summary)}


class TrainFreeLinearAG(ModelPatchNode):
    DESCRIPTION = ("LinearAG (Castillo et al., AAAI 2025): on every other step the unconditional pass is not run; "
                   "its prediction comes from a regression on the previous step's predictions and this step's "
                   "conditional one, fitted on your model by LinearAG Calibrate (25% fewer model evaluations with "
                   "CFG at 20 steps). Chain Adaptive Guidance after it to also stop CFG late. Logs the passes saved.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "calibration_file": ([FROM_INPUT] + host.saved_calibrations(), {
                "tooltip": "A calibration made by LinearAG Calibrate for this model, step count, sampler, CFG and "
                           "negative prompt (output/ or input/" + host.CALIBRATION_SUBFOLDER + "), or the one "
                           "connected to the calibration input."}),
        }, "optional": {"calibration": (CALIBRATION_TYPE, {"tooltip": "A calibration straight from LinearAG "
                                                                      "Calibrate; set calibration_file to "
                                                                      f"'{FROM_INPUT}'."})}}

    @classmethod
    def IS_CHANGED(cls, calibration_file, **_):
        return "" if calibration_file == FROM_INPUT else host.calibration_file_stamp(calibration_file)

    def patch(self, model, calibration_file, calibration=None):
        if calibration_file == FROM_INPUT:
            if calibration is None:
                raise ValueError(f"calibration_file is '{FROM_INPUT}' but nothing is connected to the calibration "
                                 f"input: connect LinearAG Calibrate, or choose a saved calibration file")
            steps, coefficients, meta, calibration_file = calibration
        elif calibration is not None:
            raise ValueError(f"a calibration is connected but calibration_file names {calibration_file}, which would "
                             f"leave it unused: set calibration_file to '{FROM_INPUT}' or disconnect it")
        else:
            steps, coefficients, meta = host.load_calibration(calibration_file)
        m = model.clone()

        def choose(run, sigma, x, model_options, sampler_cfg):
            run.evaluations += 1
            if run.sigmas is None:
                run.sigmas = [float(s) for s in model_options.get("transformer_options", {}).get("sample_sigmas", [])]
                if len(run.sigmas) - 1 != steps:
                    raise ValueError(f"the LinearAG calibration {calibration_file} is for {steps} steps but the "
                                     f"sampler runs {len(run.sigmas) - 1}: set steps to {steps} (enter it on the "
                                     f"sampler), or make a calibration for {len(run.sigmas) - 1}")
            value = float(sigma.flatten()[0])
            step = host.step_of(run.sigmas, value)
            run.regressing = (step in coefficients and run.previous is not None and run.previous[2] == step - 1
                              and value == run.sigmas[step] and sampler_cfg != 1.0
                              and not host.uncond_pass_runs(model_options))  # a patch needs it anyway
            run.step = step
            if run.regressing:
                run.saved += 1
                return 1.0
            return None

        def regress(run, denoised, sigma, x, sampler_cfg):
            if not run.regressing:
                return denoised
            previous_cond, previous_uncond, _ = run.previous
            uncond = linear_ag.predict(coefficients[run.step], denoised, previous_cond, previous_uncond)
            return uncond + sampler_cfg * (denoised - uncond)

        def keep(args):
            run = scope.state
            if run is not None and args["uncond"] is not None and not run.regressing:
                run.previous = (args["cond_denoised"], args["uncond_denoised"], run.step)
            return args["denoised"]

        def finish(run):
            log.info("TrainFree LinearAG: %d of %d evaluations regressed the unconditional prediction (passes saved)",
                     run.saved, run.evaluations)
            return {"evaluations": run.evaluations, "saved_passes": run.saved}

        scope = host.RunScope(m, host.new_key("linear_ag"),
                              lambda *_: SimpleNamespace(evaluations=0, saved=0, sigmas=None, step=None,
                                                         regressing=False, previous=None), finish)
        host.override_cfg_per_evaluation(m, scope, choose, after=regress, title="TrainFree LinearAG")
        host.add_post_cfg(m, keep)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeLinearAGCalibrate": TrainFreeLinearAGCalibrate, "TrainFreeLinearAG": TrainFreeLinearAG}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeLinearAGCalibrate": "LinearAG Calibrate (TrainFree)",
                              "TrainFreeLinearAG": "LinearAG (TrainFree)"}
