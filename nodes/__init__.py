"""ComfyUI adapters: one module per technique, all going through ``host``."""
from . import (adaptive_guidance, apg, beam_search, best_of_n, cache, cache_search, cfgpp, clip_judge,
               cycle_diffusion, diffusion_classifier, dynamic_cfg, elucd, fdg, flowopt, frecas, gfcg, interval,
               inversion, inversion_files, judges, linear_ag, measurement, momentum, nasa, noise_damped, pag,
               prompt_to_prompt, red_diff, reference_model, residual_cfg, scalecrafter, scorers, steered_diffusion,
               tree_sampling, two_model)

_MODULES = (reference_model, pag, apg, fdg, interval, noise_damped, residual_cfg, two_model, inversion,
            inversion_files, prompt_to_prompt, flowopt, scalecrafter, frecas, cache, cache_search, cfgpp, momentum,
            adaptive_guidance, linear_ag, diffusion_classifier, judges, gfcg, nasa, clip_judge, dynamic_cfg,
            measurement, red_diff, steered_diffusion, cycle_diffusion, scorers, elucd, tree_sampling, beam_search,
            best_of_n)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in _MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
