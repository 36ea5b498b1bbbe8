"""The Diffusion Classifier on the real ComfyUI: its errors are the model's own denoising errors at the planned
(t, eps) pairs (restated with plain ComfyUI calls), the same for every candidate order, elimination keeps the
plan's counts, it runs on every family, and bad inputs get clear errors."""
import pytest
import torch

from conftest import run_node
from harness import tiny_models


def classify(model, clip, latent, candidates="a red seven\na blue one\na green two", samples="4, 8", keep="2, 1",
             **kw):
    return run_node("TrainFreeDiffusionClassifier", model=model, clip=clip, candidates=candidates,
                    timesteps_per_stage=samples, keep_per_stage=keep, seed=3, batch_size=3,
                    latent={"samples": latent}, **kw)["result"]


def image_latent(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tiny_models.LATENT_CHANNELS[family], 16, 16, generator=g)


def restated_error(model, clip, text, latent, timestep, eps):
    """The paper's error at one (t, eps), in eps / velocity terms, with ComfyUI's own sampling calls."""
    import comfy.sample
    import comfy.samplers
    from guidance_ops import frecas
    sampling = model.get_model_object("model_sampling")
    flow = sampling.__class__.__name__.startswith("ModelSampling") and hasattr(sampling, "shift") and \
        "CONST" in [c.__name__ for c in type(sampling).__mro__]
    if flow:
        sigma = float(sampling.percent_to_sigma(1.0 - (timestep + 1) / frecas.GRID))
    else:
        sigma = float(sampling.sigma(torch.tensor(float(timestep))))
    x0 = model.model.process_latent_in(latent)
    x = (1 - sigma) * x0 + sigma * eps if flow else x0 + sigma * eps
    seen = []

    def keep(args):
        seen.append(args["cond_denoised"])
        return args["denoised"]
    m = model.clone()
    m.set_model_sampler_post_cfg_function(keep)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))

    def sampler(k_model, x_, sigmas, extra_args=None, callback=None, disable=None):
        k_model(x, torch.tensor([sigma]), **extra_args)
        return x_
    zeros = torch.zeros_like(latent)
    comfy.sample.sample_custom(m, zeros, 1.0, comfy.samplers.KSAMPLER(sampler), torch.tensor([sigma, 0.0]), cond,
                               cond, zeros, disable_pbar=True, seed=0)
    denoised = seen[0]
    target = (x - x0) / sigma  # eps (eps models) or eps - x0 (the flow velocity): what the network predicts
    predicted = (x - denoised) / sigma
    return float(((predicted - target) ** 2).mean().detach())


def test_errors_are_the_models_denoising_errors_at_the_planned_pairs(tiny, clip):
    from guidance_ops import diffusion_classifier as dc
    model = tiny("sd15")
    latent = image_latent("sd15")
    best, scores, chart = classify(model, clip, latent, candidates="a red seven\na blue one", samples="2, 4",
                                   keep="1, 1")
    lines = {line.split("  ")[-1]: float(line.split()[0]) for line in scores.splitlines()}
    noise = dc.shared_noise(4, latent.shape[1:], 3)
    stage0 = dc.stage_timesteps([2, 4])[0]
    for text in ("a red seven", "a blue one"):
        if text != best:  # eliminated after the first stage: its mean is over the first stage's pairs
            expected = sum(restated_error(model, clip, text, latent, t, noise[i:i + 1]) for i, t in
                           enumerate(stage0)) / len(stage0)
            assert lines[text] == pytest.approx(expected, rel=1e-4)
    assert chart.shape[0] == 1 and chart.shape[-1] == 3


def test_the_result_does_not_depend_on_the_candidates_order(tiny, clip):
    model, latent = tiny("sd15"), image_latent("sd15", 1)
    a = classify(model, clip, latent, candidates="a red seven\na blue one\na green two")
    b = classify(model, clip, latent, candidates="a green two\na red seven\na blue one")
    assert a[0] == b[0] and sorted(a[1].splitlines()) == sorted(b[1].splitlines())


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
def test_every_family_scores_the_prompt_it_was_denoised_with_apart(tiny, family, host):
    """On each family (eps, and flow with its velocity), the host's errors are finite, positive, and differ
    between two prompts at the same (t, eps) pairs."""
    from guidance_ops import diffusion_classifier as dc
    model, latent = tiny(family), image_latent(family)
    candidates = {name: tiny_models.conditioning(family, seed=s) for name, s in (("one", 1), ("two", 2))}
    timesteps = dc.stage_timesteps([4])[0]
    errors = host.denoising_errors(model, candidates, latent, host.timestep_sigmas(model, timesteps),
                                   dc.shared_noise(4, latent.shape[1:], 0), 2, host.progress_bar(8))
    assert all(len(v) == 4 and all(e > 0 and e == e for e in v) for v in errors.values())
    assert errors["one"] != errors["two"]


@pytest.mark.parametrize("kw,message", [
    ({"candidates": "only one"}, "at least two candidate prompts"),
    ({"samples": "8, 4"}, "must grow"),
    ({"keep": "2"}, "as many 'keep' entries"),
])
def test_bad_settings_are_refused(tiny, clip, kw, message):
    with pytest.raises(ValueError, match=message):
        classify(tiny("sd15"), clip, image_latent("sd15"), **kw)


def test_a_batch_of_latents_is_refused(tiny, clip):
    with pytest.raises(ValueError, match="LatentFromBatch"):
        classify(tiny("sd15"), clip, torch.zeros(2, 4, 16, 16))
