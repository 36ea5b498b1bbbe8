"""Cascaded sampling at growing resolutions (FreCaS): a SAMPLER for SamplerCustomAdvanced that runs another
sampler stage by stage inside one ComfyUI sampling run. The user's guider, model patches and wrappers act in
every stage; between stages the clean estimate goes through the VAE (or the latent) to the next size and is noised
again. Frequency-aware CFG and cross-attention map fusion are added to the model options each stage hands the
sampler, the sanctioned way ComfyUI's own CFG++ samplers change theirs."""
import logging
import math

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.model_patcher
import comfy.samplers

from ...guidance_ops import frecas
from .attention import chain_unet_replace_in
from .family import attention_layers, is_flow_model, model_sampling
from .pixel_loss import reload_sampled_models
from .runs import SIDE_PASS

log = logging.getLogger("trainfree")


def timestep_sigma(sampling, timestep, flow):
    """Sigma of a timestep on the 1000-step grid: the discrete schedule's own value for SD models; for flow
    models the (shifted) time of grid index ``timestep``, (t + 1) / 1000 before the shift as the official SD3
    scheduler lays its 1000 steps out."""
    if flow:
        return float(sampling.percent_to_sigma(1.0 - (timestep + 1) / frecas.GRID))
    return float(sampling.sigma(torch.tensor(float(timestep))))


def cascade_sigmas(model, sizes, steps, ends, gamma):
    """The whole cascade's schedule: every stage's sigmas ending at 0, concatenated."""
    sampling, flow = model_sampling(model), is_flow_model(model)
    sigmas, start = [], frecas.GRID - 1
    for s, (n, end) in enumerate(zip(steps, ends)):
        if s > 0:
            ratio = frecas.side_ratio(sizes[s - 1], sizes[s])
            start = (frecas.shifted_start_flow(ends[s - 1], ratio) if flow else
                     frecas.shifted_start_discrete(sampling.sigmas.float().cpu(), ends[s - 1], ratio, gamma))
        if start <= end:
            raise frecas.StageError(f"stage {s + 1} would start at timestep {start}, not above its end {end}: lower "
                                    f"its end timestep (stage_end_timesteps)")
        sigmas += [timestep_sigma(sampling, t, flow) for t in frecas.stage_timesteps(start, end, n)] + [0.0]
    return torch.tensor(sigmas, dtype=torch.float32)


class Plan:
    """What one cascade does: stage latent sizes, steps, FA-CFG's high-band weight (None: off), the
    cross-attention fusion weight (0: off), the transition ('vae' or 'latent') and the VAE."""

    def __init__(self, sizes, steps, fa_high, ca_weight, transition, vae):
        self.sizes, self.steps, self.fa_high, self.ca_weight = sizes, steps, fa_high, ca_weight
        self.transition, self.vae = transition, vae


def cascade_sampler(inner, plan):
    """A KSAMPLER running ``inner`` (a k-diffusion SAMPLER) through the stages of ``plan``. The report of its last
    run is kept on it as ``trainfree_report``."""
    if not hasattr(inner, "sampler_function"):
        raise frecas.StageError("FreCaS runs a k-diffusion sampler in each stage: connect one from KSamplerSelect "
                                f"(or another SAMPLER node built on ComfyUI's KSAMPLER); got {type(inner).__name__}")
    sampler = comfy.samplers.KSAMPLER(None)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        run = _Run(plan, model, x, sigmas, extra_args or {})
        result = run.sample(inner, callback, disable)
        sampler.trainfree_report = run.report()
        log.info("TrainFree FreCaS: %s", sampler.trainfree_report)
        return result

    sampler.sampler_function = sample
    sampler.trainfree_report = None
    return sampler


class _Run:
    def __init__(self, plan, model, x, sigmas, extra_args):
        self.plan, self.model, self.extra = plan, model, extra_args
        self.stages = frecas.split_stages(sigmas)
        self._check(x)
        self.guider = model.inner_model
        self.base = self.guider.inner_model
        self.maps = _AttentionMaps(plan.ca_weight, self.stages) if plan.ca_weight > 0 and len(self.stages) > 1 else None
        self.fa_evaluations = self.fa_skipped = 0
        if plan.fa_high is not None and len(self.stages) > 1 and not _guides(self.guider):
            raise frecas.StageError("FA-CFG needs classifier-free guidance (an unconditional pass): use a CFG "
                                    "guider with cfg above 1 and a negative prompt, or turn fa_cfg off")
        self.x = x
        self.dtype = sigmas.dtype

    def _check(self, x):
        plan = self.plan
        if len(self.stages) != len(plan.sizes) or [len(s) - 1 for s in self.stages] != plan.steps:
            found = [len(s) - 1 for s in self.stages]
            raise frecas.StageError(f"the SIGMAS given hold stages of {found} steps but this FreCaS node plans "
                                    f"{plan.steps}: connect the FreCaS node's own SIGMAS output to the sampler")
        if tuple(x.shape[-2:]) != tuple(plan.sizes[-1]):
            h, w = plan.sizes[-1]
            raise frecas.StageError(f"the latent is {x.shape[-1] * 8}x{x.shape[-2] * 8} px but this FreCaS node "
                                    f"plans {w * 8}x{h * 8}: connect its LATENT output (or an empty latent of "
                                    f"that size)")
        if self.extra.get("denoise_mask") is not None:
            raise frecas.StageError("FreCaS samples a new image and cannot inpaint: remove the latent's noise mask")

    def sample(self, inner, callback, disable):
        x = frecas.subsample(self.x, self.plan.sizes[0])
        offset = 0
        for s, stage in enumerate(self.stages):
            sigmas = torch.tensor(stage, device=x.device, dtype=self.dtype)
            extra = {**self.extra, "model_options": self._options(s)}
            x0 = inner.sampler_function(self.model, x, sigmas, extra_args=extra, callback=_shifted(callback, offset),
                                        disable=disable, **inner.extra_options)
            offset += len(stage) - 1
            if s == len(self.stages) - 1:
                return x0
            comfy.model_management.throw_exception_if_processing_interrupted()
            if self.maps is not None:
                self.maps.end_stage()
            clean = self._transition(x0, self.plan.sizes[s + 1])
            start = self.stages[s + 1][0]
            x = self.base.model_sampling.noise_scaling(torch.tensor([start], device=clean.device),
                                                       self._noise(clean, s + 1), clean, max_denoise=False)
            if callback is not None:
                callback({"i": offset, "denoised": clean, "x": x, "sigma": sigmas[-1], "sigma_hat": sigmas[-1]})
            offset += 1

    def _noise(self, like, stage):
        generator = torch.Generator().manual_seed(int(self.extra.get("seed") or 0) + stage)
        return torch.randn(like.shape, generator=generator).to(like.device, like.dtype)

    def _transition(self, x0, size):
        if self.plan.transition == "latent":
            return F.interpolate(x0, size=tuple(size), mode="bilinear")
        vae = self.plan.vae
        pixels = vae.decode(self.base.process_latent_out(x0))
        if pixels.ndim == 5:  # a video VAE's frames axis
            pixels = pixels.flatten(0, 1)
        factor = pixels.shape[1] // x0.shape[-2]
        up = F.interpolate(pixels.movedim(-1, 1), size=(size[0] * factor, size[1] * factor), mode="nearest")
        latent = vae.encode(up.movedim(1, -1)[..., :3])
        reload_sampled_models(self.guider)
        return self.base.process_latent_in(latent.to(x0.device, x0.dtype))

    def _options(self, stage):
        options = comfy.model_patcher.create_model_options_clone(self.extra.get("model_options", {}))
        if stage > 0 and self.plan.fa_high is not None:
            options = comfy.model_patcher.set_model_options_post_cfg_function(
                options, self._fa_cfg(self.plan.sizes[stage - 1]))
        if self.maps is not None:
            self.maps.install(options, self.guider.model_patcher, stage)
        return options

    def _fa_cfg(self, previous_size):
        high = self.plan.fa_high

        def post_cfg(args):
            if args.get("uncond") is None:  # a patch (the guidance interval) left this step unguided
                self.fa_skipped += 1
                return args["denoised"]
            cond, uncond, scale = args["cond_denoised"], args["uncond_denoised"], args["cond_scale"]
            self.fa_evaluations += 1
            target = frecas.fa_cfg(cond, uncond, scale, high, previous_size)
            return args["denoised"] + (target - (uncond + (cond - uncond) * scale))
        return post_cfg

    def report(self):
        plan = self.plan
        report = {"stages": [f"{w * 8}x{h * 8} px, {n} steps" for (h, w), n in zip(plan.sizes, plan.steps)],
                  "transition": plan.transition,
                  "pixel_weighted_cost": round(frecas.relative_cost(plan.sizes, plan.steps), 4),
                  "fa_cfg_evaluations": self.fa_evaluations, "fa_cfg_unguided_steps": self.fa_skipped}
        if self.maps is not None:
            report["fused_attention_calls"] = self.maps.fused
        return report


def _guides(guider):
    """Whether the guider runs an unconditional pass: a negative prompt and a CFG scale other than 1."""
    cfg = getattr(guider, "cfg", None)
    return "negative" in getattr(guider, "conds", {}) and cfg is not None and not math.isclose(cfg, 1.0)


def _shifted(callback, offset):
    if callback is None:
        return None
    return lambda d: callback({**d, "i": d["i"] + offset})


class _AttentionMaps:
    """Cross-attention maps recorded at the last step of a stage, per kind of row (cond / uncond), and mixed into
    every cross-attention output of the next stage."""

    def __init__(self, weight, stages):
        self.weight = weight
        self.record_sigmas = [stage[-2] for stage in stages[:-1]]  # each non-final stage's last model step
        self.stage = 0
        self.recording, self.merged, self.fused = {}, {}, 0
        self._rows = {}  # the merged maps stacked in a batch's row order, made once per order and device

    def install(self, options, patcher, stage):
        self.stage = stage
        transformer = options.setdefault("transformer_options", {})
        transformer["patches_replace"] = {k: dict(v) for k, v in transformer.get("patches_replace", {}).items()}
        for kind, block in attention_layers(patcher):
            chain_unet_replace_in(transformer, "attn2", kind, block, None, self._link)

    def _link(self, previous):
        def attn2(q, k, v, extra_options, **kwargs):
            out = previous(q, k, v, extra_options, **kwargs)
            if extra_options.get(SIDE_PASS):  # a judge's or a reference prompt's pass: not the cascade's rows
                return out
            kinds, heads = extra_options["cond_or_uncond"], extra_options["n_heads"]
            if self.stage < len(self.record_sigmas) and self._at(extra_options, self.record_sigmas[self.stage]):
                self._record(kinds, frecas.attention_probabilities(q, k, heads))
            if self.merged:
                out = self._fuse(out, v, kinds, heads)
            return out
        return attn2

    @staticmethod
    def _at(extra_options, sigma):
        current = float(extra_options["sigmas"].flatten()[0])
        return math.isclose(current, sigma, rel_tol=1e-5)

    def _record(self, kinds, probs):
        for kind, rows in zip(kinds, probs.chunk(len(kinds))):
            total, count = self.recording.setdefault(kind, {}).get(rows.shape[1], (0.0, 0))
            self.recording[kind][rows.shape[1]] = (total + rows, count + 1)

    def _fuse(self, out, v, kinds, heads):
        if any(kind not in self.merged for kind in kinds):
            return out
        key = (tuple(kinds), out.device)
        if key not in self._rows:
            self._rows[key] = torch.cat([self.merged[kind] for kind in kinds]).to(out.device)
        m = self._rows[key]
        if m.shape[0] != out.shape[0]:
            raise frecas.StageError(f"cross-attention fusion recorded {m.shape[0]} rows but the model now runs "
                                    f"{out.shape[0]}; keep the batch and prompts the same across the cascade")
        self.fused += 1
        return frecas.fuse_attention(out, m, v, heads, self.weight)

    def end_stage(self):
        if not self.recording:
            raise frecas.StageError("no cross-attention map was recorded at the end of a stage: the model has no "
                                    "cross-attention the fusion can use; set ca_fusion to 0")
        self.merged = {kind: frecas.merge_maps({t: total / count for t, (total, count) in groups.items()})
                       for kind, groups in self.recording.items()}
        self.recording, self._rows = {}, {}
