"""The degradation operators of plug-and-play restoration: each adjoint is the operator's transpose
(<A x, y> = <x, A^T y> for random x, y), each right inverse measures back to the observation, and each forward
operator says what its name says (block means, luma, kept pixels) computed another way."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import degradations as dg


def _image(batch, height, width, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, channels, generator=g, dtype=torch.float64)


def _image_cases(test):
    cases = given(batch=st.integers(1, 3), height=st.sampled_from([4, 8, 12]), width=st.sampled_from([4, 8, 16]),
                  seed=st.integers(0, 2**16))
    return settings(max_examples=25, deadline=None)(cases(test))


def _operators(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(batch, height, width, generator=g) > 0.5).double()
    ops = [dg.Identity(), dg.Inpainting(mask), dg.Inpainting(mask[0]), dg.Colourisation()]
    ops += [dg.SuperResolution(f) for f in (2, 4) if height % f == 0 and width % f == 0]
    return ops


@_image_cases
def test_adjoint_is_the_transpose(batch, height, width, seed):
    x = _image(batch, height, width, seed)
    for op in _operators(batch, height, width, seed):
        y = _image(*op.forward(x).shape[:3], seed + 7, channels=op.forward(x).shape[-1])
        assert torch.allclose((op.forward(x) * y).sum(), (x * op.adjoint(y)).sum(), atol=1e-10), op.kind


@_image_cases
def test_the_right_inverse_measures_back_to_the_observation(batch, height, width, seed):
    x = _image(batch, height, width, seed)
    for op in _operators(batch, height, width, seed):
        y = op.forward(x)
        start = op.right_inverse(y)
        assert start.shape == x.shape
        assert torch.allclose(op.forward(start), y, atol=1e-12), op.kind


def test_super_resolution_observes_block_means():
    x = _image(2, 8, 12, 3)
    y = dg.SuperResolution(4).forward(x)
    by_hand = x.reshape(2, 2, 4, 3, 4, 3).mean(dim=(2, 4))
    assert torch.allclose(y, by_hand)
    assert dg.SuperResolution(4).measured_size(8, 12) == (2, 3)


def test_colourisation_observes_bt601_luma_and_starts_grey():
    x = _image(1, 2, 2, 5)
    y = dg.Colourisation().forward(x)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    assert torch.allclose(y[..., 0], 0.299 * r + 0.587 * g + 0.114 * b)
    start = dg.Colourisation().right_inverse(y)
    assert torch.equal(start[..., 0], start[..., 1]) and torch.equal(start[..., 1], start[..., 2])


def test_inpainting_keeps_the_pixels_outside_the_mask_and_zeroes_the_rest():
    x = _image(1, 4, 4, 9)
    mask = torch.zeros(4, 4)
    mask[2:] = 1  # the lower half is missing
    y = dg.Inpainting(mask).forward(x)
    assert torch.equal(y[:, :2], x[:, :2]) and not y[:, 2:].any()


def test_measurement_residual_and_start():
    x = _image(1, 8, 8, 11)
    op = dg.SuperResolution(2)
    measurement = dg.Measurement(op, dg.degrade(x, op))
    assert measurement.restored_size() == (8, 8)
    assert torch.allclose(measurement.residual(x), torch.zeros(1, 4, 4, 3, dtype=x.dtype), atol=1e-12)
    assert torch.allclose(op.forward(measurement.start()), measurement.observed, atol=1e-12)


def test_noise_is_added_at_the_level_asked_for():
    x = torch.full((1, 64, 64, 3), 0.5, dtype=torch.float64)
    y = dg.degrade(x, dg.Identity(), noise_level=0.1, generator=torch.Generator().manual_seed(0))
    assert abs((y - x).std().item() - 0.1) < 0.005


def test_bad_operators_are_refused_by_name():
    with pytest.raises(ValueError, match="mask"):
        dg.operator("inpainting")
    with pytest.raises(ValueError, match="factor"):
        dg.operator("super-resolution", factor=1)
    with pytest.raises(ValueError, match="choose one of"):
        dg.operator("deblurring")
