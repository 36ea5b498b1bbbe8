"""Scorers inside ComfyUI: the nodes make them, a judge that reads the model is refused by name, and
``host.score_latents`` scores latents of the sampling space through the model's latent format and the VAE (on the
SD1.5-class reference model: a held-out digit, VAE-encoded, still scores best for its own caption)."""
import pytest
import torch

from harness import comfy_host
from tests.host.conftest import run_node


@pytest.fixture(scope="module")
def reference(pack):
    loader = comfy_host.pack_module("nodes.reference_model").TrainFreeReferenceModel()
    return loader.load("trainfree_digits.safetensors")


def test_a_vae_encoded_digit_scores_best_for_its_own_caption(host, reference):
    from training import digits
    patcher, _, vae = reference
    scans, labels = digits.load_scans()
    _, test_idx = digits.split(labels)
    images, captions, digit, colour, background = digits.examples(scans, labels, test_idx, 4, seed=3)
    latents = patcher.model.process_latent_in(vae.encode(images.permute(0, 2, 3, 1)))
    wrong = [digits.caption((int(d) + 1) % 10, c, b) for d, c, b in zip(digit, colour, background)]
    own = [host.score_latents(patcher, vae, run_node("TrainFreeDigitScorer", prompt=c)[0], latents[i:i + 1])
           for i, c in enumerate(captions)]
    theirs = [host.score_latents(patcher, vae, run_node("TrainFreeDigitScorer", prompt=c)[0], latents[i:i + 1])
              for i, c in enumerate(wrong)]
    assert all(a.shape == (1,) and a > b + 1.0 for a, b in zip(own, theirs)), (own, theirs)


def test_the_judge_scorer_takes_image_judges_and_refuses_the_prompt_judge(clip):
    oracle = run_node("TrainFreeDigitOracleJudge")[0]
    scorer = run_node("TrainFreeJudgeScorer", judge=oracle, target="seven")[0]
    assert scorer.differentiable and scorer.target == 7
    prompt_judge = run_node("TrainFreePromptJudge", clip=clip, prompts="a cat\na dog", timesteps=2, seed=0)[0]
    with pytest.raises(ValueError, match="reads the sampled model.*Digit Scorer"):
        run_node("TrainFreeJudgeScorer", judge=prompt_judge, target="a cat")
    with pytest.raises(ValueError, match="names no digit word"):
        run_node("TrainFreeDigitScorer", prompt="a photo of a cat")


def test_scoring_needs_the_vae(host, reference):
    patcher, _, _ = reference
    scorer = run_node("TrainFreeDigitScorer", prompt="seven")[0]
    with pytest.raises(ValueError, match="connect the model's VAE"):
        host.score_latents(patcher, None, scorer, torch.zeros(1, 4, 16, 16))
