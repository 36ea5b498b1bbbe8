import pytest
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
    assert out.dtype == dtype and torch.equal(out, guide + (main - guide) * scale)  # ComfyUI's cfg_function
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(two_model.two_model_guidance(main, guide, 1.0), main, rtol=tol, atol=tol)
    assert torch.equal(two_model.two_model_guidance(main, guide, 0.0), guide)


def test_autoguidance_is_the_papers_weighted_sum():
    # Karras et al. 2024 write guidance as the weighted sum D_w = w D_1 + (1 - w) D_0 (main model D_1, guide D_0)
    main, guide = [0.5, -1.0, 0.25], [1.5, 2.0, 0.25]
    expected = [2.1 * d1 + (1 - 2.1) * d0 for d1, d0 in zip(main, guide)]  # [-0.6, -4.3, 0.25]
    out = two_model.two_model_guidance(torch.tensor(main, dtype=torch.float64),
                                       torch.tensor(guide, dtype=torch.float64), 2.1)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert abs(expected[0] + 0.6) < 1e-12 and abs(expected[1] + 4.3) < 1e-12


def paper_sine(eps_c, eps_hat, eps_u, w, v):
    """SINE's model-based guidance for t > K (Zhang et al. 2023; techniques.md 18b), element by element:
    eps = w [v eps(z_t, c) + (1 - v) eps_hat(z_t, c_hat)] + (1 - w) eps(z_t)."""
    return [w * (v * c + (1 - v) * f) + (1 - w) * u for c, f, u in zip(eps_c, eps_hat, eps_u)]


@pytest.mark.parametrize("w, v", [(3.0, 0.7), (7.5, 0.7), (5.0, 0.0), (5.0, 1.0), (1.0, 0.3), (0.0, 0.5)])
def test_sine_is_the_papers_equation(w, v):
    g = torch.Generator().manual_seed(3)
    cond, fine, uncond = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    expected = torch.tensor(paper_sine(cond.tolist(), fine.tolist(), uncond.tolist(), w, v), dtype=torch.float64)
    torch.testing.assert_close(two_model.sine_guidance(cond, fine, uncond, w, v), expected, rtol=1e-12, atol=1e-12)


def test_sine_hand_example():
    # w = 3, v = 0.7, eps(c) = 1, eps_hat(c_hat) = 2, eps() = 0.5: 3 * (0.7 + 0.6) - 2 * 0.5 = 2.9
    out = two_model.sine_guidance(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5]), 3.0, 0.7)
    assert abs(out.item() - 2.9) < 1e-6
    # v is the pretrained model's share: at v = 1 the fine-tuned model drops out (CFG), at v = 0 it alone guides
    assert abs(two_model.sine_guidance(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5]), 3.0, 1.0)
               .item() - (3 * 1.0 - 2 * 0.5)) < 1e-6
    assert abs(two_model.sine_guidance(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5]), 3.0, 0.0)
               .item() - (3 * 2.0 - 2 * 0.5)) < 1e-6


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=DTYPES, scale=st.floats(0, 10), seed=st.integers(0, 2**16))
def test_sine_with_v_one_is_cfg_bit_for_bit(shape, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    cond, fine, uncond = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    out = two_model.sine_guidance(cond, fine, uncond, scale, v=1.0)
    assert out.dtype == dtype and torch.equal(out, uncond + (cond - uncond) * scale)  # ComfyUI's cfg_function


def test_sine_runs_while_the_timestep_is_above_k():
    # "for t > K" model-based guidance, plain CFG for t <= K
    assert two_model.sine_active(401.0, 400) and not two_model.sine_active(400.0, 400)
    assert not two_model.sine_active(0.0, 0) and two_model.sine_active(999.0, 998)


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
