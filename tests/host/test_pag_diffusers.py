"""TrainFree PAG on SD3 against diffusers' own PAG processor, on the same tiny weights.

A diffusers ``SD3Transformer2DModel`` with small random weights is loaded into ComfyUI through ComfyUI's own
diffusers-format loader; one Euler step from sigma 0.6 with PAG on block 1 (both default to it) gives the
prediction of our perturbed pass, which must equal the perturbed half of diffusers' ``PAGJointAttnProcessor2_0``.
"""
import pytest
import torch

from conftest import FirstEvaluation, run_node, sample

diffusers = pytest.importorskip("diffusers", reason="diffusers (requirements-test.txt) is not installed")

SIGMA = 0.6
TOKENS, WIDTH = 8, 64


def tiny_sd3_diffusers(seed=0):
    # ComfyUI reads SD3's depth from the hidden width (64 per layer) and gives it as many heads as layers.
    model = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=64,
        num_attention_heads=3, joint_attention_dim=WIDTH, caption_projection_dim=192, pooled_projection_dim=WIDTH,
        pos_embed_max_size=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim >= 2 else 10.0))
    return model.eval()


@pytest.fixture(scope="module")
def weights(pack):
    import comfy.sd
    reference = tiny_sd3_diffusers()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    comfy_model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    assert type(comfy_model.model).__name__ == "SD3"
    return reference, comfy_model


def one_step(model, cond, pooled, seed=0):
    import comfy.sample
    import comfy.samplers
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = [[cond, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled)}]]
    capture = FirstEvaluation(model)
    comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"),
                               torch.tensor([SIGMA, 0.0]), positive, negative, latent, disable_pbar=True, seed=seed)
    return capture.args


def velocity(x, denoised, sigma):
    """Rectified flow: x = (1 - sigma) x0 + sigma noise, and the network predicts v = noise - x0."""
    return (x - denoised) / sigma


def diffusers_predictions(reference, x, cond, pooled):
    """diffusers' (conditional, perturbed) velocity: its PAG processor on block 1, fed [cond; cond]."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0, PAGJointAttnProcessor2_0
    attn = reference.transformer_blocks[1].attn
    attn.set_processor(PAGJointAttnProcessor2_0())
    try:
        with torch.no_grad():
            out = reference(hidden_states=x.repeat(2, 1, 1, 1), encoder_hidden_states=cond.repeat(2, 1, 1),
                            pooled_projections=pooled.repeat(2, 1), timestep=torch.full((2,), SIGMA * 1000)).sample
    finally:
        attn.set_processor(JointAttnProcessor2_0())
    return out[0:1], out[1:2]


def our_predictions(comfy_model, cond, pooled, scale=1.0, **pag_inputs):
    """(x, conditional velocity, perturbed velocity) of our PAG: at CFG 1 the guided prediction is
    D = C + s (C - P), so the perturbed pass's P = C - (D - C) / s."""
    patched = run_node("TrainFreePAG", model=comfy_model, scale=scale, layers="auto", start_percent=0.0,
                       end_percent=1.0, **pag_inputs)[0]
    args = one_step(patched, cond, pooled)
    x, c, d = args["input"], args["cond_denoised"], args["denoised"]
    return x, velocity(x, c, SIGMA), velocity(x, c - (d - c) / scale, SIGMA)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TOKENS, WIDTH, generator=g), torch.randn(1, WIDTH, generator=g)


def test_the_perturbed_prediction_equals_diffusers_pag_joint_processor(weights):
    reference, comfy_model = weights
    cond, pooled = inputs()
    x, ours_cond, ours_perturbed = our_predictions(comfy_model, cond, pooled)
    ref_cond, ref_perturbed = diffusers_predictions(reference, x, cond, pooled)
    tolerance = 1e-5 * ref_cond.abs().max().item()
    torch.testing.assert_close(ours_cond, ref_cond, rtol=0, atol=tolerance)
    # The perturbation is far above the tolerance, so equality below is not the conditional prediction twice.
    assert (ref_perturbed - ref_cond).abs().max() > 100 * tolerance
    torch.testing.assert_close(ours_perturbed, ref_perturbed, rtol=0, atol=tolerance)


def test_the_whole_sequence_mode_is_not_diffusers_semantics(weights):
    reference, comfy_model = weights
    cond, pooled = inputs()
    x, _, whole = our_predictions(comfy_model, cond, pooled, dit_mode="whole sequence")
    ref_cond, ref_perturbed = diffusers_predictions(reference, x, cond, pooled)
    assert (whole - ref_perturbed).abs().max() > 100 * 1e-5 * ref_cond.abs().max().item()


def test_the_implied_perturbation_does_not_depend_on_the_scale(weights):
    _, comfy_model = weights
    cond, pooled = inputs()
    _, _, at_one = our_predictions(comfy_model, cond, pooled, scale=1.0)
    _, _, at_three = our_predictions(comfy_model, cond, pooled, scale=3.0)
    torch.testing.assert_close(at_three, at_one, rtol=0, atol=1e-5 * at_one.abs().max().item())


def test_guidance_rescale_matches_diffusers_rescale_noise_cfg_in_velocity_space(weights):
    # diffusers rescales the guided noise prediction (here the flow velocity) towards the conditional one.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    _, comfy_model = weights
    cond, pooled = inputs()
    plain = one_step(run_node("TrainFreePAG", model=comfy_model, scale=2.0, layers="auto", start_percent=0.0,
                              end_percent=1.0)[0], cond, pooled)
    rescaled = one_step(run_node("TrainFreePAG", model=comfy_model, scale=2.0, layers="auto", start_percent=0.0,
                                 end_percent=1.0, rescale=0.7)[0], cond, pooled)
    x = plain["input"]
    guided, conditional = velocity(x, plain["denoised"], SIGMA), velocity(x, plain["cond_denoised"], SIGMA)
    expected = rescale_noise_cfg(guided, conditional, guidance_rescale=0.7)
    got = velocity(x, rescaled["denoised"], SIGMA)
    assert (expected - guided).abs().max() > 1e-3 * guided.abs().max()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


# ---------------------------------------------------------------- guidance rescale and adaptive scale

def noise_prediction(kind, x, denoised, sigma):
    """The network's output that gives ``denoised`` at ``x``, from the standard definitions (ComfyUI's x is
    x0 + sigma eps for the SD models, (1 - sigma) x0 + sigma eps for flow models)."""
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    eps = (x - denoised) / sigma
    if kind == "eps":
        return eps
    if kind == "v":  # Salimans & Ho: v = alpha_t eps - sigma_t x0 with alpha_t = 1 / sqrt(1 + sigma^2)
        alpha = 1.0 / (1.0 + sigma ** 2) ** 0.5
        return alpha * eps - sigma * alpha * denoised
    return (x - denoised) / sigma  # flow: v = eps - x0


class Evaluations:
    """A post-CFG function added after the patches: keeps every evaluation's input and predictions and,
    with ``undo``, returns plain CFG's result, so that runs with different PAG settings walk the same path."""

    def __init__(self, model, undo=False):
        model.set_model_sampler_post_cfg_function(self)
        self.steps, self.undo = [], undo

    def __call__(self, args):
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        cfg = uncond + (cond - uncond) * args["cond_scale"]
        self.steps.append({"input": args["input"], "sigma": args["sigma"], "cond": cond, "cfg": cfg,
                           "denoised": args["denoised"]})
        return cfg if self.undo else args["denoised"]


def pag_node(model, **kw):
    inputs = {"scale": 3.0, "layers": "auto", "start_percent": 0.0, "end_percent": 1.0, **kw}
    return run_node("TrainFreePAG", model=model, **inputs)[0]


def with_sampling(tiny, case):
    family, kind = {"sd15-eps": ("sd15", "eps"), "sd15-v": ("sd15", "v"), "flux": ("flux", "flow")}[case]
    model = tiny(family)
    if kind == "v":
        model = run_node("ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=False)[0]
    return family, kind, model


@pytest.mark.parametrize("case", ["sd15-eps", "sd15-v", "flux"])
def test_guidance_rescale_works_on_the_noise_prediction_like_diffusers(tiny, case):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    family, kind, model = with_sampling(tiny, case)
    plain_model = pag_node(model)
    plain = Evaluations(plain_model)
    sample(plain_model, family, steps=2)
    rescaled_model = pag_node(model, rescale=0.7)
    rescaled = Evaluations(rescaled_model)
    sample(rescaled_model, family, steps=2)
    first, got = plain.steps[0], rescaled.steps[0]["denoised"]
    x, sigma = first["input"], first["sigma"]

    def pred(d):
        return noise_prediction(kind, x, d, sigma)
    expected = rescale_noise_cfg(pred(first["denoised"]), pred(first["cond"]), guidance_rescale=0.7)
    tolerance = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(pred(got), expected, rtol=0, atol=tolerance)
    # Rescaling the denoised prediction instead (this pack's earlier way) gives another result.
    in_x0_space = rescale_noise_cfg(first["denoised"], first["cond"], guidance_rescale=0.7)
    assert (pred(in_x0_space) - expected).abs().max() > 100 * tolerance


def diffusers_pag_scale(scale, adaptive, timestep):
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    class Pipeline(PAGMixin):
        pass
    pipe = Pipeline()
    pipe._pag_scale, pipe._pag_adaptive_scale, pipe.pag_applied_layers = scale, adaptive, ["mid"]
    return pipe._get_pag_scale(timestep)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_adaptive_scale_follows_diffusers_schedule_through_the_sampler(tiny, family):
    import comfy.model_sampling
    scale, adaptive, steps = 3.0, 0.004, 8
    runs = {}
    for name, a in (("constant", 0.0), ("adaptive", adaptive)):
        patched = pag_node(tiny(family), scale=scale, adaptive_scale=a)
        runs[name] = Evaluations(patched, undo=True)
        sample(patched, family, steps=steps)
    sampling = tiny(family).get_model_object("model_sampling")
    flow = isinstance(sampling, comfy.model_sampling.CONST)
    ratios, expected = [], []
    for constant, damped in zip(runs["constant"].steps, runs["adaptive"].steps):
        # The same path (to float rounding: steps where the damped scale is 0 run no extra row, a smaller batch).
        torch.testing.assert_close(damped["cfg"], constant["cfg"], rtol=0, atol=1e-5 * constant["cfg"].abs().max())
        term, damped_term = constant["denoised"] - constant["cfg"], damped["denoised"] - damped["cfg"]
        ratios.append(float((damped_term * term).sum() / (term * term).sum()))
        sigma = constant["sigma"]
        # diffusers' timestep: the discrete step for SD, t * 1000 for flow models (sigma is t there)
        t = float(sigma[0]) * 1000.0 if flow else float(sampling.timestep(sigma)[0])
        expected.append(diffusers_pag_scale(scale, adaptive, t) / scale)
    assert ratios == pytest.approx(expected, abs=1e-4)
    assert ratios[0] > 0.9 and ratios[-1] == 0.0, "guidance is damped as t falls, down to none"
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))
