"""Steered Diffusion's correction of the clean estimate against independent statements: with an identity decoder
and strength 1 it is the official code's projection onto the observation (known pixels copied for inpainting,
x0 + A^+(y - A x0) with nearest-neighbour upsampling for super-resolution, the Moore-Penrose step for luma); with a
nonlinear decoder it moves along -J^T A^T r (J the decoder's explicit Jacobian) by the step that minimises the
linearised loss; and the unsteered loop is the Euler (= DDIM) sampler."""
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import degradations as dg
from guidance_ops import steered_diffusion as sd


def _image(batch, height, width, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, channels, generator=g, dtype=torch.float64)


def _residual(op, y, decode=lambda x: x):
    return lambda x: y - op.forward(decode(x))


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_identity_decoder_inpainting_copies_the_known_pixels(batch, seed):
    x0, truth = _image(batch, 8, 8, seed), _image(batch, 8, 8, seed + 1)
    mask = (torch.rand(8, 8, generator=torch.Generator().manual_seed(seed + 2)) > 0.5).double()
    op = dg.Inpainting(mask)
    corrected, _ = sd.steer(x0, _residual(op, op.forward(truth)), 1.0)
    known = (mask == 0)[None, :, :, None].expand_as(x0)
    expected = torch.where(known, truth, x0)
    torch.testing.assert_close(corrected, expected, rtol=0, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), factor=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
def test_identity_decoder_super_resolution_is_the_pseudo_inverse_projection(batch, factor, seed):
    x0, small = _image(batch, 8, 8, seed), _image(batch, 8 // factor, 8 // factor, seed + 1)
    op = dg.SuperResolution(factor)
    corrected, _ = sd.steer(x0, _residual(op, small), 1.0)
    means = x0.reshape(batch, 8 // factor, factor, 8 // factor, factor, 3).mean((2, 4))
    lift = torch.nn.functional.interpolate((small - means).movedim(-1, 1), scale_factor=factor, mode="nearest")
    torch.testing.assert_close(corrected, x0 + lift.movedim(1, -1), rtol=0, atol=1e-9)
    torch.testing.assert_close(op.forward(corrected), small, rtol=0, atol=1e-9)  # lands on the observation


def test_identity_decoder_colourisation_is_the_moore_penrose_step():
    x0, grey = _image(2, 4, 4, 0), _image(2, 4, 4, 1, channels=1)
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    corrected, _ = sd.steer(x0, _residual(dg.Colourisation(), grey), 1.0)
    luma = (x0 * w).sum(-1, keepdim=True)
    torch.testing.assert_close(corrected, x0 + (grey - luma) * w / (w @ w), rtol=0, atol=1e-9)


def test_nonlinear_decoder_steps_along_the_gradient_to_the_linearised_minimum():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 12, generator=g, dtype=torch.float64) * 0.4
    decode = lambda x: torch.tanh(x.flatten(1) @ weight.T).reshape(x.shape[0], 4, 4, 3)
    x0 = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64)
    op = dg.SuperResolution(2)
    y = _image(1, 2, 2, 5)
    corrected, residual = sd.steer(x0, _residual(op, y, decode), 1.0)

    pre = x0.flatten(1) @ weight.T                          # explicit Jacobian of decode at x0: diag(1 - tanh^2) W
    jacobian = (1 - torch.tanh(pre) ** 2).reshape(48, 1) * weight
    pool = torch.stack([op.forward(e.reshape(1, 4, 4, 3)).flatten() for e in torch.eye(48, dtype=torch.float64)], 1)
    r = (y - op.forward(decode(x0))).flatten()
    torch.testing.assert_close(residual.flatten(), r)
    direction = jacobian.T @ pool.T @ r                     # -grad of 1/2 ||y - A D(x)||^2
    q = pool @ jacobian @ direction
    tau = (r @ q) / (q @ q)
    torch.testing.assert_close((corrected - x0).flatten(), tau * direction, rtol=2e-2, atol=1e-6)
    loss = lambda x: 0.5 * ((y - op.forward(decode(x))) ** 2).sum()
    assert loss(corrected) < loss(x0)


def test_strength_scales_the_step_and_zero_leaves_the_estimate():
    x0, truth = _image(1, 8, 8, 0), _image(1, 8, 8, 1)
    op = dg.SuperResolution(4)
    y = op.forward(truth)
    full, _ = sd.steer(x0, _residual(op, y), 1.0)
    half, _ = sd.steer(x0, _residual(op, y), 0.5)
    none, _ = sd.steer(x0, _residual(op, y), 0.0)
    torch.testing.assert_close(half - x0, 0.5 * (full - x0), rtol=0, atol=1e-12)
    assert torch.equal(none, x0)


def test_a_consistent_estimate_is_not_moved():
    x0 = _image(2, 8, 8, 0)
    op = dg.SuperResolution(2)
    corrected, residual = sd.steer(x0, _residual(op, op.forward(x0)), 1.0)
    assert torch.equal(corrected, x0) or torch.allclose(corrected, x0, atol=1e-12)
    assert float(residual.abs().max()) < 1e-12


def test_the_unsteered_loop_is_euler_and_steered_steps_use_the_corrected_estimate():
    sigmas = torch.tensor([3.0, 1.5, 0.5, 0.0])
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    denoise = lambda x_, sigma: 0.3 * x_ / (1 + sigma ** 2)
    expected = x.clone()
    for i in range(3):  # Karras et al.'s Euler, as ComfyUI's sample_euler states it
        d = (expected - denoise(expected, sigmas[i])) / sigmas[i]
        expected = expected + d * (sigmas[i + 1] - sigmas[i])
    seen = []
    assert torch.equal(sd.sample(denoise, x, sigmas, lambda x0, i: x0, lambda *a: seen.append(a[0])), expected)
    assert seen == [0, 1, 2]
    shifted = sd.sample(denoise, x, sigmas, lambda x0, i: x0 + 1.0)
    assert not torch.allclose(shifted, expected)
    # the last step lands on the corrected estimate (sigma_next = 0)
    last = sd.sample(denoise, x, sigmas[-2:], lambda x0, i: torch.zeros_like(x0))
    assert torch.allclose(last, torch.zeros_like(last), atol=1e-6)
