"""The pack's own sampling loops (inversion, null-text optimisation, replaying an inversion, FlowOpt), run inside
ComfyUI's CFGGuider as a custom sampler: model loading and memory management, the conditioning's processing
(areas, masks, ControlNets, the model's extra inputs), MODEL patches and wrappers all stay ComfyUI's. The loop
gets a ``Loop`` handle to evaluate the model, follow progress and be interrupted."""
import contextlib

import torch

import comfy.conds
import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.utils

from .family import UnsupportedModel, model_sampling


def run_loop(model, positive, negative, cfg, latent_shape, sigmas, body, seed=0, steps=None, progress=None):
    """Run ``body(loop)`` inside a sampling run of ``model`` with these prompts and ``sigmas`` (a descending
    schedule), and return what it returns. ``steps`` sizes the progress bar (default: one per sigma step);
    ``progress`` continues one (a node that runs several loops)."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else _empty_like(positive))
    guider.set_cfg(cfg)
    result = {}
    if progress is None:
        progress = comfy.utils.ProgressBar(steps if steps is not None else len(sigmas) - 1)

    def sampler(k_model, x, sigmas_, extra_args, callback, disable):
        result["value"] = body(Loop(k_model, guider, extra_args, sigmas_, progress))
        return x  # the loop hands its results back itself; the sampler's own output is not used

    zeros = torch.zeros(latent_shape)
    guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(sampler), sigmas.clone(), disable_pbar=True, seed=seed)
    return result["value"]


def sample_latent(model, positive, negative, cfg, sampler_name, scheduler, steps, seed, latent):
    """A plain sampling run, as KSampler makes it (no progress bar of its own); stops if the user interrupts."""
    import comfy.sample
    comfy.model_management.throw_exception_if_processing_interrupted()
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               seed=seed, disable_pbar=True)


def sampler_names():
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names():
    return list(comfy.samplers.KSampler.SCHEDULERS)


def empty_latent(model, width, height):
    """One empty latent of ``model``'s family for a ``width`` x ``height`` image (every family the pack serves
    works at 1/8 of the pixels)."""
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8 (got {width} x {height}): the latent has one "
                         f"cell per 8 x 8 pixels")
    return torch.zeros(1, model.model.latent_format.latent_channels, height // 8, width // 8)


def progress_bar(total):
    return comfy.utils.ProgressBar(total)


def interrupted():
    return comfy.model_management.processing_interrupted()


def throw_if_interrupted():
    comfy.model_management.throw_exception_if_processing_interrupted()


def _empty_like(positive):
    """An unconditional input when the node has none: the prompt's own shape with zeroed tensors. Only used
    where guidance is off (cfg 1), when ComfyUI does not evaluate it."""
    return [[torch.zeros_like(c[0]), {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in c[1].items()}]
            for c in positive]


class Loop:
    """The handle a loop body gets: model evaluations in ComfyUI's sampling space, progress and interrupt."""

    def __init__(self, k_model, guider, extra_args, sigmas, progress):
        self._k_model, self._guider, self._extra = k_model, guider, extra_args
        self.sigmas, self._progress, self.done = sigmas, progress, 0
        self.device = sigmas.device
        self.sampling = model_sampling(guider.model_patcher)
        self._parts, self._parts_options = {}, None

    # ---- model evaluations

    def denoise(self, x, sigma, cfg=None):
        """The sampler's denoised prediction at ``sigma`` (every patch and wrapper on the model acts), with the
        guider's scale or ``cfg``."""
        with self._scale(cfg):
            return self._k_model(x, self._sigma_rows(x, sigma), **self._extra)

    def denoise_parts(self, x, sigma, cfg):
        """``(guided, cond, uncond)`` denoised predictions at ``sigma``: the unconditional pass runs even at
        cfg 1, and the parts are read after the pre-CFG patches, as ComfyUI's own CFG++ samplers read them."""
        if self._parts_options is None:  # the model options with the reading post-CFG function, made once per run
            def capture(args):
                self._parts["cond"], self._parts["uncond"] = args["cond_denoised"], args["uncond_denoised"]
                return args["denoised"]
            self._parts_options = comfy.model_patcher.set_model_options_post_cfg_function(
                comfy.model_patcher.create_model_options_clone(self._extra["model_options"]), capture,
                disable_cfg1_optimization=True)
        with self._scale(cfg):
            guided = self._k_model(x, self._sigma_rows(x, sigma), **{**self._extra, "model_options": self._parts_options})
        return guided, self._parts.pop("cond"), self._parts.pop("uncond")

    def uncond_with_grad(self, x, sigma, cross):
        """The unconditional prediction for text embedding ``cross``, differentiable in ``cross`` (call inside
        ``gradients.enabled()`` on a model made ``trainable``)."""
        conds = [self._replace_cross(c, cross) for c in self._negative()]
        return comfy.samplers.calc_cond_batch(self._guider.inner_model, [conds], x, self._sigma_rows(x, sigma),
                                              self._extra["model_options"])[0]

    def negative_cross(self):
        """The unconditional prompt's text embedding as the model receives it."""
        return self._negative()[0]["model_conds"]["c_crossattn"].cond

    def input_scale(self, sigma):
        """The factor the network's input gets at ``sigma`` (1 / sqrt(sigma^2 + 1) for eps / v models, 1 for flow)."""
        one = torch.ones(1, device=self.device)
        return float(self.sampling.calculate_input(torch.as_tensor(sigma, device=self.device), one))

    def latent_in(self, latent):
        return self._guider.inner_model.process_latent_in(latent.to(self.device, torch.float32))

    def latent_out(self, x):
        return self._guider.inner_model.process_latent_out(x.to(torch.float32))

    # ---- progress

    def step_done(self, count=1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done += count
        self._progress.update(count)

    # ---- internals

    @staticmethod
    def _sigma_rows(x, sigma):
        """One sigma per row of ``x``: ``sigma`` is one value, or one per row."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).flatten()
        return sigma if sigma.numel() == x.shape[0] else sigma.reshape(1).expand(x.shape[0])

    @contextlib.contextmanager
    def _scale(self, cfg):
        saved = self._guider.cfg
        if cfg is not None:
            self._guider.cfg = cfg
        try:
            yield
        finally:
            self._guider.cfg = saved

    def _negative(self):
        negative = self._guider.conds.get("negative") or []
        plain = [c for c in negative if "c_crossattn" in c.get("model_conds", {})]
        if len(plain) != 1 or len(negative) != 1 or "area" in plain[0] or plain[0].get("mask") is not None:
            raise UnsupportedModel("null-text inversion optimises one unconditional text embedding: connect a single "
                                   "plain negative prompt (one CLIPTextEncode, no areas, masks or combined prompts)")
        return negative

    @staticmethod
    def _replace_cross(cond, cross):
        model_conds = dict(cond["model_conds"])
        model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(cross)
        return {**cond, "model_conds": model_conds}

    @contextlib.contextmanager
    def negative_replaced(self, cross):
        """Evaluations inside see the unconditional prompt's text embedding replaced by ``cross`` (null-text
        inversion's per-step embedding)."""
        saved = self._guider.conds["negative"]
        self._guider.conds["negative"] = [self._replace_cross(c, cross) for c in self._negative()]
        try:
            yield
        finally:
            self._guider.conds["negative"] = saved
