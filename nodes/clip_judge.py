"""CLIP as a judge: zero-shot classification of images over a list of prompts, for guidance that steers by a
judge (dynamic CFG)."""
import logging

from . import host
from .base import prompt_lines

log = logging.getLogger("trainfree")


class TrainFreeCLIPJudge:
    CATEGORY = "trainfree/judges"
    DESCRIPTION = ("CLIP as a judge: an image's log-probability for each prompt is CLIP's zero-shot classification "
                   "(the log-softmax over the prompts of CLIP's logit scale times the cosine between the image "
                   "embedding and the prompt's projected text embedding). Needs a CLIP vision model and the text "
                   "encoder of the same CLIP: ViT-L with a CLIP-L file that has its text projection (an SD1.5 "
                   "checkpoint's CLIP has none), or ViT-bigG with SDXL's CLIP. Images are decoded by the VAE and "
                   "resized to the vision model's input, so every judged estimate costs a decode and a ViT pass.")
    RETURN_TYPES = ("TRAINFREE_JUDGE",)
    RETURN_NAMES = ("judge",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "A CLIP image tower from Load CLIP Vision (CLIPVisionLoader): "
                                                       "ViT-L/14 for SD1.5's CLIP-L, ViT-bigG for SDXL's CLIP-G."}),
            "clip": ("CLIP", {"tooltip": "A CLIP whose text encoder matches the vision model (same CLIP, with its "
                                         "text projection): e.g. SDXL's CLIP with ViT-bigG, or a clip_l file of SD3 / "
                                         "Flux loaded as stable_diffusion with ViT-L."}),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na blurry photo",
                                   "tooltip": "The labels, one prompt per line (at least two): the prompt you want "
                                              "and alternatives it should beat, e.g. the negative prompt or 'a "
                                              "blurry photo'. Zero-shot scores are relative: a lone prompt scores "
                                              "nothing."}),
        }}

    def make(self, clip_vision, clip, prompts):
        labels = prompt_lines(prompts, "prompts")
        if len(labels) < 2:
            raise ValueError("prompts needs at least two lines: the prompt and an alternative to compare it with "
                             "(e.g. the negative prompt or 'a blurry photo'); CLIP's zero-shot scores are relative")
        judge = host.clip_judge_from(clip_vision, clip, labels)
        log.info("TrainFree CLIP judge: %d prompts, embeddings of width %d, logit scale %.1f", len(labels),
                 judge.text_embeds.shape[1], judge.logit_scale)
        return (judge,)


NODE_CLASS_MAPPINGS = {"TrainFreeCLIPJudge": TrainFreeCLIPJudge}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeCLIPJudge": "CLIP Judge (TrainFree)"}
