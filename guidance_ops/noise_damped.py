"""Noise-damped CFG of ScaleCrafter (He et al., ICLR 2024, arXiv 2310.07702, "noise-damped
classifier-free guidance"; ``ndcfg`` in the reference code).

At 16x the pixel count, strong re-dilation lays out good structure but leaves artifacts, and a weaker re-dilation
denoises more cleanly. For the first ``tau`` steps both run and are combined as

    eps = eps_weak(x, empty) + w * (eps_strong(x, c) - eps_strong(x, empty))

so the strong pair gives the guidance direction and the base it is added to, the noise-damped unconditional
prediction, comes from the weakly dilated model. The weights sum to one (1 + w - w), so the combination is the
same on denoised predictions, which is what ComfyUI hands to its guidance hooks. Only the weak model's
unconditional pass is extra.
"""

# ndcfg_tau of the reference settings (50 DDIM steps), equal to their dilate_tau; only the 16x settings use it.
TAU = {"sd1.5_2048": 35, "sd2.1_2048": 37, "sdxl_4096": 35}


def noise_damped_active(step_index, tau):
    """True for the first ``tau`` steps (0-based ``step_index < tau``)."""
    return step_index < tau


def noise_damped_cfg(cond_strong, uncond_strong, uncond_weak, scale):
    """Guidance direction from the strongly dilated pair, base from the weakly dilated unconditional prediction."""
    return uncond_weak + (cond_strong - uncond_strong) * scale
