import math

import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import nasa, pag


def head_by_head(q, k, v, heads):
    """Scaled dot-product attention written out per head in float64 (the paper's softmax(QK^T / sqrt d) V)."""
    b, n, c = q.shape
    d = c // heads
    out = torch.zeros(b, n, c, dtype=torch.float64)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        qh, kh, vh = q[..., cols].double(), k[..., cols].double(), v[..., cols].double()
        logits = torch.einsum("bnd,bmd->bnm", qh, kh) / math.sqrt(d)
        weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
        out[..., cols] = torch.einsum("bnm,bmd->bnd", weights, vh)
    return out


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), queries=st.integers(1, 12), pos_tokens=st.integers(1, 9), neg_tokens=st.integers(1, 9),
       heads=st.sampled_from([1, 2, 4]), alpha=st.floats(0, 1.5), seed=st.integers(0, 1000))
def test_nasa_attention_is_the_positive_attention_minus_alpha_times_the_negative(batch, queries, pos_tokens,
                                                                                   neg_tokens, heads, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    dim = 4 * heads
    q = torch.randn(batch, queries, dim, generator=g)
    kp, vp = torch.randn(batch, pos_tokens, dim, generator=g), torch.randn(batch, pos_tokens, dim, generator=g)
    kn, vn = torch.randn(batch, neg_tokens, dim, generator=g), torch.randn(batch, neg_tokens, dim, generator=g)
    out = nasa.nasa_attention(q, kp, vp, kn, vn, heads, alpha)
    expected = head_by_head(q, kp, vp, heads) - alpha * head_by_head(q, kn, vn, heads)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_alpha_zero_gives_the_positive_output_exactly():
    g = torch.Generator().manual_seed(0)
    z_pos, z_neg = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    assert torch.equal(nasa.steer(z_pos, z_neg, 0.0), z_pos)
    half = nasa.steer(z_pos.half(), z_neg, 0.5)
    assert half.dtype == torch.float16


def test_text_values_only_gives_what_image_queries_read_from_the_text_inside_the_joint_softmax():
    """Joint attention over [text; image] with the image values zeroed equals the joint softmax weights restricted
    to the text columns times the text values (the softmax still normalises over text and image keys)."""
    g = torch.Generator().manual_seed(3)
    text, image, dim = 3, 5, 8
    q, k, v = (torch.randn(1, text + image, dim, generator=g) for _ in range(3))
    for token_dim, layout in ((1, lambda t: t), (2, lambda t: t.unsqueeze(1))):  # [B, N, C] and [B, H, N, D]
        zeroed = nasa.text_values_only(layout(v), (0, text), token_dim)
        got = nasa.softmax_attention(q, k, zeroed.reshape(1, text + image, dim), 1)
        weights = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(dim), dim=-1)
        expected = weights[..., :text] @ v.double()[:, :text]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    rest = head_by_head(q, k, v, 1) - nasa.softmax_attention(q, k, nasa.text_values_only(v, (0, text), 1), 1)
    torch.testing.assert_close(rest, head_by_head(q, k, nasa.text_values_only(v, (text, text + image), 1), 1),
                               rtol=1e-5, atol=1e-5)


def test_default_alpha_has_the_papers_values_where_the_paper_gives_them():
    assert nasa.default_alpha("sd15") == 0.1 and nasa.default_alpha("unet") == 0.2
    assert set(nasa.PAPER_ALPHA) == {"sd15", "unet"}
    assert all(0 < a <= 1 for a in nasa.DEFAULT_ALPHA.values())


def test_window_is_closed_on_both_ends():
    assert pag.in_window(torch.tensor([2.0]), 2.0, 1.0) and pag.in_window(1.0, 2.0, 1.0)
    assert not pag.in_window(2.5, 2.0, 1.0) and not pag.in_window(0.5, 2.0, 1.0)
