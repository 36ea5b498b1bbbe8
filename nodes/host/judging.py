"""Judges read inside a sampling run: a clean estimate decoded to pixels for an image classifier, or denoised
again under each of a prompt judge's prompts (the Diffusion Classifier) with the sampled model; and the
conditional prediction of one more prompt, batched over the rows that need it."""
import torch

from ...guidance_ops import judges
from .classifier import timestep_sigmas
from .evaluation import add_run_conditioning, run_conditioning
from .family import model_sampling, prediction_space
from .runs import SIDE_PASS


def prepare_judge(model, key, judge):
    """Call at patch time on the patched clone: a prompt judge's prompts are prepared by the sampler on every run
    (areas, the model's extra inputs), as the positive prompt is."""
    if judge.reads == "model":
        prepare_prompts(model, f"{key}/judge", judge.conditionings.value)


def prepare_prompts(model, key, conditionings):
    for i, conditioning in enumerate(conditionings):
        add_run_conditioning(model, f"{key}/{i}", conditioning)


def predict_prompt(model, guider, key, index, x, sigma, model_options):
    """The denoised prediction for prompt ``index`` of those ``prepare_prompts`` registered under ``key``; ``sigma``
    has one value per row of ``x``. A side pass (``runs.SIDE_PASS``)."""
    import comfy.samplers
    conds = run_conditioning(guider, f"{key}/{index}")
    options = {**model_options,
               "transformer_options": {**model_options.get("transformer_options", {}), SIDE_PASS: True}}
    return comfy.samplers.calc_cond_batch(model.model, [conds], x, sigma, options)[0]


def judge_log_probs(model, judge, denoised, guider, key, model_options, vae=None):
    """``[B, K]`` log-probabilities of the judge's labels for each row of ``denoised`` (model space, as the
    sampler's post-CFG arguments give it)."""
    if judge.reads == "pixels":
        return judge.log_probs(decode(model, vae, denoised, f"the judge ({type(judge).__name__})"))
    return _prompt_log_probs(model, judge, denoised, guider, f"{key}/judge", model_options)


def score_latents(model, vae, scorer, latents):
    """``[B]`` scores of finished (or clean-estimate) latents of the sampling space, decoded by the VAE; no
    gradients."""
    with torch.no_grad():
        return scorer.score(decode(model, vae, latents, f"the scorer ({scorer.describe()})")).float()


def decode(model, vae, denoised, reader):
    if vae is None:
        raise ValueError(f"{reader} reads pixels: connect the model's VAE to the vae input")
    if denoised.ndim != 4:
        raise ValueError(f"{reader} reads images, but these latents have {denoised.ndim - 2} "
                         f"spatial dimensions (a video model); use a prompt judge")
    pixels = vae.decode(model.model.process_latent_out(denoised.float()))
    return pixels.to(denoised.device, torch.float32).movedim(-1, 1).clamp(0, 1)


def _prompt_log_probs(model, judge, x0, guider, key, model_options):
    sampling = model_sampling(model)
    sigmas = torch.tensor(timestep_sigmas(model, judge.timesteps), device=x0.device, dtype=torch.float32)
    noise = judge.noise(x0.shape[1:]).to(x0.device, x0.dtype)
    pairs = len(sigmas)
    clean = x0.repeat_interleave(pairs, dim=0)  # row b * pairs + j: image b at pair j
    rows = sigmas.repeat(x0.shape[0])
    eps = noise.repeat(x0.shape[0], *([1] * (x0.ndim - 1)))
    x = sampling.noise_scaling(rows.reshape(-1, *([1] * (x0.ndim - 1))), eps, clean)
    to_prediction, _ = prediction_space(sampling, rows.reshape(-1, *([1] * (x0.ndim - 1))), x)
    target = to_prediction(clean)
    errors = []
    for index in range(len(judge.labels)):
        denoised = predict_prompt(model, guider, key, index, x, rows, model_options)
        per_pair = judges.summed_squared_error(to_prediction(denoised), target)
        errors.append(per_pair.reshape(x0.shape[0], pairs).mean(1))
    return judges.log_probs_from_errors(torch.stack(errors, dim=1))
