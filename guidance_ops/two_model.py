"""Guidance whose weaker prediction comes from a second model.

Autoguidance (Karras et al., NeurIPS 2024, arXiv 2406.02507): guide the main model D_1 with a weaker version
D_0 of itself (smaller and/or trained shorter), both given the same conditioning:

    D_w = D_0 + w * (D_1 - D_0)

Diffusion-NPO / Self-NPO (Wang et al., arXiv 2505.11777) use the same formula as CFG whose negative branch runs
a model with a negative-preference weight offset (an NPO LoRA): main = base(x, c), guide = base+NPO(x, c_neg).

SINE (Zhang et al., CVPR 2023, arXiv 2212.04489, model-based CFG) mixes a model fine-tuned on one image into the
conditional branch for the early steps t > K and uses plain CFG with the pretrained model afterwards:

    eps = w * [v * eps(x, c) + (1 - v) * eps_hat(x, c_hat)] + (1 - w) * eps(x)

Every combination here is affine (weights sum to one), so it is the same on ComfyUI's denoised predictions.
"""

# Autoguidance presets (EDM2, ImageNet-512, 32-step Heun): main model guided by the named guide.
AUTOGUIDANCE_SCALE = {"edm2-s/xs": 2.10, "edm2-xxl/m": 2.05, "edm2-s/xs-unconditional": 2.85}
SINE_K = 400  # of T = 1000 training timesteps
SINE_V = 0.7


def two_model_guidance(main, guide, scale):
    """D_guide + w (D_main - D_guide): autoguidance, or CFG with an NPO model in the negative branch."""
    return guide + (main - guide) * scale


def sine_active(timestep, k=SINE_K):
    """SINE's model-based guidance runs while the (0..1000) timestep is above K."""
    return timestep > k


def sine_guidance(cond, finetuned_cond, uncond, scale, v=SINE_V):
    """SINE for t > K: pretrained ``cond`` mixed with the fine-tuned model's ``finetuned_cond``, CFG against the
    pretrained ``uncond``."""
    return uncond + (v * cond + (1.0 - v) * finetuned_cond - uncond) * scale
