"""Judges for guidance that steers by a classifier (GFCG, dynamic CFG): the digit oracle of the reference models,
and the Diffusion Classifier over a list of prompts."""
from ..guidance_ops import judges
from . import host
from .base import check_numbers, prompt_lines

JUDGE = "TRAINFREE_JUDGE"


class TrainFreeDigitOracleJudge:
    CATEGORY = "trainfree/judges"
    DESCRIPTION = ("The pack's digit oracle as a judge: a small CNN trained on the real digit scans that reads the "
                   "digit (zero to nine) off an image of the reference models. It reads pixels, so the node using "
                   "it needs the VAE.")
    RETURN_TYPES = (JUDGE,)
    RETURN_NAMES = ("judge",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return (judges.DigitOracleJudge(),)


class TrainFreePromptJudge:
    CATEGORY = "trainfree/judges"
    DESCRIPTION = ("The Diffusion Classifier (Li et al., ICCV 2023) as a judge: the estimate is noised at evenly "
                   "spaced timesteps and denoised by the sampled model itself under each prompt; the smaller the "
                   "error, the likelier the prompt (p ∝ exp(−error), normalised over the prompts). Costs one model "
                   "pass per prompt and timestep for each estimate it judges; works on every family.")
    RETURN_TYPES = (JUDGE,)
    RETURN_NAMES = ("judge",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The sampled model's text encoder, for the prompts."}),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na photo of a dog",
                                   "tooltip": "The labels, one prompt per line (at least two)."}),
            "timesteps": ("INT", {"default": 4, "min": 1, "max": 1000,
                                  "tooltip": "Evenly spaced timesteps per judged estimate (the classifier's (t, eps) "
                                             "pairs); each costs one model pass per prompt."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Seed of the noise the prompts share."}),
        }}

    def make(self, clip, prompts, timesteps, seed):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), {"timesteps": timesteps, "seed": seed})
        texts = prompt_lines(prompts, "prompts")
        judge = judges.PromptJudge(texts, timesteps, seed)
        judge.conditionings = host.PatchInput([host.encode_text(clip, text) for text in texts])
        return (judge,)


NODE_CLASS_MAPPINGS = {"TrainFreeDigitOracleJudge": TrainFreeDigitOracleJudge,
                       "TrainFreePromptJudge": TrainFreePromptJudge}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeDigitOracleJudge": "Digit Oracle Judge (TrainFree)",
                              "TrainFreePromptJudge": "Prompt Judge (Diffusion Classifier) (TrainFree)"}
