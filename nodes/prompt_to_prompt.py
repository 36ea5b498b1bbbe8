"""Prompt-to-Prompt editing (Hertz et al., ICLR 2023) of an inverted real image or a generated one: the source and
target prompts are sampled side by side from the same noise, the target borrowing the source's attention maps."""
import logging

import torch

from ..guidance_ops import inversion as ops
from ..guidance_ops import prompt_to_prompt as p2p
from . import host
from .base import check_numbers
from .inversion import (CATEGORY, UNCOND_MODES, check_inversion_model, inversion_input, predictor,
                        unconditional_branch)

log = logging.getLogger("trainfree")
P2P_UNCOND_MODES = UNCOND_MODES[:3]


def _words(text):
    return [w.strip() for w in text.split(",") if w.strip()]


def _occurrences(prompt_ids, word_ids):
    try:
        return p2p.word_positions(prompt_ids, word_ids)
    except ValueError:
        return ()


def _positions(clip, prompt_ids, words, where):
    found = set()
    for word in words:
        positions = _occurrences(prompt_ids, host.word_token_ids(clip, word))
        if not positions:
            raise ValueError(f"'{word}' is not a word of the {where} prompt: name words it contains, separated by "
                             f"commas")
        found.update(positions)
    return tuple(sorted(found))


def _blend_positions(clip, source_ids, target_ids, words):
    """Each blend word's tokens in whichever prompts hold it (a swapped word is in one of them only)."""
    source, target = set(), set()
    for word in words:
        ids = host.word_token_ids(clip, word)
        in_source, in_target = _occurrences(source_ids, ids), _occurrences(target_ids, ids)
        if not in_source and not in_target:
            raise ValueError(f"blend word '{word}' must occur in the source or the target prompt: name words of "
                             f"those prompts, separated by commas")
        source.update(in_source)
        target.update(in_target)
    return tuple(sorted(source)), tuple(sorted(target))


class TrainFreePromptToPrompt:
    DESCRIPTION = ("Prompt-to-Prompt editing on SD1.5 / SDXL: samples the source prompt and the edited (target) "
                   "prompt together from an inversion (a real image: TrainFree Invert or Null-Text Inversion) and "
                   "gives the target the source's cross-attention maps for the first steps (word swap: 'a red digit' "
                   "-> 'a blue digit'; refinement: words added; reweight: a word's attention scaled), and its "
                   "self-attention maps for fewer steps, so the layout stays. Local blend keeps everything outside "
                   "the named words' attention from the source. Outputs the edit and the source reconstruction. "
                   "Joint-attention DiTs (SD3, Flux) are refused: they have no separate cross-attention.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("edited", "source")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 / SDXL model the inversion was made with."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder (to find the words' tokens)."}),
            "inversion": inversion_input(),
            "source_text": ("STRING", {"multiline": True, "default": "a red digit seven on a dark background",
                                       "tooltip": "The prompt the image was inverted with (checked against the "
                                                  "inversion)."}),
            "target_text": ("STRING", {"multiline": True, "default": "a blue digit seven on a dark background",
                                       "tooltip": "The edited prompt. Word swap needs the same token count."}),
            "edit": (list(p2p.MODES), {"default": "word swap",
                                       "tooltip": "word swap: words replaced one for one; refinement: words added "
                                                  "or removed (tokens aligned); reweight: the reweight words' "
                                                  "attention scaled."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                              "tooltip": "CFG scale (null-text embeddings need the scale they were made for)."}),
            "unconditional": (list(P2P_UNCOND_MODES), {"default": P2P_UNCOND_MODES[1],
                                                       "tooltip": "The unconditional branch of both prompts, as in "
                                                                  "TrainFree Sample From Inversion."}),
            "cross_replace": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05,
                                        "tooltip": "Share of the steps, from the start, in which the target takes "
                                                   "the source's cross-attention maps (paper 0.8)."}),
            "self_replace": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.05,
                                       "tooltip": "Share of the steps in which the target takes the source's self-"
                                                  "attention maps (real-image notebook 0.4)."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt; only with 'negative prompt'."}),
            "blend_words": ("STRING", {"default": "", "tooltip": "Local blend: words (comma-separated) of the "
                                                                 "source and target prompts whose attention marks "
                                                                 "the region to edit; empty = no blend."}),
            "reweight_words": ("STRING", {"default": "", "tooltip": "Reweight: words of the target prompt whose "
                                                                    "attention is scaled."}),
            "reweight_scale": ("FLOAT", {"default": 2.0, "min": -10.0, "max": 10.0, "step": 0.1,
                                         "tooltip": "Reweight: the factor on those words' attention."}),
            "blend_threshold": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.05,
                                          "tooltip": "Local blend: the share of the strongest attention above "
                                                     "which a pixel is edited (paper 0.3)."}),
        }}

    def edit(self, model, clip, inversion, source_text, target_text, edit, cfg, unconditional, cross_replace,
             self_replace, negative=None, blend_words="", reweight_words="", reweight_scale=2.0, blend_threshold=0.3):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), locals())
        check_inversion_model(inversion, model)
        if inversion.sampler != "euler":
            raise ValueError("prompt-to-prompt replays a DDIM (euler) inversion; invert with sampler euler")
        mode, negative = unconditional_branch(inversion, unconditional, negative, cfg)
        source = host.encode_text(clip, source_text)
        if not _same_prompt(source, inversion.source):
            raise ValueError("source_text does not encode to the prompt the image was inverted with: enter the "
                             "inversion's source prompt exactly, with the same CLIP")
        target = host.encode_text(clip, target_text)
        source_ids, target_ids = host.prompt_token_ids(clip, source_text), host.prompt_token_ids(clip, target_text)
        blend_source, blend_target = _blend_positions(clip, source_ids, target_ids, _words(blend_words))
        plan = p2p.make_plan(source_ids, target_ids, edit, cross_replace, self_replace,
                             reweight_tokens=_positions(clip, target_ids, _words(reweight_words), "target"),
                             reweight_scale=reweight_scale, blend_source_tokens=blend_source,
                             blend_target_tokens=blend_target, blend_threshold=blend_threshold)
        rows = inversion.pivots.shape[1]
        patched = model.clone()
        control = host.install_prompt_to_prompt(patched, plan, rows)
        positive = _both(host.conditioning_tensors(source, "source")[0], host.conditioning_tensors(target, "target")[0],
                         inversion.source_extra, rows)

        def body(loop):
            pivots = inversion.pivots.to(loop.device)
            base = predictor(loop, "euler", cfg)

            def predict(x, sigma, i):
                if mode != 1:
                    return base(x, sigma)
                null = inversion.null_embeddings[i].to(loop.device)
                with loop.negative_replaced(torch.cat([null, null])):
                    return base(x, sigma)
            x = ops.replay(predict, torch.cat([pivots[0], pivots[0]]), loop.sigmas,
                           lambda x, i: control.blend(x, i), loop.step_done)
            return loop.latent_out(x).cpu()

        samples = host.run_loop(patched, positive, negative, cfg, (2 * rows, *inversion.pivots.shape[2:]),
                                inversion.sigmas, body)
        log.info("TrainFree prompt-to-prompt: %s", control.report())
        return {"samples": samples[rows:]}, {"samples": samples[:rows]}


def _same_prompt(conditioning, stored):
    cross = conditioning[0][0].float().cpu()
    return cross.shape == stored["cross"].shape and torch.allclose(cross, stored["cross"], rtol=1e-3, atol=1e-3)


def _both(source, target, numbers, rows):
    """One CONDITIONING whose rows are the source prompt's ``rows`` then the target's."""
    def rows_of(t):
        return t.expand(rows, *t.shape[1:]) if t.shape[0] == 1 else t
    tensors = {k: torch.cat([rows_of(source[k]), rows_of(target[k])]) for k in source if k in target}
    return host.as_conditioning(tensors, numbers)


NODE_CLASS_MAPPINGS = {"TrainFreePromptToPrompt": TrainFreePromptToPrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreePromptToPrompt": "Prompt-to-Prompt Edit (TrainFree)"}
