"""EluCD: classifier guidance with an off-the-shelf classifier, made to work by calibration and pre-conditioning
(Ma, Hu, Wang, Sun, "Elucidating The Design Space of Classifier-Guided Diffusion Generation", ICLR 2024, arXiv
2310.11311; official code github.com/AlexMaOLS/EluCD, DDPM/ and EDM/).

What is the paper's (read in the official code; the paper's text was only readable in its abstract here):
- the classifier is an ordinary one (ImageNet ResNets, not trained on noisy images). In the DDPM sampler it reads
  the predicted clean image x̂0, and its gradient is taken with respect to x̂0 and used as it is, without
  backpropagating through the denoiser (``pred_xstart.detach().requires_grad_()``), added to the posterior mean; so
  guidance costs one classifier forward and backward per step and no extra model evaluation. (The EDM sampler
  instead reads the noisy sample rescaled to unit RMS and moves that sample before the step.);
- smoothing: the classifier's ReLUs are replaced by Softplus(beta) (beta 3 for DDPM, 5 for EDM);
- calibration by two temperatures: the guided log-probability is ``tau_j * f_y - log sum_k exp(tau_m * f_k)`` of the
  logits ``f``, a "joint" temperature on the target's logit (log p(x, y) up to a constant) and a "marginal" one in
  the normaliser (log p(x)); the official DDPM run uses tau_j = 1, tau_m = 0.5 (``margin_temperature_discount``),
  the EDM run tau_m = 0;
- the guidance schedule: the DDPM sampler weights the gradient by the posterior variance plus a sine bump
  ``gamma sin(pi t / T) max variance`` (gamma 0.3, ``classifier_scale`` 1); the EDM sampler rescales the gradient
  to the sample's RMS (``g / rms(g) * rms(x)``) and weights it by a linear decay over the steps plus the sine bump,
  ``w_i = G (N + 1 - i) / (N + 1) + G gamma sin(pi i / N)`` for step i of N, G = 0.004, gamma (``add_factor``) 0.3.
- CFG: the official runs guide class-conditional models without CFG; classifier guidance is a term added to
  whatever prediction the sampler makes.

What is ours (ComfyUI has no noisy-sample hook for a gradient, and our classifiers read decoded pixels):
- the classifier is a pack scorer (``guidance_ops.scorers``); it reads the clean estimate decoded by the VAE, so
  the gradient with respect to the clean latent goes back through the VAE decoder (never through the diffusion
  model, as in the paper);
- as in the DDPM sampler the classifier reads the clean estimate (the sampler's denoised prediction, after CFG and
  the patches before this one: joint guidance is CFG's result plus the classifier term), and the gradient with
  respect to it is used directly; but the step is applied to the clean estimate itself (ComfyUI's samplers take
  their step from it), with the EDM sampler's pre-conditioning and schedule: ``D' = D + w_i * rms(D) * g / rms(g)``
  per image. The variance weighting of the DDPM sampler depends on its discrete schedule and the latent's scale,
  which differ between the four families; the RMS rescaling does not. So ``scale`` (the EDM sampler's G) is the
  fraction of the clean estimate's RMS moved per evaluation, and its default, 0.05, is ours (chosen on the
  reference models, bench/elucd_quality.py; the paper's 0.004 moves x_t and is too small on a clean estimate);
- the classifier reads the decoded image clipped to 0..1 (the DDPM sampler clips x̂0 to [-1, 1]) and the
  gradient passes the clip; Softplus replaces the scorer's ReLUs only (the digit oracle's max-pooling stays);
- the cost is not the paper's "barely any": in a latent model every guided evaluation decodes the estimate with the
  VAE and backpropagates through the decoder, which on the reference models costs several model evaluations;
- a scorer made of several classifiers (the digit scorer: the digit oracle and the colour palette) is calibrated
  term by term, and the terms' calibrated log-probabilities are summed; a scorer that gives only its score is
  calibrated as a two-class classifier (its log p and log(1 - p)).
"""
import contextlib
import math

import torch
import torch.nn.functional as F

DEFAULT_SCALE = 0.05
DEFAULT_JOINT_TEMPERATURE = 1.0  # official DDPM run
DEFAULT_MARGINAL_TEMPERATURE = 0.5  # official DDPM run: joint temperature * margin_temperature_discount 0.5
DEFAULT_SOFTPLUS_BETA = 3.0  # official DDPM run (EDM: 5)
DEFAULT_GAMMA = 0.3  # official DDPM gamma_factor and EDM add_factor
SCHEDULES = ("linear decay + sine (EDM)", "constant")


def calibrated_log_prob(logits, target, joint_temperature, marginal_temperature):
    """``[B]``: ``tau_j * f_y - logsumexp(tau_m * f)`` for logits ``f [B, K]`` and target index ``target`` (an int
    or ``[B]``). Equal temperatures of 1 give the classifier's own log-softmax."""
    logits = logits.float()
    target = torch.as_tensor(target, device=logits.device).expand(logits.shape[0])
    chosen = logits.gather(1, target[:, None])[:, 0]
    return joint_temperature * chosen - torch.logsumexp(marginal_temperature * logits, dim=1)


def binary_logits(log_prob):
    """``[B, 2]``: a score that is a log-probability seen as a two-class classifier (log p, log(1 - p))."""
    log_prob = log_prob.float().clamp(max=0.0)
    rest = (-torch.expm1(log_prob)).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.stack([log_prob, torch.log(rest)], dim=1)


class SmoothReLU(torch.overrides.TorchFunctionMode):
    """While active, every ReLU (``torch.relu``, ``F.relu``, ``nn.ReLU``, ``Tensor.relu``) computes
    ``Softplus(beta)`` instead: the paper's smoothing of the classifier, for classifiers written either way."""

    RELUS = (torch.relu, F.relu, torch.Tensor.relu, torch.relu_, F.relu_, torch.Tensor.relu_)

    def __init__(self, beta):
        super().__init__()
        self.beta = beta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.RELUS:
            return F.softplus(args[0], beta=self.beta)
        return func(*args, **kwargs)


def smoothing(beta):
    """The context in which the classifier runs: Softplus(beta) for its ReLUs, or nothing for beta = inf."""
    if beta is None or math.isinf(beta):
        return contextlib.nullcontext()
    return SmoothReLU(beta)


def calibrated_score(scorer, pixels, joint_temperature, marginal_temperature, softplus_beta):
    """``[B]``: the scorer's calibrated log-probability of ``pixels`` ``[B, 3, H, W]``. A scorer that offers
    ``logit_terms(pixels) -> [(logits [B, K], target)]`` is calibrated term by term; any other is calibrated as a
    two-class classifier of its score."""
    with smoothing(softplus_beta):
        if hasattr(scorer, "logit_terms"):
            terms = scorer.logit_terms(pixels)
        else:
            terms = [(binary_logits(scorer.score(pixels)), 0)]
    total = pixels.new_zeros(pixels.shape[0], dtype=torch.float32)
    for logits, target in terms:
        total = total + calibrated_log_prob(logits, target, joint_temperature, marginal_temperature)
    return total


def schedule_weight(step, steps, schedule, gamma):
    """The weight of step ``step`` (0-based) of ``steps``, relative to ``scale``: the EDM sampler's linear decay
    plus sine bump ``(N + 1 - i) / (N + 1) + gamma sin(pi i / N)``, or 1."""
    if schedule == SCHEDULES[1]:
        return 1.0
    if schedule != SCHEDULES[0]:
        raise ValueError(f"unknown schedule '{schedule}': choose one of {', '.join(SCHEDULES)}")
    n = max(int(steps), 1)
    return (n + 1 - step) / (n + 1) + gamma * math.sin(math.pi * step / n)


def preconditioned_step(denoised, gradient, weight):
    """``weight * rms(D) * g / rms(g)`` per image (rows of ``[B, ...]``); an image whose gradient is zero does not
    move."""
    dims = tuple(range(1, denoised.ndim))
    g = gradient.float()
    g_rms = g.pow(2).mean(dim=dims, keepdim=True).sqrt()
    d_rms = denoised.float().pow(2).mean(dim=dims, keepdim=True).sqrt()
    direction = torch.where(g_rms > 0, g / g_rms.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(g))
    return weight * d_rms * direction
