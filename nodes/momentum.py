"""Momentum samplers (heavy ball on PLMS and DPM-Solver++(2M), generalised heavy ball) as SAMPLER nodes."""
from ..guidance_ops import momentum
from . import host
from .base import check_numbers

PLMS_HB, GHVB, DPMPP_2M_HB = "plms_hb", "ghvb", "dpmpp_2m_hb"


class TrainFreeMomentumSampler:
    CATEGORY = "trainfree/samplers"
    DESCRIPTION = ("Diffusion sampling with momentum (Wizadwongsa et al., ICLR 2024): Polyak's heavy ball on a "
                   "multistep solver's update widens its stability region, which removes the blotchy divergence "
                   "artefacts of few-step sampling at high CFG. beta = 1 is the solver without momentum. For "
                   "SamplerCustom / SamplerCustomAdvanced; any guider and MODEL patches. No extra model passes.")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "solver": ([DPMPP_2M_HB, PLMS_HB, GHVB], {"tooltip":
                       "dpmpp_2m_hb: DPM-Solver++(2M) with heavy ball on its data-prediction combination. "
                       "plms_hb: PLMS (Adams-Bashforth on eps) with heavy ball on its update. ghvb: the generalised "
                       "heavy ball, momentum on eps and Adams-Bashforth coefficients that depend on beta (the "
                       "paper's fractional orders: 3.7 = order 4, beta 0.7)."}),
            "order": ("INT", {"default": 2, "min": 1, "max": 5, "tooltip":
                              "Adams-Bashforth order of plms_hb / ghvb (the paper: 4 for PLMS). dpmpp_2m_hb is "
                              "second order: 2."}),
            "beta": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                               "Momentum: v = (1 - beta) v + beta update. 1 = no momentum; the paper: 0.8-0.9 for "
                               "DPM-Solver++ and PLMS at high CFG and few steps, GHVB orders 3.7 / 2.7 / 1.7."}),
        }}

    def build(self, solver, order, beta):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), {"order": order, "beta": beta})
        if solver == DPMPP_2M_HB:
            if order != 2:
                raise ValueError(f"order is {order} but DPM-Solver++(2M) is second order: set order to 2, or choose "
                                 f"plms_hb / ghvb for another order")

            def loop(denoise, x, sigmas, alpha_of, callback):
                return momentum.sample_dpmpp_2m(denoise, x, sigmas, alpha_of, beta, callback)
        else:
            def loop(denoise, x, sigmas, alpha_of, callback):
                return momentum.sample_plms(denoise, x, sigmas, order, beta, solver == GHVB, callback)
        return (host.denoising_sampler(loop),)


NODE_CLASS_MAPPINGS = {"TrainFreeMomentumSampler": TrainFreeMomentumSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeMomentumSampler": "Momentum Sampler (HB / GHVB) (TrainFree)"}
