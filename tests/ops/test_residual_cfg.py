import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import residual_cfg as rcfg


@st.composite
def latent_shapes(draw):
    b, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    return (b, c, draw(st.integers(1, 3)), h, w) if draw(st.booleans()) else (b, c, h, w)


def randn(shape, seed, n, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def sigmas(flow):
    return st.floats(0.02, 0.98) if flow else st.floats(0.02, 15.0)


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       flow=st.booleans(), data=st.data(), scale=st.floats(1, 8), seed=st.integers(0, 2**16))
def test_one_time_negative_first_step_is_cfg_bit_for_bit(shape, dtype, flow, data, scale, seed):
    sigma = data.draw(sigmas(flow))
    cond, uncond, x = randn(shape, seed, 3, dtype)
    state = rcfg.ResidualCFGState()
    assert not state.ready
    state.keep_uncond(uncond)
    out = rcfg.residual_cfg(cond, x, torch.full((shape[0],), sigma), scale, state.anchor, flow=flow)
    assert out.dtype == dtype and torch.equal(out, uncond + (cond - uncond) * scale)
    state.reset()
    assert state.anchor is None


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), flow=st.booleans(), data=st.data(), delta=st.floats(0, 2), seed=st.integers(0, 2**16))
def test_virtual_uncond_is_delta_times_the_residual_noise(shape, flow, data, delta, seed):
    # eps_bar = (x - alpha X) / sigma is the noise the stored anchor implies at any later (x, sigma); the virtual
    # negative must be the denoised prediction of delta * eps_bar
    sigma = data.draw(sigmas(flow))
    anchor, true_noise = randn(shape, seed, 2)
    alpha = 1 - sigma if flow else 1.0
    x = alpha * anchor + sigma * true_noise
    virtual = rcfg.virtual_uncond(x, sigma, anchor, delta, flow)
    torch.testing.assert_close(rcfg.noise_from_denoised(x, virtual, sigma, flow), delta * true_noise,
                               rtol=1e-9, atol=1e-9)
    if delta == 1.0:
        assert virtual is anchor  # the exact negative x0 when the stored residual is exact


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), flow=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_self_negative_anchor_from_the_first_noise_is_the_clean_input(shape, flow, data, seed):
    sigma = data.draw(sigmas(flow))
    source, noise = randn(shape, seed, 2)
    x = (1 - sigma if flow else 1.0) * source + sigma * noise
    by_noise, by_source = rcfg.ResidualCFGState(), rcfg.ResidualCFGState()
    by_noise.keep_noise(x, sigma, noise, flow)
    by_source.keep_source(source)
    torch.testing.assert_close(by_noise.anchor, by_source.anchor, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["self", "initialize"])
@pytest.mark.parametrize("delta", [1.0, 0.6, 1.4])
def test_matches_the_reference_stock_noise_recursion(variant, delta):
    # StreamDiffusion's unet_step in VP space for an LCM-like step (c_skip = 0, c_out = 1): guided eps, x0
    # estimate, re-noise with a fixed per-step noise, and the stock-noise update. The same run in ComfyUI's EPS
    # space (x / sqrt(abar), sigma = sqrt((1 - abar) / abar)) through residual_cfg must give the same x0 estimates.
    gamma, shape = 1.8, (2, 4, 5, 5)
    abar = torch.tensor([0.15, 0.4, 0.7, 0.92], dtype=torch.float64)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    source, first_noise, negative_eps, *rest = randn(shape, 7, 3 + 2 * len(abar))
    model_eps, step_noise = rest[:len(abar)], rest[len(abar):]

    x = a[0] * source + b[0] * first_noise
    stock = first_noise if variant == "self" else negative_eps
    reference = []
    for i in range(len(abar)):
        eps = delta * stock + gamma * (model_eps[i] - delta * stock)
        x0 = (x - b[i] * eps) / a[i]
        reference.append(x0)
        if i + 1 < len(abar):
            stock = step_noise[i + 1] + (a[i + 1] / b[i + 1]) * (b[i] / a[i]) * (stock - eps)
            x = a[i + 1] * x0 + b[i + 1] * step_noise[i + 1]

    state = rcfg.ResidualCFGState()
    x = a[0] * source + b[0] * first_noise
    for i in range(len(abar)):
        xc, sigma = x / a[i], (b[i] / a[i]).item()
        cond = xc - sigma * model_eps[i]
        if i == 0 and variant == "self":
            state.keep_noise(xc, sigma, first_noise, flow=False)
        elif i == 0:
            state.keep_uncond(xc - sigma * negative_eps)  # the one real negative pass
        out = rcfg.residual_cfg(cond, xc, sigma, gamma, state.anchor, delta=delta, flow=False)
        torch.testing.assert_close(out, reference[i], rtol=1e-10, atol=1e-10)
        if i + 1 < len(abar):
            x = a[i + 1] * out + b[i + 1] * step_noise[i + 1]


def test_hand_computed_flow_example():
    # flow, sigma = 0.5: alpha = 0.5. X = 1, x = 3 -> delta = 2: D_bar = 2 * 1 + (1 - 2) * 3 / 0.5 = -4
    x, anchor, cond = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.0])
    assert rcfg.virtual_uncond(x, 0.5, anchor, 2.0, flow=True).item() == -4.0
    assert rcfg.residual_cfg(cond, x, 0.5, 1.5, anchor, 2.0, flow=True).item() == -4.0 + 1.5 * 4.0
    # EPS: alpha = 1, D_bar = 2 * 1 - 3 = -1
    assert rcfg.virtual_uncond(x, 0.5, anchor, 2.0, flow=False).item() == -1.0


def test_flow_at_sigma_one_needs_delta_one():
    x, anchor = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert rcfg.virtual_uncond(x, torch.tensor([1.0]), anchor, 1.0, flow=True) is anchor
    with pytest.raises(ValueError):
        rcfg.virtual_uncond(x, torch.tensor([1.0]), anchor, 0.5, flow=True)
    assert torch.isfinite(rcfg.virtual_uncond(x, torch.tensor([1.0]), anchor, 0.5, flow=False)).all()


def test_per_row_sigma_and_dtypes():
    x, anchor, cond = randn((2, 4, 3, 3), 0, 3, torch.float32)
    sigma = torch.tensor([0.3, 0.7])
    out = rcfg.virtual_uncond(x, sigma, anchor, 0.5, flow=True)
    for row in range(2):
        expected = rcfg.virtual_uncond(x[row:row + 1], sigma[row].item(), anchor[row:row + 1], 0.5, flow=True)
        torch.testing.assert_close(out[row:row + 1], expected)
    assert rcfg.residual_cfg(cond.bfloat16(), x, sigma, 1.2, anchor, 0.5, True).dtype == torch.bfloat16
