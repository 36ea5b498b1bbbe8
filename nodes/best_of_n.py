"""Best-of-N as a SAMPLER node: the baseline every inference-time search must beat at equal budget."""
from . import host
from .base import check_numbers
from .search_inputs import CATEGORY, check_search_inputs, search_inputs


class TrainFreeBestOfN:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Best-of-N: as many independent Euler ancestral paths as the budget pays for (budget // steps), "
                   "each finished image scored, the best returned. The first path is ComfyUI's euler_ancestral for "
                   "the noise seed, so a budget of one path is ordinary sampling. For SamplerCustomAdvanced with "
                   "any guider. SD1.5, SDXL, SD3, Flux. The report (paths, scores, evaluations) is logged.")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": search_inputs(160)}

    def build(self, scorer, vae, budget):
        node = type(self).__name__
        check_numbers(node, self.INPUT_TYPES(), {"budget": budget})
        check_search_inputs(node, scorer, vae)
        return (host.search_sampler("best_of_n", scorer, vae, int(budget)),)


NODE_CLASS_MAPPINGS = {"TrainFreeBestOfN": TrainFreeBestOfN}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeBestOfN": "Best-of-N Sampler (TrainFree)"}
