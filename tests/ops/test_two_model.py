import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import two_model


@st.composite
def latent_shapes(draw):
    b, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    return (b, c, draw(st.integers(1, 3)), h, w) if draw(st.booleans()) else (b, c, h, w)


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=DTYPES, scale=st.floats(0, 10), seed=st.integers(0, 2**16))
def test_a_guide_giving_the_uncond_prediction_is_cfg(shape, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    main, guide = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    out = two_model.two_model_guidance(main, guide, scale)
    assert out.dtype == dtype and torch.equal(out, guide + (main - guide) * scale)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(two_model.two_model_guidance(main, guide, 1.0), main, rtol=tol, atol=tol)
    assert torch.equal(two_model.two_model_guidance(main, guide, 0.0), guide)


def test_autoguidance_hand_example_and_presets():
    # D_0 = 1, D_1 = 2, w = 2.1: 1 + 2.1 * (2 - 1)
    out = two_model.two_model_guidance(torch.tensor([2.0]), torch.tensor([1.0]), 2.1)
    assert out.item() == torch.tensor(1.0 + 2.1).item()
    assert two_model.AUTOGUIDANCE_SCALE["edm2-s/xs"] == 2.10 and two_model.AUTOGUIDANCE_SCALE["edm2-xxl/m"] == 2.05


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=DTYPES, scale=st.floats(0, 10), v=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_sine_reduces_to_cfg_and_mixes_the_finetuned_model(shape, dtype, scale, v, seed):
    g = torch.Generator().manual_seed(seed)
    cond, fine, uncond = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    cfg = uncond + (cond - uncond) * scale
    assert torch.equal(two_model.sine_guidance(cond, fine, uncond, scale, v=1.0), cfg)
    out = two_model.sine_guidance(cond, fine, uncond, scale, v=v)
    assert out.dtype == dtype
    c, f, u = cond.double(), fine.double(), uncond.double()
    expected = scale * (v * c + (1 - v) * f) + (1 - scale) * u  # the paper's form
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * (1 + scale))


def test_sine_hand_example_and_window():
    # w = 3, v = 0.7: 3 * (0.7 * 1 + 0.3 * 2) + (1 - 3) * 0.5 = 3.9 - 1.0
    out = two_model.sine_guidance(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5]), 3.0)
    assert abs(out.item() - 2.9) < 1e-6
    assert two_model.sine_active(401) and not two_model.sine_active(400)
    assert (two_model.SINE_K, two_model.SINE_V) == (400, 0.7)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(0, 10), sigma=st.floats(0.05, 0.95), flow=st.booleans(), seed=st.integers(0, 2**16))
def test_eps_and_denoised_forms_agree(scale, sigma, flow, seed):
    g = torch.Generator().manual_seed(seed)
    x, e_main, e_guide, e_u = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    to_x0 = lambda eps: (x - sigma * eps) / (1 - sigma if flow else 1.0)
    torch.testing.assert_close(two_model.two_model_guidance(to_x0(e_main), to_x0(e_guide), scale),
                               to_x0(two_model.two_model_guidance(e_main, e_guide, scale)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(two_model.sine_guidance(to_x0(e_main), to_x0(e_guide), to_x0(e_u), scale),
                               to_x0(two_model.sine_guidance(e_main, e_guide, e_u, scale)), rtol=1e-10, atol=1e-10)
