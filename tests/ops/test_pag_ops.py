import torch
from hypothesis import given, settings, strategies as st

from guidance_ops import batch, pag


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from([(1, 4, 8, 8), (2, 16, 4, 4), (3, 4, 2, 4, 4)]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       scale=st.floats(0, 10))
def test_pag_guidance_is_linear_and_zero_scale_is_identity(shape, dtype, scale):
    g = torch.Generator().manual_seed(0)
    d, c, p = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    assert torch.equal(pag.pag_guidance(d, c, p, 0.0), d)
    out = pag.pag_guidance(d, c, p, scale)
    assert out.dtype == dtype and out.shape == shape
    torch.testing.assert_close(out.double(), (d.double() + scale * (c.double() - p.double())),
                               rtol=2e-2, atol=2e-2 * (1 + scale))


def test_adaptive_scale_matches_diffusers_damping():
    assert pag.adaptive_scale(3.0, 0.0, 10) == 3.0
    assert pag.adaptive_scale(3.0, 0.01, 900) == 2.0
    assert pag.adaptive_scale(3.0, 0.01, 0) == 0.0


def test_rescale_zero_is_identity_and_one_matches_reference_std():
    g = torch.Generator().manual_seed(0)
    guided, ref = torch.randn(2, 4, 8, 8, generator=g) * 5, torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(pag.rescale_to_reference(guided, ref, 0.0), guided)
    out = pag.rescale_to_reference(guided, ref, 1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3)))


def test_window_is_closed_on_both_ends():
    assert pag.in_window(torch.tensor([5.0]), 5.0, 1.0) and pag.in_window(1.0, 5.0, 1.0)
    assert not pag.in_window(0.99, 5.0, 1.0)


@settings(max_examples=30, deadline=None)
@given(cou=st.lists(st.integers(0, 3), min_size=1, max_size=5), per_chunk=st.integers(1, 3))
def test_chunk_rows_and_merge_put_rows_back_in_place(cou, per_chunk):
    total = len(cou) * per_chunk
    mask = batch.chunk_rows(cou, total, {2})
    assert mask.sum() == per_chunk * cou.count(2)
    x = torch.arange(total, dtype=torch.float32)
    assert torch.equal(batch.merge_rows(mask, x[mask], x[~mask]), x)
    assert batch.without_chunks(cou, {2}) == [c for c in cou if c != 2]
