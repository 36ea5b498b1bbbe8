"""TrainFree PAG on the joint text + image attention of SD3 and Flux, watched by an independent recorder.

The recorder is an attention override installed before PAG, so PAG's override hands it every attention call it
makes. It computes the attention probabilities itself from q, k and the mask it is given, checks that ComfyUI's
attention function returned those probabilities times v, and keeps them with the rows' conditioning indices.
"""
import math

import pytest
import torch

from conftest import AttentionOverride, FirstEvaluation, run_node, sample

TEXT = 8  # tokens of the test prompts; Flux and SD3 put them before the 64 image tokens of a 16 x 16 latent
IMAGE = 64
PERTURBED_CHUNK = 2  # PAG's extra conditional copy follows the positive (0) and negative (1) chunks


def pag(model, scale=3.0, layers="auto", **kw):
    return run_node("TrainFreePAG", model=model, scale=scale, layers=layers, start_percent=0.0, end_percent=1.0,
                    **kw)[0]


class ProbabilityRecorder(AttentionOverride):
    def __call__(self, func, *args, **kwargs):
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        out = func(*args, **kwargs)
        if not kwargs.get("skip_reshape", False):  # [B, N, H * D] (SD3 gives v as [B, N, H, D])
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = kwargs.get("mask")
        if mask is not None:
            scores = scores + (mask if mask.dtype != torch.bool else torch.zeros_like(scores).masked_fill(
                ~mask, float("-inf")))
        probabilities = scores.softmax(-1)
        expected = (probabilities @ v).transpose(1, 2).reshape(out.shape)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        to = kwargs.get("transformer_options") or {}
        self.calls.append(((to.get("block_type"), to.get("block_index")), list(to["cond_or_uncond"]),
                           probabilities))
        return out


def perturbed_calls(recorder):
    """The calls that hold PAG's perturbed rows alone (its masked calls)."""
    return [(layer, p) for layer, cou, p in recorder.calls if cou == [PERTURBED_CHUNK]]


def assert_image_attends_to_itself_and_text_only(p):
    """``p``: [rows, heads, N, N] probabilities over text (first) + image tokens."""
    assert p.shape[-1] == TEXT + IMAGE
    image = p[..., TEXT:, :]
    eye = torch.eye(IMAGE, dtype=torch.bool)
    assert (image[..., TEXT:][..., ~eye] == 0).all(), "an image token reads another image token"
    assert (image[..., TEXT:][..., eye] > 0).all(), "an image token does not read itself"
    assert (image[..., :TEXT] > 0).all(), "an image token does not read the prompt"
    assert (p[..., :TEXT, :] > 0).all(), "a text token does not read every token"


@pytest.mark.parametrize("layers,expected", [
    ("double.1", {("double", 1)}),
    ("double.1, single.0", {("double", 1), ("single", 0)}),
    ("single.1", {("single", 1)}),  # the text length must reach the single blocks with no double block marked
])
def test_flux_perturbed_rows_keep_the_text_part_of_joint_attention(tiny, layers, expected):
    model = tiny("flux").clone()
    recorder = ProbabilityRecorder(model)
    sample(pag(model, layers=layers), "flux", steps=2)
    perturbed = perturbed_calls(recorder)
    assert {layer for layer, _ in perturbed} == expected
    assert len(perturbed) == 2 * len(expected), "one masked call per perturbed layer and step"
    for layer, p in perturbed:
        assert p.shape[0] == 1, "the masked call holds the perturbed rows only"
        assert_image_attends_to_itself_and_text_only(p)
    for layer, cou, p in recorder.calls:  # every other row attends to every token
        if cou != [PERTURBED_CHUNK]:
            assert (p > 0).all(), (layer, cou)
            assert sorted(cou) == ([0, 1] if layer in expected else [0, 1, PERTURBED_CHUNK]), (layer, cou)


def test_sd3_perturbed_rows_keep_the_text_part_of_joint_attention(tiny):
    model = tiny("sd3").clone()
    recorder = ProbabilityRecorder(model)
    sample(pag(model, layers="double.1"), "sd3", steps=2)
    cous = [sorted(cou) for _, cou, _ in recorder.calls]
    # SD3's blocks run in order, one call each; block 1's call splits into the masked row and the rest.
    assert cous == [[0, 1, 2], [2], [0, 1]] * 2
    for _, cou, p in recorder.calls:
        if cou == [PERTURBED_CHUNK]:
            assert_image_attends_to_itself_and_text_only(p)
        else:
            assert (p > 0).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_whole_sequence_mode_gives_the_perturbed_rows_no_attention_at_all(tiny, family):
    model = tiny(family).clone()
    recorder = ProbabilityRecorder(model)
    sample(pag(model, layers="double.1", dit_mode="whole sequence"), family, steps=2)
    assert all(cou != [PERTURBED_CHUNK] for _, cou, _ in recorder.calls)
    partial = [cou for _, cou, _ in recorder.calls if sorted(cou) == [0, 1]]
    assert len(partial) == 2, "at the perturbed layer only the other rows reach attention, once per step"


def first_evaluation(model, family, cfg=3.0):
    capture = FirstEvaluation(model)
    sample(model, family, steps=1, cfg=cfg)
    return capture.args


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_conditional_and_unconditional_rows_are_untouched(tiny, family):
    plain = first_evaluation(tiny(family).clone(), family)
    guided = first_evaluation(pag(tiny(family), layers="double.1, double.0"), family)
    for key in ("cond_denoised", "uncond_denoised"):
        torch.testing.assert_close(guided[key], plain[key], rtol=0, atol=1e-6 * plain[key].abs().max().item())
    assert (guided["denoised"] - plain["denoised"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_pags_of_either_mode_on_one_layer_add_their_guidance(tiny, family):
    keep = first_evaluation(pag(tiny(family), scale=1.0), family, cfg=1.0)
    whole = first_evaluation(pag(tiny(family), scale=2.0, dit_mode="whole sequence"), family, cfg=1.0)
    for stacked_model in (pag(pag(tiny(family), scale=1.0), scale=2.0, dit_mode="whole sequence"),
                          pag(pag(tiny(family), scale=2.0, dit_mode="whole sequence"), scale=1.0)):
        both = first_evaluation(stacked_model, family, cfg=1.0)
        cond = both["cond_denoised"]
        expected = cond + (keep["denoised"] - keep["cond_denoised"]) + (whole["denoised"] - whole["cond_denoised"])
        assert (keep["denoised"] - whole["denoised"]).abs().max() > 1e-3, "the two modes differ"
        torch.testing.assert_close(both["denoised"], expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dit_mode_other_than_the_default_is_refused_on_a_unet(tiny, family):
    with pytest.raises(ValueError, match="dit_mode.*image tokens only"):
        pag(tiny(family), dit_mode="whole sequence")
    assert torch.equal(sample(pag(tiny(family), dit_mode="image-only (diffusers)"), family),
                       sample(pag(tiny(family)), family))


def test_an_unknown_dit_mode_is_refused(tiny):
    with pytest.raises(ValueError, match="dit_mode.*choose one of"):
        pag(tiny("flux"), dit_mode="text-only")


def test_flux_single_block_text_length_reaches_the_mask_on_a_latent_of_another_size(tiny):
    model = tiny("flux").clone()
    recorder = ProbabilityRecorder(model)
    sample(pag(model, layers="single.0"), "flux", steps=1, size=24, tokens=TEXT * 2)
    (layer, p), = perturbed_calls(recorder)
    assert p.shape[-1] == 2 * TEXT + 144
    image = p[..., 2 * TEXT:, 2 * TEXT:]
    assert (image[..., ~torch.eye(144, dtype=torch.bool)] == 0).all() and (p[..., 2 * TEXT:, :2 * TEXT] > 0).all()



def test_sd35_image_only_attention_of_a_perturbed_block_gets_the_identity(pack):
    # SD3.5's dual-attention blocks run a second attention over the image tokens alone: it holds no text, so
    # the perturbed rows get the identity there (no call), and the masked joint call as elsewhere.
    from harness import tiny_models
    model = tiny_models.make_model("sd3", x_block_self_attn_layers=[1])
    recorder = ProbabilityRecorder(model)
    sample(pag(model, layers="double.1"), "sd3", steps=1)
    calls = [(sorted(cou), p) for _, cou, p in recorder.calls]
    assert [c for c, _ in calls] == [[0, 1, 2], [2], [0, 1], [0, 1]]
    assert_image_attends_to_itself_and_text_only(calls[1][1])
    assert calls[3][1].shape[-1] == IMAGE
