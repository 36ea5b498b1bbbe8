"""EluCD calibrated classifier guidance as a MODEL -> MODEL patch: at each guided evaluation the scorer reads the
clean estimate (decoded by the VAE), and the estimate is moved along the gradient of the scorer's calibrated
log-probability (guidance_ops.elucd says what is the paper's and what is ours)."""
import logging
import math
import time
from types import SimpleNamespace

from ..guidance_ops import elucd
from ..guidance_ops.pag import in_window
from . import host
from .base import ModelPatchNode, model_input

log = logging.getLogger("trainfree")
TITLE = "TrainFree EluCD"


class TrainFreeEluCD(ModelPatchNode):
    DESCRIPTION = ("EluCD calibrated classifier guidance (Ma et al., ICLR 2024): at each guided evaluation the "
                   "scorer reads the clean estimate (after CFG) decoded by the VAE, and the estimate moves along "
                   "the gradient of the scorer's calibrated log-probability (Softplus-smoothed ReLUs, a joint and a "
                   "marginal temperature), rescaled to the estimate's RMS and weighted by the paper's schedule. "
                   "The gradient goes through the VAE decoder, never the diffusion model: no extra model "
                   "evaluation; one decode and one backward pass per guided evaluation. Composes with CFG and the "
                   "pack's other patches. Serves SD1.5, SDXL, SD3 and Flux (images, not video).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "scorer": ("TRAINFREE_SCORER", {"tooltip": "What to climb: a differentiable scorer (TrainFree Digit "
                                                       "Scorer, or a Judge Scorer of the Digit Oracle Judge). The "
                                                       "CLIP judge gives no gradients and is refused."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: the scorer reads the decoded clean estimate, and the "
                                       "gradient comes back through the decoder."}),
            "scale": ("FLOAT", {"default": elucd.DEFAULT_SCALE, "min": 0.0, "max": 2.0, "step": 0.005, "tooltip":
                                "How far each guided evaluation moves the clean estimate, as a fraction of its RMS "
                                "(the paper's EDM sampler rescales the gradient this way; its 0.004 moves the "
                                "noisy sample, so this default is the pack's). 0 turns EluCD off."}),
            "joint_temperature": ("FLOAT", {"default": elucd.DEFAULT_JOINT_TEMPERATURE, "min": 0.0, "max": 10.0,
                                            "step": 0.05, "tooltip":
                                            "The temperature on the target's logit, tau_j in tau_j f_y - log sum "
                                            "exp(tau_m f). The paper's default 1."}),
            "marginal_temperature": ("FLOAT", {"default": elucd.DEFAULT_MARGINAL_TEMPERATURE, "min": 0.0,
                                               "max": 10.0, "step": 0.05, "tooltip":
                                               "The temperature in the normaliser, tau_m. The paper's DDPM default "
                                               "0.5 (its EDM run: 0, logit guidance). Both temperatures 1: the "
                                               "scorer's own log-probability."}),
            "softplus_beta": ("FLOAT", {"default": elucd.DEFAULT_SOFTPLUS_BETA, "min": 0.0, "max": 100.0,
                                        "step": 0.5, "tooltip":
                                        "The classifier's ReLUs become Softplus(beta) while it is differentiated "
                                        "(smoother gradients). The paper's default 3 (EDM: 5). 0 keeps the "
                                        "ReLUs."}),
            "schedule": (list(elucd.SCHEDULES), {"tooltip":
                                                 "The weight over the steps: the paper's EDM sampler's linear decay "
                                                 "from the first step plus a sine bump gamma sin(pi i / N), or the "
                                                 "same weight at every step."}),
            "gamma": ("FLOAT", {"default": elucd.DEFAULT_GAMMA, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                "The sine bump's height (the paper's add_factor / gamma_factor, 0.3). Read by "
                                "the EDM schedule only."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Guide from this point of the schedule (0 = first step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                      "Guide until this point of the schedule (1 = last step). Outside the window "
                                      "nothing is decoded."}),
        }}

    def patch(self, model, scorer, vae, scale, joint_temperature, marginal_temperature, softplus_beta, schedule,
              gamma, start_percent, end_percent):
        check_inputs(scorer, vae, schedule, start_percent, end_percent)
        if host.model_family(model) == "wan":
            raise host.UnsupportedModel(f"{TITLE}: the scorer reads images, and this is a video model "
                                        f"({host.FAMILY_NAMES['wan']}); EluCD serves SD1.5, SDXL, SD3 and Flux")
        m = model.clone()
        if scale == 0:
            return (m,)
        beta = math.inf if softplus_beta == 0 else softplus_beta
        key = host.new_key("elucd")

        def objective(pixels):
            return elucd.calibrated_score(scorer, pixels, joint_temperature, marginal_temperature, beta)

        def start(guider, noise, latent_image, sampler, sigmas, *_, **__):
            sigma_start, sigma_end = host.sigma_window(guider.model_patcher, start_percent, end_percent)
            return SimpleNamespace(sigma_start=sigma_start, sigma_end=sigma_end, sigmas=[float(s) for s in sigmas],
                                   gradients=host.ScorerGradient(vae, guider, TITLE), evaluations=0,
                                   guided=0, seconds=0.0, first=None, last=None, weights=[])

        def post_cfg(args):
            run = scope.state
            if run is None:
                return args["denoised"]
            run.evaluations += 1
            sigma = args["sigma"]
            if not in_window(sigma, run.sigma_start, run.sigma_end):
                return args["denoised"]
            began = time.perf_counter()
            denoised = args["denoised"]
            step = host.step_of(run.sigmas, float(sigma.flatten()[0]))
            weight = scale * elucd.schedule_weight(step, len(run.sigmas) - 1, schedule, gamma)
            gradient, values = run.gradients.gradient(denoised, objective)
            guided = denoised + elucd.preconditioned_step(denoised, gradient, weight).to(denoised.dtype)
            run.guided += 1
            run.weights.append(round(weight, 6))
            run.first = values.tolist() if run.first is None else run.first
            run.last = values.tolist()
            run.seconds += time.perf_counter() - began
            return guided

        def finish(run):
            report = {"evaluations": run.evaluations, "guided": run.guided,
                      "decodes_with_backward": run.gradients.passes, "extra_model_evaluations": 0,
                      "seconds": round(run.seconds, 3), "weights": run.weights,
                      "calibrated_score_first": run.first, "calibrated_score_last": run.last,
                      "scorer": scorer.describe()}
            log.info("%s: guided %d of %d evaluations (%d VAE decodes with a backward pass, no extra model "
                     "evaluation, %.2f s); calibrated score %s -> %s", TITLE, run.guided, run.evaluations,
                     run.gradients.passes, run.seconds, run.first, run.last)
            return report

        scope = host.RunScope(m, key, start, finish)
        host.add_post_cfg(m, post_cfg)
        return (m,)


def check_inputs(scorer, vae, schedule, start_percent, end_percent):
    if not hasattr(scorer, "score"):
        raise ValueError(f"{TITLE}: scorer is a {type(scorer).__name__}, not a scorer: connect a TrainFree Digit "
                         f"Scorer or a TrainFree Judge Scorer")
    if not getattr(scorer, "differentiable", False):
        raise ValueError(f"{TITLE} climbs the scorer's gradient, and this scorer ({scorer.describe()}) gives none "
                         f"(a CLIP judge runs ComfyUI's vision model with inference weights): use TrainFree Digit "
                         f"Scorer, or a Judge Scorer of the TrainFree Digit Oracle Judge; for a scorer without "
                         f"gradients use the search samplers (they only read scores)")
    if getattr(scorer, "reads", "pixels") != "pixels":
        raise ValueError(f"{TITLE}: the scorer reads '{scorer.reads}', but EluCD decodes the clean estimate to "
                         f"pixels for it: use a scorer that reads pixels")
    if vae is None:
        raise ValueError(f"{TITLE}: the scorer reads pixels: connect the model's VAE to vae")
    if schedule not in elucd.SCHEDULES:
        raise ValueError(f"{TITLE}: unknown schedule '{schedule}': choose one of {', '.join(elucd.SCHEDULES)}")
    if start_percent > end_percent:
        raise ValueError(f"{TITLE}: start_percent ({start_percent}) is after end_percent ({end_percent}): swap them")


NODE_CLASS_MAPPINGS = {"TrainFreeEluCD": TrainFreeEluCD}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeEluCD": "EluCD Classifier Guidance (TrainFree)"}
