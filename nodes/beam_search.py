"""Diffusion Latent Beam Search (Oshima et al., 2025) as a SAMPLER node."""
from . import host
from .base import check_numbers
from .search_inputs import CATEGORY, check_search_inputs, search_inputs


class TrainFreeLatentBeamSearch:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Diffusion Latent Beam Search (Oshima et al., 2025; stated for video, valid for images): beams "
                   "of Euler ancestral paths; at each searched step every beam draws several candidate next "
                   "latents, each is scored by a lookahead estimate of its finished image (a few deterministic "
                   "steps, then the clean estimate, decoded and scored), and the best candidates go on as the "
                   "beams; the best finished beam is returned. Steps are searched from the first while the budget "
                   "allows (the report lists them). With 1 beam and a budget of one path it is ComfyUI's "
                   "euler_ancestral. For SamplerCustomAdvanced with any guider. SD1.5, SDXL, SD3, Flux.")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **search_inputs(160),
            "beams": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip":
                              "B: latents kept after each searched step (the official code's num_beams, 2)."}),
            "candidates": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip":
                                   "K: next latents drawn per beam at a searched step (the official code's "
                                   "num_candidates, 2). Each costs one lookahead."}),
            "lookahead": ("INT", {"default": 6, "min": 1, "max": 100, "tooltip":
                                  "Model evaluations per candidate's lookahead (the official code: 6): 1 scores the "
                                  "candidate's own clean estimate; more run deterministic steps first (along the "
                                  "remaining schedule, at most one per step) for a sharper estimate."}),
        }}

    def build(self, scorer, vae, budget, beams, candidates, lookahead):
        node = type(self).__name__
        check_numbers(node, self.INPUT_TYPES(), {"budget": budget, "beams": beams, "candidates": candidates,
                                                 "lookahead": lookahead})
        check_search_inputs(node, scorer, vae)
        return (host.search_sampler("beam", scorer, vae, int(budget), beams=int(beams), candidates=int(candidates),
                                    lookahead=int(lookahead)),)


NODE_CLASS_MAPPINGS = {"TrainFreeLatentBeamSearch": TrainFreeLatentBeamSearch}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeLatentBeamSearch": "Latent Beam Search Sampler (TrainFree)"}
