"""FreCaS (frequency-aware cascaded sampling) as a SAMPLER + SIGMAS + LATENT for SamplerCustomAdvanced."""
import torch

from ..guidance_ops import frecas
from . import host
from .base import check_numbers, model_input

CATEGORY = "trainfree/high_resolution"
TRANSITIONS = {"vae (decode, upsample, encode)": "vae", "latent (bilinear)": "latent"}
LATENT_FACTOR = 8  # pixels per latent pixel in SD1.5, SDXL, SD3 and Flux
GAMMA = 1.5  # the paper's SDXL 2048 value; flow models take the SD3 shift and must keep it


def _int(default, low, high, step, tooltip):
    return ("INT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


class TrainFreeFreCaS:
    DESCRIPTION = (
        "FreCaS (Zhang et al., ICLR 2025): generate above the model's training size by sampling most steps at the "
        "base size and finishing at growing sizes. Each stage ends on its clean estimate, which is decoded, "
        "upsampled and encoded (or upsampled as a latent) and noised again at a shifted timestep. Later stages use "
        "frequency-aware CFG (a large weight on the newly added high frequencies only) and mix in the previous "
        "stage's cross-attention maps. Wire its SAMPLER, SIGMAS and LATENT into SamplerCustomAdvanced with any "
        "guider (CFGGuider, the pack's guidance patches on the model). Defaults: the paper's SDXL 1024 -> 2048 "
        "setting. Logs the stages and their pixel-weighted cost against direct sampling.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER", "SIGMAS", "LATENT")
    RETURN_NAMES = ("sampler", "sigmas", "latent")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input("The model the guider samples (its noise schedule sets the stages' sigmas)."),
            "sampler": ("SAMPLER", {"tooltip": "The solver every stage runs (the paper uses DDIM; 'ddim' or 'euler' "
                                               "from KSamplerSelect)."}),
            "width": _int(2048, 64, 16384, 8, "Width of the final image in pixels."),
            "height": _int(2048, 64, 16384, 8, "Height of the final image in pixels."),
            "batch_size": _int(1, 1, 64, 1, "Images per run (the LATENT output's batch)."),
            "base_width": _int(1024, 64, 16384, 8, "Width of the first stage: the model's training size (SD1.5 512, "
                                                   "SDXL / SD3 / Flux 1024). Stages grow geometrically to the "
                                                   "final size."),
            "base_height": _int(1024, 64, 16384, 8, "Height of the first stage (the model's training size)."),
            "stage_steps": ("STRING", {"default": "40, 10", "tooltip": "Steps of each stage, comma separated; the "
                                       "number of entries is the number of stages. Paper: SDXL 2048 '40, 10'; SDXL "
                                       "4096 '30, 5, 15'; SD2.1 1024 '40, 10'; SD2.1 2048 '30, 10, 10'; SD3 2048 "
                                       "'20, 8'."}),
            "stage_end_timesteps": ("STRING", {"default": "200, 0", "tooltip": "Timestep (0-999) at which each stage "
                                               "ends; the last is 0. Paper: SDXL 2048 '200, 0'; SDXL 4096 '400, 200, "
                                               "0'; SD2.1 1024 '100, 0'; SD2.1 2048 '200, 200, 0'; SD3 '50, 0'."}),
            "gamma": ("FLOAT", {"default": GAMMA, "min": 0.0, "max": 10.0, "step": 0.1,
                                "tooltip": "How far each next stage's start shifts to more noise: SNR times "
                                           "(side ratio)^-gamma. Paper: SDXL 2048 1.5, SDXL 4096 2.0, SD2.1 3.0. "
                                           "Flow models (SD3, Flux) follow the official SD3 resolution shift; "
                                           "leave gamma at 1.5 for them."}),
            "fa_cfg": ("BOOLEAN", {"default": True, "tooltip": "Frequency-aware CFG in the stages after the first "
                                                               "(needs cfg above 1)."}),
            "fa_cfg_high": ("FLOAT", {"default": 35.0, "min": 0.0, "max": 200.0, "step": 0.5,
                                      "tooltip": "Guidance weight of the newly added high-frequency band; the band "
                                                 "the previous stage held keeps the guider's cfg. Paper: 35 (SDXL, "
                                                 "SD3, SD2.1 2048), 45 (SD2.1 1024)."}),
            "ca_fusion": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "Weight of the previous stage's cross-attention maps in every "
                                               "cross-attention output of the next stage (0 = off). Paper: 0.6 "
                                               "(SDXL, SD2.1 1024), 0.4 (SD2.1 2048). UNets only."}),
            "transition": (list(TRANSITIONS), {"tooltip": "How the clean estimate reaches the next size: the "
                                                          "paper's decode, nearest upsample in pixels, encode "
                                                          "(needs the VAE), or a faster bilinear upsample of the "
                                                          "latent."}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "The model's VAE, for the 'vae' transition."}),
        }}

    def build(self, model, sampler, width, height, batch_size, base_width, base_height, stage_steps,
              stage_end_timesteps, gamma, fa_cfg, fa_cfg_high, ca_fusion, transition, vae=None):
        check_numbers("TrainFreeFreCaS", self.INPUT_TYPES(), locals())
        title = "TrainFreeFreCaS"
        family = host.require_family(model, title, host.UNET_FAMILIES + host.DIT_FAMILIES)
        steps = frecas.parse_list(stage_steps, "stage_steps", int)
        ends = frecas.parse_list(stage_end_timesteps, "stage_end_timesteps", int)
        frecas.check_stages(steps, ends)
        for name, value in (("width", width), ("height", height), ("base_width", base_width),
                            ("base_height", base_height)):
            if value % LATENT_FACTOR:
                raise frecas.StageError(f"{name} {value} is not a multiple of {LATENT_FACTOR} px; use "
                                        f"{value // LATENT_FACTOR * LATENT_FACTOR} or "
                                        f"{(value // LATENT_FACTOR + 1) * LATENT_FACTOR}")
        if ca_fusion > 0 and family in host.DIT_FAMILIES:
            raise host.UnsupportedModel(
                f"{title}: cross-attention map fusion is defined for UNets' cross-attention layers; {family} has "
                f"joint attention, where the official code's SD3 branch does not run. Set ca_fusion to 0 (the "
                f"cascade and FA-CFG serve this model).")
        if host.is_flow_model(model) and gamma != GAMMA:
            raise frecas.StageError(f"{title}: gamma shifts the SD models' discrete schedule; flow models (SD3, "
                                    f"Flux) take the resolution shift of the official SD3 code. Reset gamma to 1.5.")
        mode = TRANSITIONS[transition]
        if mode == "vae" and vae is None:
            raise frecas.StageError(f"{title}: the 'vae' transition needs the model's VAE: connect it, or choose "
                                    f"the latent transition")
        sizes = frecas.stage_sizes((base_height // LATENT_FACTOR, base_width // LATENT_FACTOR),
                                   (height // LATENT_FACTOR, width // LATENT_FACTOR), len(steps), LATENT_FACTOR)
        sigmas = host.cascade_sigmas(model, sizes, steps, ends, gamma)
        plan = host.CascadePlan(sizes, steps, fa_cfg_high if fa_cfg else None, ca_fusion, mode, vae)
        channels = host.latent_channels(model)
        latent = torch.zeros(batch_size, channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
        return host.cascade_sampler(sampler, plan), sigmas, {"samples": latent}


NODE_CLASS_MAPPINGS = {"TrainFreeFreCaS": TrainFreeFreCaS}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeFreCaS": "FreCaS Cascade (TrainFree)"}
