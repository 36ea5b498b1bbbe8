"""CFG++ samplers (DDIM / Euler with optional ancestral noise, DPM-Solver++(2M)) as SAMPLER nodes."""
from ..guidance_ops import cfgpp
from . import host
from .base import check_numbers

SOLVERS = {"ddim (= euler)": "ddim", "dpmpp_2m": "dpmpp_2m"}


class TrainFreeCFGPPSampler:
    CATEGORY = "trainfree/samplers"
    DESCRIPTION = ("CFG++ (Chung et al., ICLR 2025): each step takes its clean estimate from the guided prediction "
                   "but renoises with the unconditional one, which keeps the sample near the data manifold. The "
                   "guider's CFG is the paper's lambda (0-1; the paper's SD1.5 example 0.6, where CFG would use "
                   "7.5). For SamplerCustom / SamplerCustomAdvanced with any MODEL patches upstream. SD1.5, SDXL, "
                   "SD3, Flux (rectified flow handled in its own alpha-scaled form).")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "solver": (list(SOLVERS), {"tooltip":
                                       "ddim (= euler): the paper's DDIM CFG++ step, which on ComfyUI's sigmas is "
                                       "the Euler step (core's euler_cfg_pp). dpmpp_2m: DPM-Solver++(2M) CFG++, "
                                       "with the unconditional history (core's dpmpp_2m_cfg_pp on eps models)."}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                              "ddim only: share of fresh noise in each renoising (0 = deterministic DDIM, 1 = "
                              "ancestral, as core's euler_ancestral_cfg_pp). dpmpp_2m is deterministic: leave 0."}),
        }}

    def build(self, solver, eta):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), {"eta": eta})
        name = SOLVERS[solver]
        if name != "ddim" and eta != 0:
            raise ValueError(f"eta is {eta} but {solver} is deterministic: set eta to 0, or choose 'ddim (= euler)'")

        def loop(predict, x, sigmas, alpha_of, noise, callback):
            if name == "ddim":
                return cfgpp.sample_ddim(predict, x, sigmas, alpha_of, eta, noise, callback)
            return cfgpp.sample_dpmpp_2m(predict, x, sigmas, alpha_of, callback)
        return (host.guided_sampler(loop, "TrainFree CFG++"),)


NODE_CLASS_MAPPINGS = {"TrainFreeCFGPPSampler": TrainFreeCFGPPSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeCFGPPSampler": "CFG++ Sampler (TrainFree)"}
