"""The guidance nodes on a tiny Wan 2.1 text-to-video model: 5-D latents [B, C, T, H, W] through the real ComfyUI
sampler. Each combination node keeps the video's shape, acts, and reduces to plain CFG where it has a neutral
setting; PAG, which has no layer names for Wan's blocks, refuses the model."""
import itertools

import pytest
import torch

from conftest import ModelCallCounter, run_node, sample
from harness import tiny_models
from test_guidance import AUTO, NEGATIVE, apg, close, damped, fdg, interval, pag, report, residual, two_model

VIDEO = tiny_models.VIDEO_FAMILY
FRAMES, SIZE = 3, 8
SHAPE = (1, tiny_models.LATENT_CHANNELS[VIDEO], FRAMES, SIZE, SIZE)
SINE = "SINE (guide is a fine-tuned model mixed into the prompt branch)"


@pytest.fixture(scope="module")
def wan(tiny):
    return tiny(VIDEO)


@pytest.fixture(scope="module")
def other(tiny):
    return tiny_models.make_model(VIDEO, seed=7)


def video(model, steps=3, cfg=3.0, **kwargs):
    return sample(model, VIDEO, steps=steps, cfg=cfg, size=SIZE, frames=FRAMES, **kwargs)


def assert_acts(out, plain):
    assert out.shape == plain.shape == SHAPE and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3


def test_the_tiny_video_model_is_a_real_wan_model(wan, host):
    import comfy.model_base
    assert isinstance(wan.model, comfy.model_base.WAN21) and host.model_family(wan) == "wan"
    assert host.is_flow_model(wan)
    assert sum(p.numel() for p in wan.model.diffusion_model.parameters()) < 2_000_000
    out = video(wan)
    assert out.shape == SHAPE and torch.isfinite(out).all()
    assert (out[:, :, 0] - out[:, :, 1]).abs().max() > 1e-3  # frames differ: the model sees a video


def test_apg(wan):
    plain = video(wan)
    assert torch.equal(video(apg(wan, 1.0, 0.0, 0.0)), plain)
    assert_acts(video(apg(wan)), plain)


def test_fdg(wan):
    plain = video(wan)
    close(video(fdg(wan, 3.0, 3.0)), plain)
    assert_acts(video(fdg(wan)), plain)
    counted = fdg(wan).clone()
    counter = ModelCallCounter(counted)
    video(counted, cfg=1.0)
    assert counter.rows == 2 * 3


def _last_video(model, noise):
    import comfy.sample
    pos, neg = (tiny_models.conditioning(VIDEO, seed=s) for s in (1, 2))
    out = comfy.sample.sample(model, noise, 3, 3.0, "euler", "normal", pos, neg, torch.zeros_like(noise), seed=0,
                              disable_pbar=True)
    return out[-1]


@pytest.mark.parametrize("patch", [lambda m: apg(m, 0.0, 1.0, -0.5), lambda m: fdg(m, eta_low=0.0, eta_high=0.3)],
                         ids=["apg_clipped", "fdg_apg"])
def test_norms_and_projections_run_per_video_not_over_the_batch(wan, patch):
    noise = torch.randn((2,) + SHAPE[1:], generator=torch.Generator().manual_seed(3))
    noise[0] *= 3.0  # a norm or projection taken over the batch would change the second video's result
    patched = patch(wan)
    close(_last_video(patched, noise), _last_video(patched, noise[1:]))
    assert (_last_video(patched, noise) - _last_video(wan, noise)).abs().max() > 1e-3


def test_guidance_interval(wan):
    plain = video(wan, steps=8)
    assert torch.equal(video(interval(wan, 0.0, 1000.0), steps=8), plain)
    patched = interval(wan, 0.5, 3.0).clone()
    counter = ModelCallCounter(patched)
    out = video(patched, steps=8)
    saved = report(patched)[0]["saved_passes"]
    assert 0 < saved < 8 and counter.rows == 2 * 8 - saved
    assert_acts(out, plain)


def test_noise_damped_cfg(wan, other):
    plain = video(wan, steps=6)
    same = damped(wan, wan.clone(), 0.5)
    close(video(same, steps=6), plain)
    assert 0 < report(same)[0]["weak_passes"] < 6
    assert_acts(video(damped(wan, other), steps=6), plain)
    assert torch.equal(video(damped(wan, other, 0.0), steps=6), plain)


@pytest.mark.parametrize("mode,passes", [("one-time negative", 4 + 1), ("self-negative", 4)])
def test_residual_cfg(wan, mode, passes):
    patched = residual(wan, mode).clone()
    counter = ModelCallCounter(patched)
    out = video(patched, steps=4, cfg=1.2)
    assert counter.rows == passes and report(patched)[0]["saved_passes"] == 8 - passes
    assert_acts(out, video(wan, steps=4, cfg=1.2))


def test_residual_cfg_one_time_negative_is_cfg_on_its_first_step(wan):
    assert torch.equal(video(residual(wan), steps=1, cfg=1.2), video(wan, steps=1, cfg=1.2))


def test_two_model_guidance(wan, other):
    plain = video(wan)
    assert torch.equal(video(two_model(wan, wan.clone())), video(wan, cfg=1.0))
    close(video(two_model(wan, wan.clone(), NEGATIVE)), plain)
    for mode in (AUTO, NEGATIVE):
        guided = two_model(wan, other, mode)
        assert_acts(video(guided), plain)
        assert report(guided)[0]["guide_passes"] == 3


def test_sine(wan, other):
    plain = video(wan, steps=6)
    prompt = tiny_models.conditioning(VIDEO, tokens=8, seed=1)  # sample()'s positive prompt
    close(video(two_model(wan, wan.clone(), SINE, sine_prompt=prompt), steps=6), plain)
    guided = two_model(wan, other, SINE, sine_prompt=tiny_models.conditioning(VIDEO, tokens=8, seed=5))
    assert_acts(video(guided, steps=6), plain)
    assert 0 < report(guided)[0]["guide_passes"] < 6


def test_a_second_model_of_another_latent_space_is_refused(wan, tiny, host):
    import comfy.model_patcher
    import comfy.supported_models as sm
    config = sm.WAN22_T2V(dict(tiny_models._WAN21, in_dim=48, out_dim=48))  # Wan 2.2 5B: 48-channel latents
    config.set_inference_dtype(torch.float32, None)
    wan22 = comfy.model_patcher.ModelPatcher(config.get_model({}), load_device="cpu", offload_device="cpu")
    assert host.model_family(wan22) == "wan"
    for second in (wan22, tiny("flux")):
        with pytest.raises(ValueError, match="same family"):
            two_model(wan, second)
        with pytest.raises(ValueError, match="same family"):
            damped(wan, second)


def test_pag_refuses_a_video_model_naming_the_families_it_serves(wan):
    with pytest.raises(ValueError, match=r"cannot serve this model \(WanModel\); it serves SD1\.5, SDXL, .*SD3, Flux"):
        pag(wan)
    with pytest.raises(ValueError, match="cannot serve"):
        run_node("TrainFreePAG", model=wan, scale=0.0, layers="auto", start_percent=0.0, end_percent=1.0)


def test_every_pair_composes_on_video_in_both_orders_and_each_member_acts(wan, other):
    # Wan's shift 8 keeps sigma high: these bounds (flow sigma 0.33-0.91) overlap the damped steps (above 0.77)
    patches = {"apg": apg, "fdg": fdg, "interval": lambda m: interval(m, 0.5, 10.0),
               "damped": lambda m: damped(m, other), "residual": residual, "two_model": lambda m: two_model(m, other)}
    alone = {name: video(patch(wan), steps=6) for name, patch in patches.items()}
    for (a, patch_a), (b, patch_b) in itertools.permutations(patches.items(), 2):
        both = video(patch_b(patch_a(wan)), steps=6)
        assert both.shape == SHAPE and torch.isfinite(both).all(), (a, b)
        assert (both - alone[a]).abs().max() > 1e-4, f"{b} after {a} did nothing"
        assert (both - alone[b]).abs().max() > 1e-4, f"{a} before {b} did nothing"
