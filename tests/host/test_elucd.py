"""EluCD on the real ComfyUI with tiny models: scale 0 and an empty window are the unpatched run bit for bit on all
four families; the step at an evaluation is the official recipe restated here in float64 (the calibrated
log-probability of Softplus-smoothed logits of the clean estimate decoded by the VAE, its gradient with respect to
the clean latent, rescaled to the estimate's RMS and weighted by the EDM schedule) applied to whatever CFG and
the patches before it gave, a core CFG function included; guidance raises a brightness score; no extra model
evaluation; the report; half precision; clear refusals."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FirstEvaluation, ModelCallCounter, run_node, sample
from harness import tiny_models
from test_guidance import apg

EDM = "linear decay + sine (EDM)"


class Bright:
    """A duck-typed differentiable scorer: log sigmoid(20 (mean brightness - 0.5)), no logit terms."""
    differentiable, reads = True, "pixels"

    def score(self, pixels):
        return F.logsigmoid(20 * (pixels.mean(dim=(1, 2, 3)) - 0.5))

    def describe(self):
        return "brightness"


class ColourNet:
    """An analytic classifier of the mean colour with a ReLU layer: logits = W2 relu(W1 rgb + b1), target 0."""
    differentiable, reads = True, "pixels"
    g = torch.Generator().manual_seed(7)
    W1, B1, W2 = torch.randn(6, 3, generator=g) * 3, torch.randn(6, generator=g), torch.randn(4, 6, generator=g)

    def logits(self, rgb, activation):
        return activation(rgb @ self.W1.T.to(rgb) + self.B1.to(rgb)) @ self.W2.T.to(rgb)

    def logit_terms(self, pixels):
        return [(self.logits(pixels.mean(dim=(2, 3)), F.relu), 0)]

    def score(self, pixels):
        return torch.log_softmax(self.logit_terms(pixels)[0][0], 1)[:, 0]

    def describe(self):
        return "colour net"


class NoGradients(Bright):
    differentiable = False

    def describe(self):
        return "CLIP judge: a cat"


def elucd(model, scorer, vae, scale=0.3, joint=1.0, marginal=0.5, beta=3.0, schedule=EDM, gamma=0.3, start=0.0,
          end=1.0):
    return run_node("TrainFreeEluCD", model=model, scorer=scorer, vae=vae, scale=scale, joint_temperature=joint,
                    marginal_temperature=marginal, softplus_beta=beta, schedule=schedule, gamma=gamma,
                    start_percent=start, end_percent=end)[0]


@pytest.fixture(scope="module")
def vaes(pack):
    cache = {}

    def get(family):
        channels = tiny_models.LATENT_CHANNELS[family]
        if channels not in cache:
            cache[channels] = tiny_models.make_vae(channels)
        return cache[channels]
    return get


def report(host, model):
    (only,) = [r for key, r in host.run_reports(model).items() if "elucd" in key]
    return only


def expected_step(model, vae, denoised, weight, joint=1.0, marginal=0.5, beta=3.0):
    """The official recipe in float64: x0 decoded, the classifier reads it clipped to 0..1 with Softplus in place of
    ReLU, grad of tau_j f_y - log sum exp(tau_m f) with respect to the clipped image, back through the decoder to
    the clean latent, then g / rms(g) * rms(x0) * weight per image."""
    decoder = copy.deepcopy(vae.first_stage_model).double()
    with torch.inference_mode(False), torch.enable_grad():
        x0 = denoised.detach().double().clone().requires_grad_(True)
        pixels = (decoder.decode(model.model.process_latent_out(x0)) + 1) / 2
        clipped = pixels.clamp(0, 1).detach().requires_grad_(True)
        f = ColourNet().logits(clipped.mean(dim=(2, 3)), lambda z: F.softplus(z, beta=beta))
        objective = joint * f[:, 0] - torch.log(torch.exp(marginal * f).sum(1))
        (g_pixels,) = torch.autograd.grad(objective.sum(), clipped)
        (g,) = torch.autograd.grad(pixels, x0, g_pixels)
    rms = lambda t: t.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()  # noqa: E731
    return (g / rms(g) * rms(x0.detach()) * weight).float()


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
def test_scale_zero_and_an_empty_window_are_the_unpatched_run(tiny, vaes, family):
    plain = sample(tiny(family), family, size=8)
    assert torch.equal(sample(elucd(tiny(family), Bright(), vaes(family), scale=0.0), family, size=8), plain)
    assert torch.equal(sample(elucd(tiny(family), Bright(), vaes(family), start=1.0, end=1.0), family, size=8), plain)


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_the_step_is_the_official_recipe_on_the_cfg_result(tiny, vaes, family):
    vae, cfg, steps = vaes(family), 3.0, 4
    patched = elucd(tiny(family), ColourNet(), vae, scale=0.3)
    seen = FirstEvaluation(patched)
    sample(patched, family, size=8, batch=2, cfg=cfg, steps=steps)
    args = seen.args
    plain = args["uncond_denoised"] + (args["cond_denoised"] - args["uncond_denoised"]) * cfg
    weight = 0.3 * ((steps + 1) / (steps + 1) + 0.3 * math.sin(0.0))  # step 0 of the EDM schedule
    step = expected_step(tiny(family), vae, plain, weight)
    torch.testing.assert_close(args["denoised"] - plain, step, rtol=2e-3, atol=2e-3 * step.abs().max().item())
    assert step.abs().max() > 1e-3


def test_it_acts_on_what_a_pack_patch_and_a_core_patch_gave(tiny, vaes):
    vae = vaes("sd15")
    base = run_node("RescaleCFG", model=apg(tiny("sd15"), eta=0.0), multiplier=0.7)[0]  # a pack and a core patch
    alone_model = base.clone()  # the same patches without EluCD
    alone = FirstEvaluation(alone_model)
    sample(alone_model, "sd15", size=8)
    guided = elucd(base, ColourNet(), vae, scale=0.2, schedule="constant")
    seen = FirstEvaluation(guided)
    sample(guided, "sd15", size=8)
    step = expected_step(tiny("sd15"), vae, alone.args["denoised"], 0.2)
    torch.testing.assert_close(seen.args["denoised"] - alone.args["denoised"], step, rtol=2e-3,
                               atol=2e-3 * step.abs().max().item())


@pytest.mark.parametrize("family", ("sd15", "sd3"))
def test_guidance_raises_the_score_without_an_extra_model_evaluation(tiny, vaes, host, family):
    vae = vaes(family)
    counter = ModelCallCounter(plain_model := tiny(family).clone())
    plain = sample(plain_model, family, size=8, steps=4)
    patched = elucd(tiny(family), Bright(), vae, scale=0.3)
    guided_counter = ModelCallCounter(patched)
    guided = sample(patched, family, size=8, steps=4)
    score = lambda latent: Bright().score(  # noqa: E731
        vae.decode(tiny(family).model.process_latent_out(latent)).movedim(-1, 1)).item()
    assert score(guided) > score(plain) + 0.05
    assert guided_counter.calls == counter.calls and guided_counter.rows == counter.rows
    r = report(host, patched)
    assert r["guided"] == r["evaluations"] == 4 and r["decodes_with_backward"] == 4
    assert r["extra_model_evaluations"] == 0 and r["seconds"] > 0 and len(r["weights"]) == 4
    assert r["calibrated_score_last"][0] > r["calibrated_score_first"][0]


def test_the_window_limits_the_guided_evaluations(tiny, vaes, host):
    patched = elucd(tiny("sd15"), Bright(), vaes("sd15"), start=0.0, end=0.5)
    sample(patched, "sd15", size=8, steps=6)
    r = report(host, patched)
    assert r["evaluations"] == 6 and 0 < r["guided"] < 6


@pytest.mark.parametrize("family,dtype", (("sd15", torch.float16), ("flux", torch.bfloat16)))
def test_half_precision_models(pack, vaes, family, dtype):
    model = tiny_models.make_model(family, dtype=dtype)
    plain = sample(model, family, size=8, steps=3)
    guided = sample(elucd(model, Bright(), vaes(family), scale=0.3), family, size=8, steps=3)
    assert torch.isfinite(guided).all() and guided.dtype == plain.dtype
    assert (guided - plain).abs().max() > 1e-2
    assert torch.equal(sample(elucd(model, Bright(), vaes(family), scale=0.0), family, size=8, steps=3), plain)


def test_refusals(tiny, vaes):
    m, vae = tiny("sd15"), vaes("sd15")
    with pytest.raises(ValueError, match="gives none.*Digit Scorer.*Digit Oracle Judge"):
        elucd(m, NoGradients(), vae)
    with pytest.raises(ValueError, match="connect the model's VAE"):
        elucd(m, Bright(), None)
    with pytest.raises(ValueError, match="not a scorer"):
        elucd(m, "seven", vae)
    with pytest.raises(ValueError, match="scale"):
        elucd(m, Bright(), vae, scale=float("nan"))
    with pytest.raises(ValueError, match="joint_temperature"):
        elucd(m, Bright(), vae, joint=-1.0)
    with pytest.raises(ValueError, match="swap them"):
        elucd(m, Bright(), vae, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="unknown schedule"):
        elucd(m, Bright(), vae, schedule="cosine")


def test_a_video_model_is_refused_clearly(pack, vaes):
    family = tiny_models.VIDEO_FAMILY
    model = tiny_models.make_model(family)
    with pytest.raises(ValueError, match="video model.*serves SD1.5, SDXL, SD3 and Flux"):
        elucd(model, Bright(), vaes("sd3"))


def test_the_classifier_reads_the_image_clipped_and_the_gradient_passes_the_clip(tiny, vaes, host):
    vae, model = vaes("sd15"), tiny("sd15")
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 20  # pixels well outside 0..1
    objective = lambda p: -((p - 0.8) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    import comfy.samplers
    gradient, values = host.ScorerGradient(vae, comfy.samplers.CFGGuider(model), "EluCD").gradient(latent, objective)
    decoder = copy.deepcopy(vae.first_stage_model).double()
    with torch.inference_mode(False), torch.enable_grad():
        x0 = latent.double().requires_grad_(True)
        pixels = (decoder.decode(model.model.process_latent_out(x0)) + 1) / 2
        clipped = pixels.detach().clamp(0, 1)
        g_pixels = -2 * (clipped - 0.8) / clipped[0].numel()
        (expected,) = torch.autograd.grad(pixels, x0, g_pixels)
    assert pixels.min() < -0.1 and pixels.max() > 1.1
    torch.testing.assert_close(values.double(), objective(clipped), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gradient.double(), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("which", ("digit scorer", "digit oracle judge"))
def test_the_packs_scorers_made_and_sampled_under_inference_mode_as_comfyui_runs_nodes(tiny, vaes, host, which):
    with torch.inference_mode():
        if which == "digit scorer":
            (scorer,) = run_node("TrainFreeDigitScorer", prompt="a red digit seven on a dark background")
        else:
            (judge,) = run_node("TrainFreeDigitOracleJudge")
            (scorer,) = run_node("TrainFreeJudgeScorer", judge=judge, target="seven")
        plain = sample(tiny("sd15"), "sd15", size=8, steps=3)
        patched = elucd(tiny("sd15"), scorer, vaes("sd15"), scale=0.3)
        guided = sample(patched, "sd15", size=8, steps=3)
    assert (guided - plain).abs().max() > 1e-3
    assert report(host, patched)["decodes_with_backward"] == 3
