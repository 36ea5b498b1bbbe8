"""TrainFree NASA (SNOOPI's Negative-Away Steer Attention) on the real ComfyUI with tiny SD1.5 / SDXL / SD3 / Flux
models."""
import importlib.util

import pytest
import torch

from conftest import FirstEvaluation, ModelCallCounter, run_node, sample
from harness import comfy_host, tiny_models

UNETS, DITS = ("sd15", "sdxl"), ("sd3", "flux")


def nasa(model, negative, alpha=0.5, start=0.0, end=1.0):
    return run_node("TrainFreeNASA", model=model, negative=negative, alpha=alpha, start_percent=start,
                    end_percent=end)[0]


def negative_of(family, tokens=8, seed=5, batch=1):
    return tiny_models.conditioning(family, batch=batch, tokens=tokens, seed=seed, scale=3.0)


def report(host, model):
    return [r for key, r in host.run_reports(model).items() if "nasa" in key][0]


def rows_per_call(model, family, **kw):
    counter = ModelCallCounter(model)
    out = sample(model, family, **kw)
    return out, counter


def test_alpha_zero_is_exactly_the_unpatched_result(tiny, family):
    base = sample(tiny(family), family, cfg=1.0)
    assert torch.equal(sample(nasa(tiny(family), negative_of(family), alpha=0.0), family, cfg=1.0), base)


def test_the_steering_machinery_at_alpha_zero_leaves_the_result_unchanged(tiny, family, host):
    """The node skips all work at alpha 0; here the layers are patched anyway (host API) and must still give the
    unpatched prediction: on DiTs the negative-text row must not disturb the positive row."""
    nodes_nasa = comfy_host.pack_module("nodes.nasa")
    m = tiny(family).clone()
    negative = negative_of(family)[0][0]
    scope = host.RunScope(m, host.new_key("nasa"), lambda guider, *_: nodes_nasa.NASARun(
        1e9, 0.0, host.cross_attention_modules(guider.model_patcher, m)))
    host.count_evaluations(m, scope, lambda run, sigma: setattr(run, "active", True))
    host.steer_cross_attention(m, negative, 0.0, scope)
    out, counter = rows_per_call(m, family, cfg=1.0)
    base = sample(tiny(family), family, cfg=1.0)
    if family in UNETS:
        assert torch.equal(out, base)
    else:  # the positive row now shares its model call with the negative-text row
        assert counter.rows == 2 * counter.calls
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


def test_nasa_changes_the_result_in_one_pass_on_unets_and_one_extra_row_on_dits(tiny, family, host):
    base, base_counter = rows_per_call(tiny(family).clone(), family, cfg=1.0, steps=4)
    patched = nasa(tiny(family), negative_of(family))
    out, counter = rows_per_call(patched, family, cfg=1.0, steps=4)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3
    assert counter.calls == base_counter.calls == 4
    extra = 0 if family in UNETS else 4
    assert counter.rows == base_counter.rows + extra
    r = report(host, patched)
    assert (r["evaluations"], r["steered_evaluations"], r["extra_rows"]) == (4, 4, extra)


def test_the_patched_layers_are_exactly_the_cross_attention_layers(tiny, family, host):
    model = tiny(family)
    net = model.model.diffusion_model
    if family in UNETS:  # every attn2 module, counted independently of the pack
        expected = sum(1 for name, _ in net.named_modules() if name.endswith(".attn2"))
    elif family == "flux":
        expected = len(net.double_blocks) + len(net.single_blocks)
    else:
        expected = len(net.joint_blocks)
    patched = nasa(model, negative_of(family))
    sample(patched, family, cfg=1.0, steps=2)
    r = report(host, patched)
    assert r["layers"] == r["layers_hit"] == expected > 0
    assert r["layer_calls"] == 2 * expected
    replace = patched.model_options["transformer_options"]["patches_replace"]
    if family in UNETS:
        assert set(replace) == {"attn2"}, "self-attention (attn1) is left alone"


def test_a_unet_cross_attention_output_is_the_papers_formula_from_the_module_weights(tiny, host):
    """attn2's output with NASA = to_out(softmax(QK+)V+ - alpha softmax(QK-)V-), computed here in float64 from
    the layer's own weights and the two prompts (hooks only record the layer's input and output)."""
    family, alpha = "sd15", 0.7
    model = tiny(family)
    pos, neg = tiny_models.conditioning(family, seed=1), negative_of(family)
    attn = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
    seen = {}

    def record(name):
        def hook(module, args, output):
            if name not in seen:
                seen[name] = (args[0] if name == "x" else output).clone()
        return hook
    hooks = [attn.to_q.register_forward_hook(record("x")), attn.to_out.register_forward_hook(record("out"))]
    try:
        sample(nasa(model, neg, alpha=alpha), family, cfg=1.0, steps=1, pos=pos)
    finally:
        for h in hooks:
            h.remove()
    heads = attn.heads

    def project(linear, x):
        return x.double() @ linear.weight.double().T + (0 if linear.bias is None else linear.bias.double())

    def attention(q, k, v):
        b, n, c = q.shape
        d = c // heads
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
        w = torch.exp(q @ k.transpose(-1, -2) / d ** 0.5)
        return ((w / w.sum(-1, keepdim=True)) @ v).permute(0, 2, 1, 3).reshape(b, n, c)

    q = project(attn.to_q, seen["x"])
    z_pos = attention(q, project(attn.to_k, pos[0][0]), project(attn.to_v, pos[0][0]))
    z_neg = attention(q, project(attn.to_k, neg[0][0]), project(attn.to_v, neg[0][0]))
    expected = project(attn.to_out[0], z_pos - alpha * z_neg)
    torch.testing.assert_close(seen["out"].double(), expected, rtol=1e-4, atol=1e-4)
    unsteered = project(attn.to_out[0], z_pos)
    assert (seen["out"].double() - unsteered).abs().max() > 1e-2


@pytest.mark.parametrize("family", DITS)
def test_a_dit_steers_the_image_tokens_with_what_they_read_from_the_negative_text(tiny, family, host):
    """A larger alpha moves the result further and the negative prompt matters: a different negative gives a
    different result, the positive prompt as its own negative at alpha > 0 is not a no-op."""
    base = sample(tiny(family), family, cfg=1.0)
    small = sample(nasa(tiny(family), negative_of(family), alpha=0.2), family, cfg=1.0)
    large = sample(nasa(tiny(family), negative_of(family), alpha=0.8), family, cfg=1.0)
    other = sample(nasa(tiny(family), negative_of(family, seed=9), alpha=0.8), family, cfg=1.0)
    assert 1e-4 < (small - base).abs().mean() < (large - base).abs().mean()
    assert (other - large).abs().max() > 1e-4


@pytest.mark.parametrize("family", DITS)
def test_the_negative_text_row_keeps_the_positive_rows_image_stream(tiny, family):
    """Both rows get the steered image tokens in every joint attention and share latent, timestep, pooled vector
    and guidance, so the negative-text row's prediction is the positive row's."""
    import comfy.patcher_extension as pe
    patched = nasa(tiny(family), negative_of(family))
    outputs = []

    def record(executor, x, *args, **kwargs):
        out = executor(x, *args, **kwargs)
        outputs.append(out.clone())
        return out
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_record", record)
    sample(patched, family, cfg=1.0, steps=2)
    assert len(outputs) == 2 and all(o.shape[0] == 2 for o in outputs)
    for out in outputs:
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


def test_the_unconditional_pass_is_left_alone_at_cfg_above_one(tiny, family):
    base_model = tiny(family).clone()
    base_first = FirstEvaluation(base_model)
    sample(base_model, family, cfg=3.0, steps=2)
    patched = nasa(tiny(family), negative_of(family))
    first = FirstEvaluation(patched)
    sample(patched, family, cfg=3.0, steps=2)
    assert torch.equal(first.args["uncond_denoised"], base_first.args["uncond_denoised"]) or family in DITS
    torch.testing.assert_close(first.args["uncond_denoised"], base_first.args["uncond_denoised"], rtol=1e-5,
                               atol=1e-5)
    assert (first.args["cond_denoised"] - base_first.args["cond_denoised"]).abs().max() > 1e-4


def test_an_empty_window_changes_nothing_and_adds_no_row(tiny, family, host):
    base, base_counter = rows_per_call(tiny(family).clone(), family, cfg=1.0)
    patched = nasa(tiny(family), negative_of(family), start=1.0, end=1.0)
    out, counter = rows_per_call(patched, family, cfg=1.0)
    assert torch.equal(out, base)
    assert (counter.calls, counter.rows) == (base_counter.calls, base_counter.rows)
    assert report(host, patched)["steered_evaluations"] == 0


def test_auto_alpha_is_the_family_default(tiny, family, host):
    patched = nasa(tiny(family), negative_of(family), alpha=-1.0)
    sample(patched, family, cfg=1.0, steps=1)
    assert report(host, patched)["alpha"] == {"sd15": 0.1, "sdxl": 0.3, "sd3": 0.5, "flux": 0.5}[family]


def test_no_stale_state_between_runs_of_other_batch_size_and_resolution(tiny, family):
    reused = nasa(tiny(family), negative_of(family))
    sample(reused, family, cfg=1.0, size=16, steps=3, batch=2)
    second = sample(reused, family, cfg=1.0, size=24, steps=2)
    fresh = sample(nasa(tiny(family), negative_of(family)), family, cfg=1.0, size=24, steps=2)
    assert torch.equal(second, fresh)
    scopes = reused.model_options["transformer_options"]["trainfree_runs"].values()
    assert all(scope.state is None for scope in scopes), "the run's projections are dropped with its state"


def test_a_batch_of_two_is_steered_on_both_samples(tiny, family):
    base = sample(tiny(family), family, cfg=1.0, batch=2)
    out = sample(nasa(tiny(family), negative_of(family)), family, cfg=1.0, batch=2)
    assert ((out - base).flatten(1).abs().amax(1) > 1e-4).all()


@pytest.mark.parametrize("family", UNETS)
def test_a_unet_negative_may_have_another_length_than_the_positive(tiny, family):
    base = sample(tiny(family), family, cfg=1.0)
    out = sample(nasa(tiny(family), negative_of(family, tokens=154)), family, cfg=1.0)
    assert (out - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", DITS)
def test_a_dit_negative_of_another_length_is_refused_clearly(tiny, family):
    with pytest.raises(ValueError, match="negative prompt has 12 tokens and the positive 8"):
        sample(nasa(tiny(family), negative_of(family, tokens=12)), family, cfg=1.0)


def test_bad_inputs_are_refused_with_the_fix(tiny, family):
    narrow = [[torch.zeros(1, 8, 32), {}]]
    with pytest.raises(ValueError, match="width 32.*reads text of width 64.*own text encoder"):
        nasa(tiny(family), narrow)
    with pytest.raises(ValueError, match="exactly one negative prompt"):
        nasa(tiny(family), negative_of(family) + negative_of(family, seed=6))
    with pytest.raises(ValueError, match="after end_percent"):
        nasa(tiny(family), negative_of(family), start=0.8, end=0.2)


def test_a_video_model_is_refused_by_name(tiny):
    wan = tiny(tiny_models.VIDEO_FAMILY)
    with pytest.raises(ValueError, match=r"TrainFree NASA cannot serve this model \(WanModel\); it serves SD1\.5"):
        nasa(wan, negative_of("flux"))


def test_composes_with_pag_in_both_orders(tiny, family, host):
    def pag(m):
        return run_node("TrainFreePAG", model=m, scale=3.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]
    alone = sample(pag(tiny(family)), family, cfg=1.0, steps=2)
    for first, second in ((pag, lambda m: nasa(m, negative_of(family))), (lambda m: nasa(m, negative_of(family)),
                                                                           pag)):
        both = second(first(tiny(family)))
        out = sample(both, family, cfg=1.0, steps=2)
        assert torch.isfinite(out).all() and (out - alone).abs().max() > 1e-4
        reports = host.run_reports(both)
        assert report(host, both)["layer_calls"] > 0
        assert [r for k, r in reports.items() if "pag" in k][0]["extra_passes"] == 2


def test_against_core_nag_on_the_same_model_and_prompts(tiny):
    """Core NAG extrapolates the self-attention outputs of the positive row away from the negative row's, clips
    the step by tau and blends by alpha; it needs the negative as the sampler's unconditional pass (one more row
    at cfg 1). NASA subtracts the negative prompt's cross-attention output inside the positive row."""
    if importlib.util.find_spec("comfy_extras.nodes_nag") is None:  # feature probe: core NAG is newer
        pytest.skip("this ComfyUI has no core NAGuidance node (comfy_extras.nodes_nag)")
    from comfy_extras.nodes_nag import NAGuidance
    family = "sd15"
    pos, neg = tiny_models.conditioning(family, seed=1), negative_of(family)
    base, base_counter = rows_per_call(tiny(family).clone(), family, cfg=1.0, pos=pos, neg=neg)

    def nag(scale, alpha):
        return NAGuidance.execute(tiny(family), nag_scale=scale, nag_alpha=alpha, nag_tau=1.5).args[0]

    nag_out, nag_counter = rows_per_call(nag(5.0, 0.5), family, cfg=1.0, pos=pos, neg=neg)
    nasa_out, nasa_counter = rows_per_call(nasa(tiny(family), neg), family, cfg=1.0, pos=pos, neg=neg)
    assert nag_counter.rows == 2 * base_counter.rows, "NAG runs the negative as the unconditional row at cfg 1"
    assert nasa_counter.rows == base_counter.rows, "NASA steers inside the positive pass"
    for out in (nag_out, nasa_out):
        assert (out - base).abs().max() > 1e-3
    assert (nag_out - nasa_out).abs().max() > 1e-3
    # Off switches: NASA at alpha 0 is the unpatched run bit for bit; NAG at alpha 0 (or scale 1) still batches
    # the unconditional row, so it matches only up to the batched arithmetic.
    assert torch.equal(sample(nasa(tiny(family), neg, alpha=0.0), family, cfg=1.0, pos=pos, neg=neg), base)
    nag_off = sample(nag(5.0, 0.0), family, cfg=1.0, pos=pos, neg=neg)
    assert (nag_off - base).abs().max() <= 1e-5 * base.abs().max() + 1e-3
    # NAG's negative is the sampler's negative input; NASA's is its own input, the sampler's negative is unused
    other_neg = negative_of(family, seed=9)
    assert torch.equal(sample(nasa(tiny(family), neg), family, cfg=1.0, pos=pos, neg=other_neg), nasa_out)
    assert (sample(nag(5.0, 0.5), family, cfg=1.0, pos=pos, neg=other_neg) - nag_out).abs().max() > 1e-4


def test_a_negative_per_sample_is_used_and_on_unets_a_batch_that_does_not_divide_is_refused(tiny, family):
    two = negative_of(family, batch=2)
    base = sample(tiny(family), family, cfg=1.0, batch=2)
    out = sample(nasa(tiny(family), two), family, cfg=1.0, batch=2)
    assert ((out - base).flatten(1).abs().amax(1) > 1e-4).all()
    if family in UNETS:  # DiTs: ComfyUI batches the negative-text row as any conditioning
        with pytest.raises(ValueError, match="batch of 3 prompts, which does not divide the 2 latents"):
            sample(nasa(tiny(family), negative_of(family, batch=3)), family, cfg=1.0, batch=2)


@pytest.mark.parametrize("family,dtype", [("sd15", torch.float16), ("flux", torch.bfloat16)])
def test_half_precision_models_are_steered_in_their_own_dtype(family, dtype):
    model = tiny_models.make_model(family, dtype=dtype)
    base = sample(model, family, cfg=1.0, steps=2)
    out = sample(nasa(model, negative_of(family)), family, cfg=1.0, steps=2)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    assert torch.equal(sample(nasa(model, negative_of(family), alpha=0.0), family, cfg=1.0, steps=2), base)


def test_two_nasa_nodes_compose_each_with_its_own_negative(tiny, family, host):
    first = negative_of(family, seed=5)
    second = negative_of(family, seed=9)
    alone = sample(nasa(tiny(family), first), family, cfg=1.0, steps=2)
    both_model = nasa(nasa(tiny(family), first), second)
    counter = ModelCallCounter(both_model)
    both = sample(both_model, family, cfg=1.0, steps=2)
    assert torch.isfinite(both).all() and (both - alone).abs().max() > 1e-4
    reports = [r for k, r in host.run_reports(both_model).items() if "nasa" in k]
    assert len(reports) == 2 and all(r["layers_hit"] == r["layers"] for r in reports)
    assert counter.rows == 2 * (1 if family in UNETS else 3)
