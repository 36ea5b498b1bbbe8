"""The Diffusion Classifier as a node: which of the candidate prompts best explains an image, by the model's own
denoising error."""
import logging

from ..guidance_ops import diffusion_classifier as dc
from ..guidance_ops.frecas import parse_list
from . import host
from .base import check_numbers, prompt_lines

log = logging.getLogger("trainfree")


class TrainFreeDiffusionClassifier:
    CATEGORY = "trainfree/analysis"
    DESCRIPTION = ("Diffusion Classifier (Li et al., ICCV 2023): noises the image at evenly spaced timesteps and "
                   "asks the model to denoise it under each candidate prompt; the prompt with the smallest error "
                   "(in the model's own output space: eps, v or flow velocity) explains the image best. Every "
                   "candidate sees the same (t, eps) pairs; adaptive elimination drops the worst candidates stage "
                   "by stage. Works on every family the pack serves.")
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("best_prompt", "scores", "chart")
    FUNCTION = "classify"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The text-to-image model that classifies."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder, for the candidate prompts."}),
            "candidates": ("STRING", {"multiline": True, "default": "a photo of a cat\na photo of a dog",
                                      "tooltip": "One candidate prompt per line (at least two)."}),
            "timesteps_per_stage": ("STRING", {"default": "25, 250", "tooltip":
                                               "Cumulative timesteps evaluated by the end of each stage (the "
                                               "paper: 25, 250 for Pets; 50, 500 for CIFAR-10; 20, 50, 100, 500 "
                                               "for Food-101)."}),
            "keep_per_stage": ("STRING", {"default": "5, 1", "tooltip":
                                          "Candidates kept after each stage, ending with 1 (the paper: 5, 1; "
                                          "20, 10, 5, 1 for Food-101)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Seed of the shared noise."}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 256,
                                   "tooltip": "(t, eps) pairs per model call."}),
        }, "optional": {
            "latent": ("LATENT", {"tooltip": "The image's latent (one image). Or connect image and vae."}),
            "image": ("IMAGE", {"tooltip": "The image (one); needs vae."}),
            "vae": ("VAE", {"tooltip": "The model's VAE, to encode image."}),
        }}

    def classify(self, model, clip, candidates, timesteps_per_stage, keep_per_stage, seed, batch_size, latent=None,
                 image=None, vae=None):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), {"seed": seed, "batch_size": batch_size})
        texts = prompt_lines(candidates, "candidates")
        samples = parse_list(timesteps_per_stage, "timesteps_per_stage", int)
        keep = parse_list(keep_per_stage, "keep_per_stage", int)
        dc.check_stages(samples, keep, len(texts))
        x0 = self._latent(latent, image, vae)
        stages = dc.stage_timesteps(samples)
        noise = dc.shared_noise(samples[-1], x0.shape[1:], seed)
        conditioning = {text: host.encode_text(clip, text) for text in texts}
        progress = host.progress_bar(sum(len(s) * k for s, k in zip(stages, [len(texts)] + keep[:-1])))
        errors, remaining, used = {text: [] for text in texts}, list(texts), 0
        for timesteps, kept in zip(stages, keep):
            sigmas = host.timestep_sigmas(model, timesteps)
            found = host.denoising_errors(model, {t: conditioning[t] for t in remaining}, x0, sigmas,
                                          noise[used:used + len(timesteps)], batch_size, progress)
            used += len(timesteps)
            for text, values in found.items():
                errors[text] += values
            remaining = dc.keep_best({t: sum(errors[t]) / len(errors[t]) for t in remaining}, kept)
        best = remaining[0]
        means = {t: sum(errors[t]) / len(errors[t]) for t in texts}
        ranking = sorted(texts, key=lambda t: (-len(errors[t]), means[t], t))
        scores = "\n".join(f"{means[t]:.6f}  ({len(errors[t])} pairs)  {t}" for t in ranking)
        chart = dc.bar_chart([means[t] for t in texts], highlight=texts.index(best))
        log.info("TrainFree Diffusion Classifier: %r (mean errors, lower is better):\n%s", best, scores)
        return {"ui": {"text": [f"{best}\n{scores}"]}, "result": (best, scores, chart.unsqueeze(0))}

    @staticmethod
    def _latent(latent, image, vae):
        if (latent is None) == (image is None):
            raise ValueError("connect either latent, or image with its vae (exactly one of latent and image)")
        if image is not None:
            if vae is None:
                raise ValueError("image is connected but vae is not: connect the model's VAE to encode it")
            if image.shape[0] != 1:
                raise ValueError(f"image holds {image.shape[0]} images; the classifier takes one: pick one with "
                                 f"ImageFromBatch")
            return vae.encode(image[..., :3])
        samples = latent["samples"]
        if samples.shape[0] != 1 or samples.ndim != 4:
            raise ValueError(f"latent holds {samples.shape[0]} images of shape {tuple(samples.shape[1:])}; the "
                             f"classifier takes one image latent: pick one with LatentFromBatch")
        return samples


NODE_CLASS_MAPPINGS = {"TrainFreeDiffusionClassifier": TrainFreeDiffusionClassifier}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeDiffusionClassifier": "Diffusion Classifier (TrainFree)"}
