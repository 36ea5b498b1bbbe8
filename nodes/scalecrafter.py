"""ScaleCrafter's re-dilation, with its noise-damped CFG and dispersed convolution, as a MODEL -> MODEL patch for
UNets."""
import logging
from dataclasses import dataclass, field

from ..guidance_ops import noise_damped as ndcfg
from ..guidance_ops import redilation
from . import host
from .base import ModelPatchNode

log = logging.getLogger("trainfree")

PRESET_DEFAULT, ON, OFF = "preset default", "on", "off"
SWITCH = [PRESET_DEFAULT, ON, OFF]
PRESET_TAU = -1.0  # dilate_percent: take the preset's own share (the official config's dilate_tau / 50)


@dataclass
class ScaleCrafterRun:
    timestep_of: object
    factors: dict = None  # the host's: {conv path: (factor, dispersed)} of the running evaluation
    conv_calls: dict = field(default_factory=dict)  # the host's: re-dilated calls per conv path
    evaluations: set = field(default_factory=set)  # sigmas evaluated (a batch ComfyUI splits is one evaluation)
    dilated: set = field(default_factory=set)
    dispersed: set = field(default_factory=set)
    weak_passes: int = 0
    used: dict = field(default_factory=dict)  # {(path, weak): set of factors run}


def _paper_values():
    return "; ".join(f"{p.name}: {p.tau:g}" + (" progressive" if p.progressive else "")
                     + (", noise-damped" if p.weak_table or p.pixels == 16 else "")
                     for p in redilation.PRESETS.values())


class TrainFreeScaleCrafter(ModelPatchNode):
    CATEGORY = "trainfree/high_resolution"
    DESCRIPTION = ("ScaleCrafter re-dilation (He et al., ICLR 2024): sampling a UNet at 4x or 16x its training pixel "
                   "count, the 3x3 convolutions of its inner levels run with their kernels dilated (by the "
                   "official per-level tables) during the early steps, which keeps objects from repeating. "
                   "Optional noise-damped CFG (16x presets): the unconditional base comes from a weakly re-dilated "
                   "pass of the same model (+1 unconditional pass per damped step). Optional dispersed convolution "
                   "(16x presets; off by default, as in every released config): the 3x3 kernels of the listed "
                   "sites spread to 5x5 by the official least-squares transform, at half the dilation. "
                   "SD1.5 / SD2.x / SDXL; for SD3 / Flux use FreCaS.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5, SD2.x or SDXL UNet (SD3 / Flux: use FreCaS)."}),
            "preset": (list(redilation.PRESETS), {
                "default": "SD1.5 1024x1024 (4x pixels)",
                "tooltip": "Per-level dilation table of the official settings for that model and output size "
                           "(pixel count relative to training: SD1.5 / SD2.1 512 px, SDXL 1024 px). 'generic' "
                           "presets fit any UNet by relative depth, following SD1.5's tables."}),
            "dilate_percent": ("FLOAT", {
                "default": PRESET_TAU, "min": PRESET_TAU, "max": 1.0, "step": 0.01,
                "tooltip": "Share of the schedule, from the start, whose steps are re-dilated (and noise-damped). "
                           "-1 = the preset's own value (the official dilate_tau / 50; generic ones: SD1.5's): "
                           + _paper_values()
                           + ". 0 = off."}),
            "progressive": (SWITCH, {"default": PRESET_DEFAULT,
                                     "tooltip": "Dilation decays from the table's factor to 2 over the dilated "
                                                "steps: max(ceil(d (1 - p / dilate_percent)), 2) at schedule "
                                                "position p. The paper's 16x settings use it."}),
            "noise_damped": (SWITCH, {"default": PRESET_DEFAULT,
                                      "tooltip": "Noise-damped CFG: D = D_u(weak) + w (D_c - D_u) during the dilated "
                                                 "steps, the weak unconditional pass with the preset's weak table. "
                                                 "Only presets with a weak table (16x) have it; their default is on. "
                                                 "Needs cfg > 1."}),
            "disperse_percent": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": "Dispersed convolution for this share of the schedule (at most dilate_percent): the "
                           "preset's dispersion sites (16x presets) run their 3x3 kernel spread to 5x5 (the "
                           "official transform, kernel_disperse(3, 5, 3, 2, 0.05)) at half the dilation. 0 = off, "
                           "as in every released config (inflate_tau 0)."}),
        }}

    def patch(self, model, preset, dilate_percent, progressive, noise_damped, disperse_percent):
        family = host.model_family(model)
        if family in host.DIT_FAMILIES:
            raise host.UnsupportedModel(f"ScaleCrafter re-dilates UNet convolutions; {host.FAMILY_NAMES[family]} is "
                                        f"a DiT without them: use the pack's FreCaS node for high resolutions")
        host.require_family(model, "TrainFree ScaleCrafter", host.UNET_FAMILIES)
        for name, value in (("preset", preset), ("progressive", progressive), ("noise_damped", noise_damped)):
            choices = redilation.PRESETS if name == "preset" else SWITCH
            if value not in choices:
                raise ValueError(f"input {name!r} is {value!r}: choose one of {', '.join(choices)}")
        chosen = redilation.PRESETS[preset]
        sites, levels = host.unet_conv_sites(model)
        table, weak_table, disperse_sites = redilation.preset_tables(chosen, levels)
        strong = redilation.conv_factors(chosen, table, sites, levels)
        damped = weak_table is not None if noise_damped == PRESET_DEFAULT else noise_damped == ON
        if damped and weak_table is None:
            raise ValueError(f"preset {preset!r} has no weak table (the paper damps only its 16x settings): set "
                             f"noise_damped to 'off' or 'preset default', or choose a 16x preset")
        weak = redilation.conv_factors(chosen, weak_table, sites, levels) if damped else {}
        tau = chosen.tau if dilate_percent == PRESET_TAU else dilate_percent
        if tau < 0:
            raise ValueError(f"input 'dilate_percent' is {dilate_percent}: enter -1 (the preset's value) or a share "
                             f"from 0 to 1")
        decay = chosen.progressive if progressive == PRESET_DEFAULT else progressive == ON
        if disperse_percent > 0 and not disperse_sites:
            raise ValueError(f"preset {preset!r} has no dispersion sites (the paper disperses only in its 16x "
                             f"settings): set disperse_percent to 0 or choose a 16x preset")
        if disperse_percent > tau:
            raise ValueError(f"disperse_percent ({disperse_percent}) exceeds dilate_percent ({tau}): dispersion "
                             f"runs inside the re-dilated steps (at half their dilation); lower it")
        spread = set(redilation.conv_factors(chosen, {site: 1 for site in disperse_sites}, sites, levels))

        m = model.clone()
        key = host.new_key("scalecrafter")

        def start(guider, *_):
            patcher = guider.model_patcher
            return ScaleCrafterRun(lambda sigma: host.sigma_to_timestep(patcher, sigma))

        def position(run, sigma):
            return redilation.schedule_position(run.timestep_of(sigma))

        def choose(run, sigma, is_weak):
            p, sigma = position(run, sigma), float(sigma)
            run.evaluations.add(sigma)
            if p >= tau:
                return None
            run.dilated.add(sigma)
            dispersing = p < disperse_percent
            if dispersing:
                run.dispersed.add(sigma)
            factors = {}
            for path, f in (weak if is_weak else strong).items():
                f = redilation.step_factor(f, p, tau, decay)
                factors[path] = (f / 2, True) if dispersing and path in spread else (f, False)
                run.used.setdefault((path, is_weak), set()).add(factors[path][0])
            return factors

        def post_cfg(args):
            run = scope.state
            if run is None or args["uncond"] is None or position(run, args["sigma"]) >= tau:
                return args["denoised"]
            weak_uncond = host.predict_weak_uncond(args, scope)
            run.weak_passes += 1
            cond, uncond, scale = args["cond_denoised"], args["uncond_denoised"], args["cond_scale"]
            damped_cfg = ndcfg.noise_damped_cfg(cond, uncond, weak_uncond, scale)
            return args["denoised"] + (damped_cfg - (uncond + (cond - uncond) * scale))

        def finish(run):
            log.info("TrainFree ScaleCrafter (%s): %d of %d evaluations re-dilated (%d dispersed), %d convolutions, "
                     "%d weak passes", preset, len(run.dilated), len(run.evaluations), len(run.dispersed),
                     len(run.conv_calls), run.weak_passes)
            return {"evaluations": len(run.evaluations), "dilated": len(run.dilated), "dispersed": len(run.dispersed),
                    "weak_passes": run.weak_passes,
                    "conv_calls": dict(run.conv_calls),
                    "factors": {f"{path}{' (weak)' if w else ''}": sorted(fs) for (path, w), fs in run.used.items()}}

        scope = host.RunScope(m, key, start, finish)
        host.redilate_convolutions(m, scope, sorted(set(strong) | set(weak)), choose)
        if damped:
            host.add_post_cfg(m, post_cfg)
        return (m,)


NODE_CLASS_MAPPINGS = {"TrainFreeScaleCrafter": TrainFreeScaleCrafter}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeScaleCrafter": "ScaleCrafter Re-Dilation (TrainFree)"}
