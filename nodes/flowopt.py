"""FlowOpt: zero-order optimisation of the starting latent through the whole sampling process (SD3, Flux)."""
import logging

import torch

from ..guidance_ops import flowopt as ops
from ..guidance_ops.inversion import Inversion
from . import host
from .base import check_numbers
from .inversion import CATEGORY, INVERSION, check_inversion_model, inversion_input, predictor

log = logging.getLogger("trainfree")
TITLE = "TrainFree FlowOpt"
ETA_RULES = ("official value (eta 0)", "estimated bound")
ESTIMATE_PROBES, ESTIMATE_SHARE = 4, 0.5


class TrainFreeFlowOpt:
    DESCRIPTION = ("FlowOpt (Ronai, Kulikov, Michaeli 2025): starting from the inversion's latent n_max steps before "
                   "the end, repeats x <- x - eta * (f(x) - y), where f samples the last n_max steps with the "
                   "connected prompt and y is the encoded image, so the result follows the prompt while staying "
                   "close to the image (the source prompt at cfg 1 makes it an inversion). Each iteration costs one "
                   "pass of n_max steps. Rectified-flow models only (SD3, Flux). Official settings: invert on 15 "
                   "steps; Flux n_max 13, SD3 n_max 12; 8 iterations; Flux guidance 3.5 (FluxGuidance, cfg 1), SD3 "
                   "cfg 3.5 with an empty negative.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", INVERSION)
    RETURN_NAMES = ("latent", "inversion")
    FUNCTION = "optimise"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD3 or Flux model the inversion was made with."}),
            "inversion": inversion_input("An inversion of the source image from TrainFree Invert (sampler euler, "
                                          "guidance 1, the source prompt): its latent at step steps - n_max is "
                                          "the starting point, its last latent the image to stay close to."),
            "positive": ("CONDITIONING", {"tooltip": "The target prompt (the edit); the source prompt reconstructs "
                                                     "the image (FlowOpt inversion)."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "CFG scale of the sampling passes. Flux: 1, with the guidance (official "
                                         "3.5) set by FluxGuidance on the prompt. SD3: official 3.5, with a "
                                         "negative prompt."}),
            "n_max": ("INT", {"default": 13, "min": 1, "max": 1000,
                              "tooltip": "How many of the inversion's last steps are regenerated, at most its step "
                                         "count. More = a stronger edit (official: 13 of 15 for Flux, 12 of 15 for "
                                         "SD3; all steps for inversion)."}),
            "iterations": ("INT", {"default": ops.EDIT_ITERATIONS, "min": 0, "max": 200,
                                   "tooltip": "FlowOpt updates; one more sampling pass gives the output, so 0 is "
                                              "plain sampling from the inversion. More = closer to the source image "
                                              "(official 8 for editing, 30 for inversion)."}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0005,
                              "tooltip": "Step size of the update in the model's latent space. 0 = the official "
                                         "value for the model (Flux 0.0025, SD3 0.01). Too large diverges."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt; needed when cfg is not 1 (the official "
                                                     "SD3 setting uses an empty prompt)."}),
            "eta_rule": (list(ETA_RULES), {"default": ETA_RULES[0],
                                           "tooltip": "With eta 0: the official value, or half the convergence "
                                                      "bound 2 mu / L^2 estimated around the start from 4 random "
                                                      "finite differences of the whole sampling pass (5 more "
                                                      "passes; a sufficient condition for a contraction)."}),
        }}

    def optimise(self, model, inversion, positive, cfg, n_max, iterations, eta, negative=None,
                 eta_rule=ETA_RULES[0]):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        family = host.require_family(model, TITLE, ("sd3", "flux"))
        if not host.is_flow_model(model):
            raise host.UnsupportedModel(f"{TITLE} is stated for rectified-flow models; this {family} model samples "
                                        f"another way: connect an SD3 or Flux model with its own sampling")
        check_inversion_model(inversion, model)
        if inversion.sampler != "euler":
            raise ValueError(f"FlowOpt samples with the Euler step; this inversion was made for sampler "
                             f"'{inversion.sampler}': invert with sampler euler")
        if n_max > inversion.steps:
            raise ValueError(f"n_max is {n_max} but the inversion has {inversion.steps} steps: set n_max to at most "
                             f"{inversion.steps}, or invert on a schedule with more steps")
        if cfg != 1.0 and negative is None:
            raise ValueError(f"cfg {cfg} needs the unconditional prediction: connect a negative prompt (an empty "
                             f"CLIPTextEncode), or set cfg to 1")
        estimate = eta_rule == ETA_RULES[1]
        if estimate and eta != 0.0:
            raise ValueError(f"eta_rule '{eta_rule}' chooses eta itself: set eta to 0, or choose '{ETA_RULES[0]}'")
        eta = eta or ops.ETA[family]
        n_start = inversion.steps - n_max
        sigmas = inversion.sigmas[n_start:]

        def body(loop):
            pivots = inversion.pivots.to(loop.device)
            sample_from = ops.sampler_from(predictor(loop, "euler", cfg), loop.sigmas, loop.step_done)

            def watch(k, x, output, error):
                log.info("TrainFree FlowOpt iteration %d: ||f(x) - y|| = %.4g", k, error)
            step = eta
            with torch.no_grad():  # iterates chain through every pass: no graph outside ComfyUI's inference mode
                if estimate:
                    bound, mu, lipschitz = ops.estimate_step_size_bound(
                        sample_from, pivots[n_start], ESTIMATE_PROBES, generator=torch.Generator().manual_seed(0))
                    if bound <= 0:
                        raise ValueError(f"the estimated bound is empty here (mu {mu:.3g}: the sampling pass is not "
                                         f"monotone around the start): enter an eta by hand")
                    step = ESTIMATE_SHARE * bound
                output, x, errors = ops.flowopt(sample_from, pivots[n_start], pivots[-1], step, iterations, watch)
            return loop.latent_out(output).cpu(), x.float().cpu(), errors, step

        passes = iterations + 1 + (ESTIMATE_PROBES + 1 if estimate else 0)
        samples, x, errors, eta = host.run_loop(model, positive, negative, cfg, inversion.pivots.shape[1:], sigmas,
                                                body, steps=passes * n_max)
        report = {"flowopt_iterations": iterations, "flowopt_eta": eta, "flowopt_n_max": n_max,
                  "flowopt_errors": errors, "flowopt_sampling_steps": passes * n_max}
        log.info("TrainFree FlowOpt: %d iterations at eta %g over the last %d steps, %d sampling steps; "
                 "||f(x) - y|| %.4g -> %.4g", iterations, eta, n_max, report["flowopt_sampling_steps"], errors[0],
                 errors[-1])
        # Re-cut at n_start with the optimised latent as its noise: Sample From Inversion replays it on the last
        # n_max steps. The later pivots stay the source image's trajectory (proximal guidance pulls towards them);
        # null-text embeddings belong to the old starting point and are dropped.
        optimised = Inversion(pivots=torch.cat([x[None], inversion.pivots[n_start + 1:]]), sigmas=sigmas.clone(),
                              sampler="euler", guidance=inversion.guidance, model=inversion.model,
                              source=inversion.source, source_extra=inversion.source_extra,
                              report={**inversion.report, **report})
        return {"samples": samples}, optimised


NODE_CLASS_MAPPINGS = {"TrainFreeFlowOpt": TrainFreeFlowOpt}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeFlowOpt": "FlowOpt (TrainFree)"}
