"""The CLIP judge on a tiny CLIP vision model and the tiny text CLIP: CLIP's zero-shot classification, computed
independently from ComfyUI's own encode_image and the text encoder's pooled output."""
import math

import pytest
import torch

from conftest import run_node
from harness import tiny_models

PROMPTS = "a photo of a seven\na blurry photo\na photo of a cat"


@pytest.fixture(scope="module")
def text_clip(pack):
    clip = tiny_models.make_clip(seed=5)
    with torch.no_grad():
        clip.cond_stage_model.clip_l.logit_scale.fill_(math.log(50.0))
    return clip


@pytest.fixture(scope="module")
def clip_vision(pack):
    return tiny_models.make_clip_vision(seed=6)


def projected_text(clip, text):
    """The prompt's pooled text embedding through CLIP's text projection: the CLIP object's unprojected pooled
    output times the projection matrix."""
    pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled="unprojected")[1]
    return pooled.float() @ clip.cond_stage_model.clip_l.transformer.text_projection.weight.float().T


def test_log_probs_are_clips_zero_shot_classification(text_clip, clip_vision):
    (judge,) = run_node("TrainFreeCLIPJudge", clip_vision=clip_vision, clip=text_clip, prompts=PROMPTS)
    assert judge.reads == "pixels" and judge.labels == tuple(PROMPTS.splitlines())
    pixels = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    log_probs = judge.log_probs(pixels)
    assert log_probs.shape == (2, 3) and log_probs.dtype == torch.float32
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(2), atol=1e-5)

    image = clip_vision.encode_image(pixels.movedim(1, -1))["image_embeds"].float()
    text = torch.cat([projected_text(text_clip, t) for t in PROMPTS.splitlines()])
    logits = 50.0 * torch.stack([torch.stack([torch.cosine_similarity(image[b], text[k], dim=0) for k in range(3)])
                                 for b in range(2)])
    assert torch.allclose(log_probs, logits - torch.logsumexp(logits, dim=1, keepdim=True), atol=1e-4)
    # different images get different judgements (the image side is read, not only the prompts)
    assert not torch.allclose(log_probs[0], log_probs[1], atol=1e-3)


def test_a_vision_model_of_another_width_is_refused_naming_the_fix(text_clip, pack):
    narrow = tiny_models.make_clip_vision(seed=6, projection_dim=32)
    with pytest.raises(Exception, match=r"embeds images in 32 dimensions.*clip_l 64.*matching pair"):
        run_node("TrainFreeCLIPJudge", clip_vision=narrow, clip=text_clip, prompts=PROMPTS)


def test_a_vision_model_without_projection_is_refused(text_clip, pack):
    bare = tiny_models.make_clip_vision(seed=6, projection_dim=None)
    with pytest.raises(Exception, match="no visual projection"):
        run_node("TrainFreeCLIPJudge", clip_vision=bare, clip=text_clip, prompts=PROMPTS)


def test_a_text_encoder_without_trained_projection_is_refused(clip_vision, pack):
    clip = tiny_models.make_clip(seed=5)  # as an SD1.5 checkpoint's CLIP: ComfyUI leaves the projection unset
    with torch.no_grad():
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.zero_()
    with pytest.raises(Exception, match=r"no trained weights.*SD1\.5 checkpoints.*clip_l\.safetensors"):
        run_node("TrainFreeCLIPJudge", clip_vision=clip_vision, clip=clip, prompts=PROMPTS)


def test_one_prompt_is_refused(text_clip, clip_vision):
    with pytest.raises(ValueError, match="at least two lines"):
        run_node("TrainFreeCLIPJudge", clip_vision=clip_vision, clip=text_clip, prompts="a photo of a seven\n")
