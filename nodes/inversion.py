"""Real-image inversion and editing: DDIM / flow inversion (optionally CFG++), null-text inversion, and sampling
from an inversion with plain, null-text, negative-prompt or proximal guidance."""
import logging

import torch

from ..guidance_ops import inversion as ops
from . import host
from .base import check_numbers

log = logging.getLogger("trainfree")
INVERSION = "TRAINFREE_INVERSION"
CATEGORY = "trainfree/inversion"

UNCOND_MODES = ("negative prompt", "null-text (from the inversion)", "negative-prompt inversion (source prompt)",
                "proximal guidance (source prompt + ProxEdit)")
PROX_QUANTILE, PROX_RECON_LR, PROX_RECON_TIMESTEP, PROX_DILATION = 0.75, 1.0, 400, 1


def inversion_input(tooltip="An inversion from TrainFree Invert, TrainFree Null-Text Inversion or TrainFree Load "
                             "Inversion."):
    return (INVERSION, {"tooltip": tooltip})


def check_inversion_model(inversion, model):
    found = host.fingerprint(model)
    if found.split("|")[:3] != inversion.model.split("|")[:3]:
        raise ValueError(f"this inversion was made with another kind of model ({inversion.model.split('|')[0]}, "
                         f"{inversion.model.split('|')[1]}) than the one connected ({found.split('|')[0]}, "
                         f"{found.split('|')[1]}): connect the model it was made with, or invert again")
    if found != inversion.model:
        raise ValueError("this inversion was made with another checkpoint of the same family (the weights differ): "
                         "connect the model it was made with, or invert the image again with this one")


def predictor(loop, sampler, cfg):
    """``predict(x, sigma)`` -> (guided, renoise) for the deterministic sampler ``sampler``."""
    if sampler == "cfg++":
        def predict(x, sigma, *_):
            guided, _cond, uncond = loop.denoise_parts(x, sigma, cfg)
            return guided, uncond
    else:
        def predict(x, sigma, *_):
            guided = loop.denoise(x, sigma, cfg)
            return guided, guided
    return predict


class TrainFreeInvert:
    DESCRIPTION = ("Inverts an image latent: runs the deterministic sampler backwards over the given sigmas (DDIM "
                   "inversion for SD1.5 / SDXL, the reversed flow ODE for SD3 / Flux) and returns the noise and the "
                   "whole trajectory, for TrainFree Sample From Inversion (or null-text inversion) to reconstruct or "
                   "edit on exactly this schedule. Use guidance 1 with the source prompt (the DDIM-inversion pivot "
                   "of null-text inversion), or the 'cfg++' sampler for CFG++ inversion (Chung et al., ICLR 2025) "
                   "with its lambda as guidance.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (INVERSION,)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model that will later sample from the inversion."}),
            "positive": ("CONDITIONING", {"tooltip": "The source prompt: a caption of the input image."}),
            "latent": ("LATENT", {"tooltip": "The image to invert, encoded with this model's VAE (VAE Encode)."}),
            "sigmas": ("SIGMAS", {"tooltip": "The schedule the edit will use (BasicScheduler etc.; 50 DDIM steps in "
                                             "the null-text paper). A denoise below 1 inverts only part of the way "
                                             "(a weaker edit that keeps more of the image)."}),
            "sampler": (list(ops.SAMPLERS), {"default": "euler",
                                             "tooltip": "The deterministic sampler to invert, which sampling from the "
                                                        "inversion will use: euler (= DDIM on SD1.5 / SDXL, the flow "
                                                        "ODE's Euler step on SD3 / Flux) or cfg++ (CFG++ inversion)."}),
            "guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.05,
                                   "tooltip": "The guidance of the inversion: the CFG scale for euler (1 = prompt only, "
                                              "the paper's pivot), lambda for cfg++ (the paper's example 0.6; sampling "
                                              "must use the same lambda)."}),
            "fixed_point_iterations": ("INT", {"default": 0, "min": 0, "max": 50,
                                               "tooltip": "0 = plain DDIM inversion (the papers'). Each iteration "
                                                          "refines every step so that the sampler's step lands "
                                                          "exactly back on it (one more model pass per step), which "
                                                          "makes the reconstruction close to exact."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "The unconditional prompt; needed for guidance above 1 and for "
                                                     "cfg++."}),
        }}

    def invert(self, model, positive, latent, sigmas, sampler, guidance, fixed_point_iterations, negative=None):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        samples = latent["samples"]
        host.check_latent(model, samples)
        _check_schedule(sigmas)
        needs_uncond = sampler == "cfg++" or guidance != 1.0
        if needs_uncond and negative is None:
            raise ValueError(f"sampler '{sampler}' at guidance {guidance} uses the unconditional prediction: connect "
                             f"a negative prompt (an empty CLIPTextEncode), or use euler at guidance 1")
        source, numbers = host.conditioning_tensors(positive, "positive")

        def body(loop):
            predict = predictor(loop, sampler, guidance)
            x0 = loop.latent_in(samples)
            return ops.invert(predict, x0, loop.sigmas, fixed_point_iterations, loop.step_done, loop.input_scale)

        pivots = host.run_loop(model, positive, negative, guidance, samples.shape, sigmas, body,
                               steps=(len(sigmas) - 1))
        return (ops.Inversion(pivots=pivots.float().cpu(), sigmas=sigmas.float().cpu(), sampler=sampler,
                              guidance=float(guidance), model=host.fingerprint(model), source=source,
                              source_extra=numbers,
                              report={"fixed_point_iterations": fixed_point_iterations}),)


class TrainFreeNullTextInversion:
    DESCRIPTION = ("Null-text inversion (Mokady et al., CVPR 2023): starting from a DDIM inversion at guidance 1 "
                   "(TrainFree Invert, sampler euler, guidance 1), optimises the unconditional text embedding step by "
                   "step so that sampling at the chosen CFG scale retraces the inversion, which makes high-guidance "
                   "edits of a real image faithful. Paper settings: CFG 7.5, 10 Adam iterations per step with lr "
                   "0.01 * (1 - i/100) and an early stop at loss 1e-5 + i * 2e-5. Needs gradients through the model "
                   "(SD1.5, SDXL, SD3); sample with 'null-text (from the inversion)'. Faster: invert on 25 steps and use 3 "
                   "inner steps at lr 0.02 (on the reference model as good as the paper's protocol in a quarter of "
                   "its time; docs/quality.md).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (INVERSION,)
    FUNCTION = "optimise"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the inversion was made with."}),
            "inversion": inversion_input("A DDIM inversion from TrainFree Invert (sampler euler, guidance 1)."),
            "negative": ("CONDITIONING", {"tooltip": "The starting unconditional prompt, usually an empty text "
                                                     "encode (the paper's null text)."}),
            "cfg": ("FLOAT", {"default": ops.NTI_GUIDANCE, "min": 1.0, "max": 30.0, "step": 0.1,
                              "tooltip": "The CFG scale the edit will use (paper 7.5)."}),
            "inner_steps": ("INT", {"default": ops.NTI_INNER_STEPS, "min": 1, "max": 100,
                                    "tooltip": "Adam iterations per step at most (paper 10)."}),
            "learning_rate": ("FLOAT", {"default": ops.NTI_LEARNING_RATE, "min": 1e-5, "max": 1.0, "step": 1e-4,
                                        "tooltip": "Adam's rate at the first step, decaying to half at the last "
                                                   "(paper 0.01)."}),
            "early_stop": ("BOOLEAN", {"default": True,
                                       "tooltip": "Stop a step's iterations once its loss is below 1e-5 + i * 2e-5 "
                                                  "(the paper's rule)."}),
        }}

    def optimise(self, model, inversion, negative, cfg, inner_steps, learning_rate, early_stop):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        check_inversion_model(inversion, model)
        if inversion.sampler != "euler" or inversion.guidance != 1.0:
            raise ValueError(f"null-text inversion pivots on a DDIM inversion at guidance 1; this inversion used "
                             f"sampler '{inversion.sampler}' at guidance {inversion.guidance}: invert with sampler "
                             f"euler and guidance 1")
        null_source, _ = host.conditioning_tensors(negative, "negative")
        positive = host.as_conditioning(inversion.source, inversion.source_extra)
        trainable = host.trainable(model)
        batch = inversion.pivots.shape[1]

        def body(loop):
            pivots = inversion.pivots.to(loop.device)
            null = loop.negative_cross().to(loop.device).float()
            null = null.expand(batch, *null.shape[1:]).clone() if null.shape[0] == 1 else null

            def predict_cond(x, sigma):
                with torch.no_grad():
                    return loop.denoise(x, sigma, 1.0)

            with host.differentiating(model, "null-text inversion"):
                nulls, report = ops.null_text_inversion(
                    pivots, loop.sigmas, null, predict_cond, loop.uncond_with_grad, cfg, inner_steps, learning_rate,
                    early_stop, loop.input_scale, on_step=loop.step_done)
            return nulls, report

        nulls, report = host.run_loop(trainable, positive, negative, cfg, inversion.pivots.shape[1:],
                                      inversion.sigmas, body)
        log.info("TrainFree null-text inversion: %d of at most %d inner iterations, final loss %.3g",
                 report["inner_iterations"], report["max_inner_iterations"], report["final_loss"])
        return (ops.Inversion(pivots=inversion.pivots, sigmas=inversion.sigmas, sampler="euler", guidance=float(cfg),
                              model=inversion.model, source=inversion.source, source_extra=inversion.source_extra,
                              null_embeddings=nulls.float().cpu(), null_source=null_source,
                              report={**inversion.report, **report}),)


class TrainFreeSampleFromInversion:
    DESCRIPTION = ("Samples from an inversion on its own schedule and sampler: with the source prompt it "
                   "reconstructs the image, with an edited prompt it edits it. The unconditional branch is the "
                   "negative prompt, the per-step null-text embeddings (null-text inversion), the source prompt "
                   "(negative-prompt inversion, Miyake et al. 2023: no optimisation), or the source prompt with "
                   "ProxEdit's proximal guidance (Han et al., WACV 2024). MODEL patches (PAG, APG, ...) act as in "
                   "any sampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the inversion was made with (patches on it act)."}),
            "inversion": inversion_input(),
            "positive": ("CONDITIONING", {"tooltip": "The prompt to sample with: the source prompt reconstructs, an "
                                                     "edited prompt ('a blue digit' for 'a red digit') edits."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "CFG scale (lambda for a cfg++ inversion, which must match the inversion's)."}),
            "unconditional": (list(UNCOND_MODES), {"default": UNCOND_MODES[0],
                                                   "tooltip": "What fills the unconditional branch; see the node's "
                                                              "description."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt; used only by 'negative prompt'."}),
            "proximal_quantile": ("FLOAT", {"default": PROX_QUANTILE, "min": 0.0, "max": 0.99, "step": 0.01,
                                            "tooltip": "Proximal guidance only: the quantile of |cond - uncond| "
                                                       "below which the guidance is dropped (ProxEdit 0.75)."}),
            "proximal_recon_lr": ("FLOAT", {"default": PROX_RECON_LR, "min": 0.0, "max": 1.0, "step": 0.05,
                                            "tooltip": "Proximal guidance only: how far late steps are pulled back "
                                                       "to the inversion outside the edited region (ProxEdit 1)."}),
            "proximal_recon_timestep": ("INT", {"default": PROX_RECON_TIMESTEP, "min": 0, "max": 1000,
                                                "tooltip": "Proximal guidance only: the pull acts below this "
                                                           "timestep (0-1000; ProxEdit 400)."}),
            "proximal_dilation": ("INT", {"default": PROX_DILATION, "min": 0, "max": 16,
                                          "tooltip": "Proximal guidance only: the edited region grows by this many "
                                                     "latent pixels before the pull (ProxEdit's code: 1)."}),
        }}

    def sample(self, model, inversion, positive, cfg, unconditional, negative=None, proximal_quantile=PROX_QUANTILE,
               proximal_recon_lr=PROX_RECON_LR, proximal_recon_timestep=PROX_RECON_TIMESTEP,
               proximal_dilation=PROX_DILATION):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        check_inversion_model(inversion, model)
        mode, negative = unconditional_branch(inversion, unconditional, negative, cfg)
        recon = [host.sigma_to_timestep(model, s) < proximal_recon_timestep for s in inversion.sigmas[1:]]

        def body(loop):
            pivots = inversion.pivots.to(loop.device)
            base = predictor(loop, inversion.sampler, cfg)
            masks = {}

            def predict(x, sigma, i):
                if mode == 1:
                    with loop.negative_replaced(inversion.null_embeddings[i].to(loop.device)):
                        return base(x, sigma)
                if mode != 3:
                    return base(x, sigma)
                guided, cond, uncond = loop.denoise_parts(x, sigma, cfg)
                delta = cond - uncond
                tau = ops.proximal_threshold(delta, proximal_quantile)
                masks[i] = ops.proximal_mask(delta, tau, proximal_dilation)
                shifted = guided + (uncond + cfg * ops.proximal(delta, tau) - (uncond + cfg * delta))
                return shifted, (uncond if inversion.sampler == "cfg++" else shifted)

            def pull_back(x, i):
                if mode != 3 or not recon[i] or proximal_recon_lr == 0:
                    return x
                return x - proximal_recon_lr * (x - pivots[i + 1]) * (1 - masks[i])
            x = ops.replay(predict, pivots[0], loop.sigmas, pull_back, loop.step_done)
            return loop.latent_out(x).cpu()

        samples = host.run_loop(model, positive, negative, cfg, inversion.pivots.shape[1:], inversion.sigmas, body)
        return ({"samples": samples},)


def unconditional_branch(inversion, unconditional, negative, cfg):
    """(mode index, the CONDITIONING of the unconditional branch) for sampling ``inversion`` at ``cfg``, or a clear
    error when the inversion or the connected negative prompt does not fit the mode."""
    mode = UNCOND_MODES.index(unconditional)
    if (negative is None) == (mode == 0):
        raise ValueError(f"'{unconditional}' " + ("needs a negative prompt: connect one" if mode == 0 else
                         "makes its own unconditional branch: disconnect 'negative' or choose 'negative prompt'"))
    if inversion.sampler == "cfg++" and cfg != inversion.guidance:
        raise ValueError(f"this is a CFG++ inversion made with lambda {inversion.guidance}; sample with the same "
                         f"lambda: set cfg to {inversion.guidance}")
    if mode == 1:
        if inversion.null_embeddings is None:
            raise ValueError("this inversion has no null-text embeddings: run TrainFree Null-Text Inversion on it, "
                             "or choose another unconditional mode")
        if cfg != inversion.guidance:
            raise ValueError(f"the null-text embeddings were optimised for cfg {inversion.guidance}: set cfg to "
                             f"{inversion.guidance}, or run null-text inversion again at {cfg}")
        return mode, host.as_conditioning(inversion.null_source, {})
    if mode >= 2:
        return mode, host.as_conditioning(inversion.source, inversion.source_extra)
    return mode, negative


def _check_schedule(sigmas):
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("the sigmas hold no step: connect a scheduler with at least 1 step")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("the sigmas must decrease (a sampling schedule from BasicScheduler or similar; FlipSigmas "
                         "is not needed, the node inverts by itself)")


NODE_CLASS_MAPPINGS = {"TrainFreeInvert": TrainFreeInvert, "TrainFreeNullTextInversion": TrainFreeNullTextInversion,
                       "TrainFreeSampleFromInversion": TrainFreeSampleFromInversion}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeInvert": "Invert Image (DDIM / Flow / CFG++) (TrainFree)",
                              "TrainFreeNullTextInversion": "Null-Text Inversion (TrainFree)",
                              "TrainFreeSampleFromInversion": "Sample From Inversion (TrainFree)"}
