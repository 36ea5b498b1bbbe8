import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import apg


@st.composite
def latent_shapes(draw, video=None):
    b, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    video = draw(st.booleans()) if video is None else video
    return (b, c, draw(st.integers(1, 3)), h, w) if video else (b, c, h, w)


def randn(shape, dtype, seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=DTYPES, scale=st.floats(-2, 20), seed=st.integers(0, 2**16))
def test_eta_one_no_clip_no_momentum_is_cfg_bit_for_bit(shape, dtype, scale, seed):
    cond, uncond = randn(shape, dtype, seed)
    expected = uncond + (cond - uncond) * scale  # ComfyUI's cfg_function
    out = apg.apg(cond, uncond, scale, eta=1.0, norm_threshold=math.inf)
    assert out.dtype == dtype and torch.equal(out, expected)
    buffer = apg.MomentumBuffer(0.0)
    for _ in range(3):  # a beta = 0 buffer keeps no memory across steps
        assert torch.equal(apg.apg(cond, uncond, scale, 1.0, math.inf, buffer), expected)
        cond, uncond = cond.flip(0), uncond * 0.5
        expected = uncond + (cond - uncond) * scale


def test_hand_computed_projection():
    # D_c = (1, 0), D_u = (-2, -4): Delta = (3, 4), Delta_par = (3, 0), Delta_perp = (0, 4); w = 3
    cond = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    uncond = torch.tensor([-2.0, -4.0]).view(1, 2, 1, 1)
    assert apg.apg(cond, uncond, 3.0, eta=0.0).flatten().tolist() == [1.0, 8.0]
    assert apg.apg(cond, uncond, 3.0, eta=0.5).flatten().tolist() == [4.0, 8.0]
    # clip to r = 2.5 halves Delta to (1.5, 2); eta = 0 keeps (0, 2)
    assert apg.apg(cond, uncond, 3.0, eta=0.0, norm_threshold=2.5).flatten().tolist() == [1.0, 4.0]
    # the core node is one unit stronger: at its scale 3 it reaches what the paper's APG gives at 4
    core = apg.comfy_core_apg(cond, uncond, 3.0, eta=0.0, norm_threshold=0.0)
    assert core.flatten().tolist() == apg.apg(cond, uncond, 4.0, eta=0.0).flatten().tolist() == [1.0, 12.0]


def paper_algorithm_1(conds, unconds, w, eta, r, beta):
    """Algorithm 1 of the paper written out on plain Python lists, one sampling step after another: the running
    average, the norm clip, then the split of the update into its parts along and across D_c by explicit dot
    products."""
    average, outputs = None, []
    for c, u in zip(conds, unconds):
        delta = [ci - ui for ci, ui in zip(c, u)]
        average = delta if average is None else [d + beta * m for d, m in zip(delta, average)]
        length = math.sqrt(sum(m * m for m in average))
        shrink = min(1.0, r / length)
        update = [m * shrink for m in average]
        along = sum(ui * ci for ui, ci in zip(update, c)) / sum(ci * ci for ci in c)
        parallel = [along * ci for ci in c]
        orthogonal = [ui - pi for ui, pi in zip(update, parallel)]
        outputs.append([ci + (w - 1) * (oi + eta * pi) for ci, oi, pi in zip(c, orthogonal, parallel)])
    return outputs


@pytest.mark.parametrize("eta, r, beta", [(0.0, 15.0, -0.5), (0.0, 1.5, -0.5), (0.3, 2.0, -0.75), (1.0, 0.8, 0.0)])
def test_three_steps_match_the_papers_algorithm_written_out(eta, r, beta):
    g = torch.Generator().manual_seed(4)
    conds = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3)]
    unconds = [c + torch.randn(6, generator=g, dtype=torch.float64) for c in conds]
    expected = paper_algorithm_1([c.tolist() for c in conds], [u.tolist() for u in unconds], 7.5, eta, r, beta)
    buffer = apg.MomentumBuffer(beta)
    for c, u, want in zip(conds, unconds, expected):
        out = apg.apg(c.view(1, 6, 1, 1), u.view(1, 6, 1, 1), 7.5, eta, r, buffer)
        torch.testing.assert_close(out.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_momentum_is_a_reverse_running_average():
    buffer = apg.MomentumBuffer(-0.5)
    seen = [buffer.update(torch.tensor([v])).item() for v in (1.0, 2.0, 4.0)]
    assert seen == [1.0, 1.5, 3.25]  # m = Delta + beta * m_prev
    buffer.reset()
    assert buffer.update(torch.tensor([7.0])).item() == 7.0
    with pytest.raises(ValueError):
        buffer.update(torch.zeros(2))


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=DTYPES, r=st.floats(0.05, 10), seed=st.integers(0, 2**16))
def test_clip_bounds_each_sample_and_leaves_short_ones_alone(shape, dtype, r, seed):
    delta, _ = randn(shape, dtype, seed)
    delta[0] *= 100  # the first sample is always clipped
    out = apg.clip_norm(delta, r)
    norms = out.double().reshape(shape[0], -1).norm(dim=1)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert (norms <= r * (1 + tol)).all()
    assert norms[0] == pytest.approx(r, rel=tol)
    short = delta.double().reshape(shape[0], -1).norm(dim=1) <= r
    assert torch.equal(out[short].to(dtype), delta[short])
    with pytest.raises(ValueError):
        apg.clip_norm(delta, 0.0)


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), scale=st.floats(1.5, 15), r=st.floats(0.5, 20), seed=st.integers(0, 2**16))
def test_apg_guidance_term_is_orthogonal_and_bounded(shape, scale, r, seed):
    cond, uncond = randn(shape, torch.float64, seed)
    out = apg.apg(cond, uncond, scale, eta=0.0, norm_threshold=r)
    update = ((out - cond) / (scale - 1)).reshape(shape[0], -1)
    inner = (update * cond.reshape(shape[0], -1)).sum(dim=1)
    assert torch.allclose(inner, torch.zeros_like(inner), atol=1e-9)
    assert (update.norm(dim=1) <= r * (1 + 1e-9)).all()


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(), dtype=st.sampled_from([torch.float32, torch.float64]), scale=st.floats(0, 15),
       eta=st.floats(-1, 2), r=st.sampled_from([math.inf, 0.5, 3.0]), seed=st.integers(0, 2**16))
def test_reductions_are_per_sample_over_all_non_batch_dims(shape, dtype, scale, eta, r, seed):
    cond, uncond = randn(shape, dtype, seed)
    out = apg.apg(cond, uncond, scale, eta=eta, norm_threshold=r)
    flat = apg.apg(cond.reshape(shape[0], -1), uncond.reshape(shape[0], -1), scale, eta=eta, norm_threshold=r)
    one_by_one = torch.cat([apg.apg(cond[i:i + 1], uncond[i:i + 1], scale, eta, r) for i in range(shape[0])])
    assert out.shape == shape and out.dtype == dtype
    torch.testing.assert_close(out, flat.reshape(shape), rtol=0, atol=0)
    torch.testing.assert_close(out, one_by_one, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(shape=latent_shapes(video=False), dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.floats(1, 15), eta=st.floats(0, 1), r=st.sampled_from([math.inf, 1.0, 4.0]),
       beta=st.sampled_from([0.0, -0.5, -0.9]), seed=st.integers(0, 2**16))
def test_paper_apg_at_w_equals_core_node_at_w_minus_one(shape, dtype, scale, eta, r, beta, seed):
    ours_buffer, core_buffer = apg.MomentumBuffer(beta), apg.MomentumBuffer(beta)
    core_r = 0.0 if math.isinf(r) else r  # core disables the clip with 0
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * scale)
    for step in range(3):
        cond, uncond = randn(shape, dtype, seed + step)
        ours = apg.apg(cond, uncond, scale, eta, r, ours_buffer)
        core = apg.comfy_core_apg(cond, uncond, scale - 1.0, eta, core_r, core_buffer)
        torch.testing.assert_close(ours, core, **tol)


def test_core_node_projects_video_per_channel_so_correspondence_is_image_only():
    cond, uncond = randn((2, 3, 4, 5, 5), torch.float64, 0)
    ours = apg.apg(cond, uncond, 5.0, eta=0.0)
    core = apg.comfy_core_apg(cond, uncond, 4.0, eta=0.0, norm_threshold=0.0)
    assert not torch.allclose(ours, core, atol=1e-3)


def test_parallel_component_of_a_zero_prediction_is_zero():
    v = torch.randn(2, 3, 4, 4)
    onto = torch.zeros_like(v)
    onto[1] = 1.0
    par = apg.parallel_component(v, onto)
    assert torch.equal(par[0], torch.zeros_like(par[0]))
    torch.testing.assert_close(par[1], torch.full_like(v[1], v[1].double().mean().item()).double())
