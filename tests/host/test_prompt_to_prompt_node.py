"""The Prompt-to-Prompt node on inverted latents: the source branch is the plain replay, a neutral edit is the
source, an edit changes the target only where the local blend allows, clear errors."""
import pytest
import torch

from conftest import run_node
from harness import tiny_models

SOURCE = "a red digit seven on a dark background"
TARGET = "a blue digit seven on a dark background"


def engine(class_type, **inputs):
    with torch.inference_mode():
        return run_node(class_type, **inputs)


@pytest.fixture(scope="module")
def setup(tiny):
    model, clip = tiny("sd15"), tiny_models.make_clip()
    g = torch.Generator().manual_seed(0)
    lat = {"samples": torch.randn(2, 4, 16, 16, generator=g)}
    sigmas = run_node("BasicScheduler", model=model, scheduler="normal", steps=5, denoise=1.0)[0]
    source = engine("CLIPTextEncode", clip=clip, text=SOURCE)[0]
    negative = engine("CLIPTextEncode", clip=clip, text="")[0]
    inversion = engine("TrainFreeInvert", model=model, positive=source, latent=lat, sigmas=sigmas, sampler="euler",
                       guidance=1.0, fixed_point_iterations=0)[0]
    return model, clip, inversion, source, negative


def edit(setup, target=TARGET, **inputs):
    model, clip, inversion, _, negative = setup
    settings = dict(edit="word swap", cfg=5.0, unconditional="negative prompt", cross_replace=0.8, self_replace=0.4,
                    negative=negative)
    settings.update(inputs)
    edited, source = engine("TrainFreePromptToPrompt", model=model, clip=clip, inversion=inversion,
                            source_text=SOURCE, target_text=target, **settings)
    return edited["samples"], source["samples"]


def test_source_branch_is_the_plain_replay_and_a_neutral_edit_is_the_source(setup):
    model, _, inversion, source, negative = setup
    edited, reconstructed = edit(setup, SOURCE)
    plain = engine("TrainFreeSampleFromInversion", model=model, inversion=inversion, positive=source, cfg=5.0,
                   unconditional="negative prompt", negative=negative)[0]["samples"]
    # the same computation on a batch twice as large (the attention patch in the path): float rounding only
    torch.testing.assert_close(reconstructed, plain, rtol=0, atol=1e-4 * plain.abs().max().item())
    torch.testing.assert_close(edited, reconstructed, rtol=0, atol=0)


def test_a_word_swap_edits_the_target_only(setup):
    edited, reconstructed = edit(setup)
    neutral_edited, neutral_source = edit(setup, SOURCE)
    torch.testing.assert_close(reconstructed, neutral_source, rtol=0, atol=0)
    assert (edited - reconstructed).abs().max() > 1e-3


def test_local_blend_keeps_the_source_outside_the_edited_words(setup):
    edited, reconstructed = edit(setup, blend_words="red, blue", blend_threshold=0.9)
    same = (edited == reconstructed).flatten(2).all(1)   # latent pixels where every channel is the source's
    assert 0 < same.float().mean() < 1


def test_clear_errors(setup, tiny):
    with pytest.raises(ValueError, match="use refinement mode"):
        edit(setup, "a dark blue digit seven on a dark background")
    with pytest.raises(ValueError, match="source_text does not encode"):
        model, clip, inversion, _, negative = setup
        engine("TrainFreePromptToPrompt", model=model, clip=clip, inversion=inversion, source_text="a digit",
               target_text="a digit", edit="word swap", cfg=5.0, unconditional="negative prompt", cross_replace=0.8,
               self_replace=0.4, negative=negative)
    with pytest.raises(ValueError, match="not a word of the target"):
        edit(setup, edit="reweight", target=SOURCE, reweight_words="green")
    with pytest.raises(ValueError, match="no null-text embeddings"):
        edit(setup, unconditional="null-text (from the inversion)", negative=None)


def test_a_judge_s_side_passes_leave_the_edit_alone(setup):
    """GFCG on the edited model: its judge and reference passes (other row counts than the edit's source / target
    pairs) run beside prompt-to-prompt's attention control, which leaves them alone; the edit still acts."""
    model, clip, inversion, _, negative = setup
    guided = engine("TrainFreeGFCG", model=model, clip=clip, class_prompts=f"{SOURCE}\n{TARGET}", target_class="2",
                    scale=2.0, start_percent=0.0, end_percent=1.0)[0]
    settings = dict(edit="word swap", cfg=5.0, unconditional="negative prompt", cross_replace=0.8, self_replace=0.4,
                    negative=negative, blend_words="red, blue")
    edited, source = engine("TrainFreePromptToPrompt", model=guided, clip=clip, inversion=inversion,
                            source_text=SOURCE, target_text=TARGET, **settings)
    plain_edit, _ = edit(setup, blend_words="red, blue")
    assert torch.isfinite(edited["samples"]).all() and (edited["samples"] - source["samples"]).abs().max() > 1e-3
    assert (edited["samples"] - plain_edit).abs().max() > 1e-3  # GFCG acted too
