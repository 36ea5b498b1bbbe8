"""Diffusion Tree Sampling / Diffusion Tree Search (Jain et al., 2025) as a SAMPLER node."""
from . import host
from .base import check_numbers
from .search_inputs import CATEGORY, check_search_inputs, search_inputs

MODES = ("search (DTS*)", "sample (DTS)")


class TrainFreeDiffusionTreeSampling:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Diffusion Tree Sampling (Jain et al., 2025): a tree search over Euler ancestral paths. Each "
                   "finished image's score is backed up the tree as a soft value (1/lambda log mean exp(lambda v) of "
                   "the children); new paths branch from nodes chosen by a Boltzmann policy over the soft values "
                   "(or greedily), and reuse every step above the branch point, so more budget buys better images. "
                   "search (DTS*) returns the best image found; sample (DTS) draws one from the tree, a sample of "
                   "the model reweighted by exp(lambda score). A budget of one path is ComfyUI's euler_ancestral. "
                   "For SamplerCustomAdvanced with any guider. SD1.5, SDXL, SD3, Flux. The report (evaluations, "
                   "paths, tree size, best score) is logged.")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **search_inputs(160),
            "mode": (list(MODES), {"tooltip": "search (DTS*, the paper's choice for text-to-image): greedy "
                                              "selection, returns the best-scoring image found. sample (DTS): "
                                              "Boltzmann selection, returns an image drawn from the tree (aims at "
                                              "the model's distribution reweighted by exp(lambda score), not the "
                                              "maximum)."}),
            "lambda": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip":
                                 "The paper's lambda: inverse temperature of the soft values and the selection. "
                                 "1 with a log-probability scorer aims at p(image | scorer's target). Higher: "
                                 "greedier; 0: plain mean values and uniform selection."}),
            "max_children": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                                     "Branches per node (and initial noises under the root) before the search "
                                     "descends past it (ours: the paper tunes it per task). 1: the first path only "
                                     "(ordinary sampling)."}),
        }}

    def build(self, scorer, vae, budget, mode, max_children, **inputs):
        node = type(self).__name__
        lam = inputs.get("lambda")  # the paper's name, a Python keyword
        if lam is None:
            raise ValueError(f"{node}: input 'lambda' is missing; enter the inverse temperature (default 1.0)")
        check_numbers(node, self.INPUT_TYPES(), {"budget": budget, "lambda": lam, "max_children": max_children})
        check_search_inputs(node, scorer, vae)
        if mode not in MODES:
            raise ValueError(f"{node}: unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        return (host.search_sampler("tree", scorer, vae, int(budget), max_children=int(max_children),
                                    lam=float(lam), greedy=mode == MODES[0]),)


NODE_CLASS_MAPPINGS = {"TrainFreeDiffusionTreeSampling": TrainFreeDiffusionTreeSampling}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeDiffusionTreeSampling": "Diffusion Tree Sampling Sampler (TrainFree)"}
