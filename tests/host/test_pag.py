"""TrainFree PAG on the real ComfyUI with tiny SD1.5 / SDXL / SD3 / Flux models."""
import pytest
import torch

from conftest import AttentionOverride, ModelCallCounter, run_node, sample
from harness import tiny_models


def pag(model, scale=3.0, layers="auto", start=0.0, end=1.0, **kw):
    return run_node("TrainFreePAG", model=model, scale=scale, layers=layers, start_percent=start,
                    end_percent=end, **kw)[0]


def report(host, model):
    return list(host.run_reports(model).values())


def test_scale_zero_is_exactly_the_unpatched_result(tiny, family):
    base = sample(tiny(family), family)
    assert torch.equal(sample(pag(tiny(family), scale=0.0), family), base)


def test_empty_window_runs_no_extra_pass_and_changes_nothing(tiny, family):
    base_model = tiny(family).clone()
    base_counter = ModelCallCounter(base_model)
    base = sample(base_model, family)
    patched = pag(tiny(family), start=1.0, end=1.0)  # sigma 0 only: no sampled step lies in it
    counter = ModelCallCounter(patched)
    assert torch.equal(sample(patched, family), base)
    assert (counter.calls, counter.rows) == (base_counter.calls, base_counter.rows)


def test_pag_changes_the_result_at_one_extra_conditional_pass_per_step(tiny, family, host):
    base_model = tiny(family).clone()
    base_counter = ModelCallCounter(base_model)
    base = sample(base_model, family, steps=4)
    patched = pag(tiny(family))
    counter = ModelCallCounter(patched)
    out = sample(patched, family, steps=4)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3
    assert counter.calls == base_counter.calls, "the extra pass must be batched with CFG's own passes"
    assert counter.rows == base_counter.rows + 4, "exactly one extra conditional row per step"
    assert report(host, patched)[0]["extra_passes"] == 4


def test_the_input_model_is_not_mutated(tiny, family):
    model = tiny(family)
    options_before = repr(model.model_options)
    base = sample(model, family)
    patched = pag(model)
    sample(patched, family)
    assert repr(model.model_options) == options_before
    assert torch.equal(sample(model, family), base)


def test_batch_of_two_and_prompts_longer_than_77_tokens(tiny, family):
    base = sample(tiny(family), family, batch=2, tokens=154)
    out = sample(pag(tiny(family)), family, batch=2, tokens=154)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert ((out - base).flatten(1).abs().amax(1) > 1e-3).all(), "both samples of the batch are guided"


def test_no_stale_state_between_runs_of_different_size_and_steps(tiny, family):
    reused = pag(tiny(family))
    sample(reused, family, size=16, steps=4, batch=2)
    second = sample(reused, family, size=24, steps=3)
    fresh = sample(pag(tiny(family)), family, size=24, steps=3)
    assert torch.equal(second, fresh)


def test_an_interrupted_run_leaves_no_state_behind(tiny, family):
    reused = pag(tiny(family))

    def boom(*_):
        raise KeyboardInterrupt

    import comfy.sample
    latent = torch.zeros(1, tiny_models.LATENT_CHANNELS[family], 16, 16)
    with pytest.raises(KeyboardInterrupt):
        comfy.sample.sample(reused, torch.randn_like(latent), 4, 3.0, "euler", "normal",
                            tiny_models.conditioning(family, seed=1), tiny_models.conditioning(family, seed=2),
                            latent, callback=boom, disable_pbar=True)
    assert torch.equal(sample(reused, family), sample(pag(tiny(family)), family))


def test_two_pags_on_the_same_layers_add_up_like_one_with_the_summed_scale(tiny, family):
    twice = sample(pag(pag(tiny(family), scale=1.0), scale=2.0), family)
    once = sample(pag(tiny(family), scale=3.0), family)
    torch.testing.assert_close(twice, once, rtol=1e-3, atol=1e-3 * once.abs().max().item())


def test_two_pags_on_different_layers_both_act(tiny, family, host):
    other = {"sd15": "output.1", "sdxl": "output.1.1", "sd3": "double.0", "flux": "single.1"}[family]
    a, b = sample(pag(tiny(family)), family), sample(pag(tiny(family), layers=other), family)
    both_model = pag(pag(tiny(family)), layers=other)
    both = sample(both_model, family)
    assert (both - a).abs().max() > 1e-3 and (both - b).abs().max() > 1e-3
    assert all(r["extra_passes"] == 4 for r in report(host, both_model))


def test_matches_core_pag_on_the_unet_middle_block(tiny):
    for family in ("sd15", "sdxl"):
        core = sample(run_node("PerturbedAttentionGuidance", model=tiny(family), scale=2.5)[0], family)
        ours = sample(pag(tiny(family), scale=2.5, layers="middle.0"), family)
        torch.testing.assert_close(ours, core, rtol=1e-3, atol=1e-3 * core.abs().max().item())


@pytest.mark.parametrize("order", ["ours_first", "core_first"])
def test_stacks_with_core_pag_and_core_apg_in_either_order(tiny, order):
    family = "sd15"
    core_pag = lambda m: run_node("PerturbedAttentionGuidance", model=m, scale=1.5)[0]  # noqa: E731
    core_apg = lambda m: run_node("APG", model=m, eta=0.0, norm_threshold=5.0, momentum=0.0)[0]  # noqa: E731
    ours = lambda m: pag(m, scale=1.5, layers="middle.0")  # noqa: E731
    chain = [ours, core_pag] if order == "ours_first" else [core_pag, ours]
    model = tiny(family)
    for patch in chain:
        model = patch(model)
    stacked = sample(model, family)
    # Both PAGs perturb the same layer at 1.5 each: the stack equals one PAG at 3.0.
    torch.testing.assert_close(stacked, sample(ours(ours(tiny(family))), family), rtol=1e-3,
                               atol=1e-3 * stacked.abs().max().item())
    with_apg = sample(core_apg(model) if order == "ours_first" else ours(core_apg(core_pag(tiny(family)))), family)
    assert torch.isfinite(with_apg).all() and (with_apg - stacked).abs().max() > 1e-3


def test_unknown_layer_names_raise_and_list_the_models_layers(tiny, family):
    with pytest.raises(ValueError) as err:
        pag(tiny(family), layers="output.42" if family in ("sd15", "sdxl") else "double.42")
    message = str(err.value)
    assert "42" in message and ("middle.0" in message if family in ("sd15", "sdxl") else "double.1" in message)


def test_start_after_end_is_an_error(tiny):
    with pytest.raises(ValueError, match="swap"):
        pag(tiny("sd15"), start=0.8, end=0.2)


def test_the_window_skips_the_extra_pass_outside_it(tiny, family, host):
    base_model = tiny(family).clone()
    base_counter = ModelCallCounter(base_model)
    sample(base_model, family, steps=8)
    patched = pag(tiny(family), start=0.0, end=0.5)
    counter = ModelCallCounter(patched)
    sample(patched, family, steps=8)
    guided = report(host, patched)[0]["extra_passes"]
    assert 0 < guided < 8
    assert counter.rows - base_counter.rows == guided
    assert report(host, patched)[0]["skipped"] == 8 - guided


class AttentionRecorder(AttentionOverride):
    """An attention override that records, for every self-attention call, its layer and how many batch rows
    really went through attention (rows given identity attention by PAG never reach it)."""

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        q, k = args[0], args[1]
        tokens = 2 if kwargs.get("skip_reshape") else 1
        if q.shape[tokens] == k.shape[tokens]:  # self-attention (cross-attention sees the 8 text tokens)
            layer = to.get("block") or (to.get("block_type"), to.get("block_index"))
            self.calls.append((tuple(layer), to.get("block_index") if "block" in to else None, q.shape[0]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family,layers,expected", [
    ("sd15", "middle.0", {(("middle", 0), 0)}),
    ("sd15", "input.1, output.3", {(("input", 1), 0), (("output", 3), 0)}),
    ("sdxl", "output.0.1", {(("output", 0), 1)}),
    ("flux", "double.1, single.0", {(("double", 1), None), (("single", 0), None)}),
])
def test_exactly_the_selected_layers_are_perturbed(tiny, family, layers, expected):
    model = tiny(family).clone()
    recorder = AttentionRecorder(model)
    sample(pag(model, layers=layers), family, steps=2)
    perturbed = {(layer, index) for layer, index, rows in recorder.calls if rows == 2}
    assert perturbed == expected
    assert all(rows == 3 for layer, index, rows in recorder.calls if (layer, index) not in expected)


def test_exactly_the_selected_sd3_block_is_perturbed(tiny):
    # SD3's MMDiT names no blocks inside attention calls: its joint blocks run in order, one call each. At the
    # perturbed block the perturbed row attends alone (with PAG's mask), the other two rows without it.
    model = tiny("sd3").clone()
    recorder = AttentionRecorder(model)
    sample(pag(model, layers="double.0"), "sd3", steps=2)
    rows = [r for _, _, r in recorder.calls]
    assert rows == [1, 2, 3] * 2


def test_a_model_family_it_cannot_serve_is_refused(tiny):
    import comfy.model_patcher
    import comfy.supported_models as sm
    config = sm.AuraFlow({"max_seq": 64, "cond_seq_dim": 64, "n_layers": 1, "n_double_layers": 1,
                          "dim": 64, "n_heads": 2, "patch_size": 2, "in_channels": 4, "out_channels": 4})
    config.set_inference_dtype(torch.float32, None)
    aura = comfy.model_patcher.ModelPatcher(config.get_model({}), load_device="cpu", offload_device="cpu")
    with pytest.raises(ValueError, match="cannot serve this model .*SD1.5, SDXL"):
        pag(aura)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_adaptive_scale_and_rescale_change_the_result_and_their_neutral_values_do_not(tiny, family):
    plain = sample(pag(tiny(family)), family)
    assert torch.equal(sample(pag(tiny(family), adaptive_scale=0.0, rescale=0.0), family), plain)
    for setting in ({"adaptive_scale": 0.002}, {"rescale": 0.7}):
        changed = sample(pag(tiny(family), **setting), family)
        assert torch.isfinite(changed).all() and (changed - plain).abs().max() > 1e-3, setting
