"""The pack's own samplers as ComfyUI SAMPLER objects (KSAMPLER): the loop lives in ``guidance_ops`` and gets the
guided and the unconditional denoised prediction of each evaluation; the unconditional one is read in a post-CFG
function added to the sampler's own model options, the way ComfyUI's CFG++ samplers read it, so the guider,
every MODEL patch and wrapper stay ComfyUI's."""
import torch

import comfy.k_diffusion.sampling
import comfy.model_patcher
import comfy.model_sampling
import comfy.samplers

from .family import UnsupportedModel


def alpha_function(model_sampling):
    """alpha(sigma) of ComfyUI's latent x = alpha x0 + sigma eps: 1 - sigma for rectified flow, else 1."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return lambda sigma: 1.0 - float(sigma)
    return lambda sigma: 1.0


def guided_sampler(loop, title):
    """A SAMPLER running ``loop(predict, x, sigmas, alpha_of, noise, callback)``, where ``predict(x, sigma)`` ->
    (guided, uncond) denoised predictions and ``noise(i)`` is step i's standard normal draw from ComfyUI's noise
    sampler for the run's seed."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        seen = {}

        def keep_uncond(args):  # a guider without a negative still hands over zeros: tell by its conditioning
            seen["uncond"] = None if args["uncond"] is None else args["uncond_denoised"]
            return args["denoised"]
        options = extra_args.get("model_options", {}).copy()
        extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
            options, keep_uncond, disable_cfg1_optimization=True)
        sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
        ones = x.new_ones([x.shape[0]])
        noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
        scale = getattr(sampling, "noise_scale", 1.0)

        def predict(x_, sigma):
            seen["uncond"] = None
            guided = model(x_, sigma * ones, **extra_args)
            if seen["uncond"] is None:
                raise UnsupportedModel(f"{title} needs the unconditional prediction, which this guider does not "
                                       f"make: sample with KSampler / SamplerCustom or the CFGGuider node (with a "
                                       f"negative prompt)")
            return guided, seen["uncond"]

        def noise(i):
            return noise_sampler(sigmas[i], sigmas[i + 1]) * scale

        def report(i, x_, guided):
            if callback is not None:
                callback({"x": x_, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": guided})
        with torch.no_grad():  # as ComfyUI's own samplers run
            return loop(predict, x, sigmas, alpha_function(sampling), noise, report)
    return comfy.samplers.KSAMPLER(sample)


def denoising_sampler(loop):
    """A SAMPLER running ``loop(denoise, x, sigmas, alpha_of, callback)`` on the guider's denoised prediction
    (whatever guidance and MODEL patches make of it)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
        ones = x.new_ones([x.shape[0]])

        def report(i, x_, denoised):
            if callback is not None:
                callback({"x": x_, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        with torch.no_grad():
            return loop(lambda x_, sigma: model(x_, sigma * ones, **extra_args), x, sigmas, alpha_function(sampling),
                        report)
    return comfy.samplers.KSAMPLER(sample)
