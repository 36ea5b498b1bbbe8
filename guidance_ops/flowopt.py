"""FlowOpt (Ronai, Kulikov, Michaeli 2025, arXiv 2510.22010): zero-order optimisation through a whole flow process.

``f(x)`` is the deterministic Euler sampler run from the latent x at step ``n_start = steps - n_max`` of the
schedule down to sigma 0, a black box. FlowOpt looks for the x whose output is the source image's latent y:

    x <- x - eta * (f(x) - y)

i.e. gradient descent on ||f(x) - y||^2 / 2 with the Jacobian of f replaced by the identity, so no gradient flows
through the model. Each iteration is one sampling pass of n_max steps and every f(x) is a result one can look at
(early stopping). With the source prompt f is reconstructed (inversion); with a target prompt the output is
pulled towards the source image while following the target prompt (editing).

The official code works in the latent space after the VAE's shift and scale ((z - shift) * scale, packed into
2x2 tokens for Flux, a permutation that leaves this element-wise update unchanged); ComfyUI's sampling space for
SD3 / Flux is the same space with the same constants. It starts from an inversion of y up to n_start with the
source prompt at guidance 1, runs ``iterations`` updates and one more pass for the last iterate, and fixes eta
per model (no step-size search at run time).
"""
import math

import torch

from .inversion import replay

# The official experiment files (yaml_files/*_exp.yaml): eta per model, the schedules and iteration counts.
ETA = {"flux": 0.0025, "sd3": 0.01}
EDIT_STEPS, EDIT_ITERATIONS = 15, 8
EDIT_N_MAX = {"flux": 13, "sd3": 12}
INVERSION_STEPS, INVERSION_N_MAX, INVERSION_ITERATIONS = 10, 10, 30
SOURCE_GUIDANCE, TARGET_GUIDANCE = 1.0, 3.5


def update(x, output, target, eta):
    """One FlowOpt step: move x against the output's error, as if f were the identity near x."""
    return x - eta * (output - target)


def residual(output, target):
    """||f(x) - y|| over the whole latent (float)."""
    return float(torch.linalg.vector_norm((output - target).float()))


def sampler_from(predict, sigmas, on_step=lambda: None):
    """``f``: the deterministic sampler from a latent at ``sigmas[0]`` down the descending ``sigmas``;
    ``predict(x, sigma, i)`` gives ``(guided, renoise)`` as for ``inversion.replay``."""
    return lambda x: replay(predict, x, sigmas, on_step=on_step)


def flowopt(sample_from, x_init, target, eta, iterations, on_iteration=lambda k, x, output, error: None):
    """Run ``iterations`` FlowOpt updates from ``x_init`` towards ``f(x) = target``; ``sample_from`` is f.

    f is evaluated ``iterations + 1`` times: once per update and once more for the last iterate, so
    ``iterations = 0`` is plain sampling from ``x_init``. ``on_iteration(k, x, f(x), ||f(x) - y||)`` sees every
    iterate (the paper's monitoring / early-stopping view). Returns ``(f(x), x, errors)``: the last iterate x,
    its output, and ``||f(x_k) - y||`` for k = 0..iterations.
    """
    x, errors = x_init, []
    for k in range(iterations + 1):
        output = sample_from(x)
        errors.append(residual(output, target))
        on_iteration(k, x, output, errors[-1])
        if k < iterations:
            x = update(x, output, target, eta)
    return output, x, errors


# ---------------------------------------------------------------- step size

def step_size_bound(monotonicity, lipschitz):
    """The largest eta for which the update is a contraction whatever f does between two points, when f is
    ``lipschitz``-Lipschitz and strongly monotone, <f(a) - f(b), a - b> >= monotonicity * ||a - b||^2:

        ||g(a) - g(b)||^2 <= (1 - 2 eta mu + eta^2 L^2) ||a - b||^2,   g(x) = x - eta (f(x) - y),

    which is below 1 exactly for 0 < eta < 2 mu / L^2; then the iterates converge to the unique x with f(x) = y.
    A sufficient condition (for f(x) = A x + b with symmetric A the exact limit is 2 / lambda_max(A), reached
    when A is a multiple of the identity). No bound when f is not monotone (mu <= 0)."""
    if monotonicity <= 0 or lipschitz <= 0:
        return 0.0
    return 2.0 * monotonicity / lipschitz ** 2


def estimate_step_size_bound(sample_from, x, probes=4, radius=1e-2, generator=None):
    """Estimate mu and L of f around x from ``probes`` random finite differences (``probes + 1`` passes of f):
    mu as the smallest <df, d> / ||d||^2, L as the largest ||df|| / ||d||. Returns ``(bound, mu, L)``."""
    base = sample_from(x)
    mus, lipschitz = [], []
    for _ in range(probes):
        d = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x) * radius
        df = (sample_from(x + d) - base).float()
        d = d.float()
        norm2 = float((d * d).sum())
        mus.append(float((df * d).sum()) / norm2)
        lipschitz.append(math.sqrt(float((df * df).sum()) / norm2))
    mu, lip = min(mus), max(lipschitz)
    return step_size_bound(mu, lip), mu, lip
