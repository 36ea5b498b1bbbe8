import pytest
import torch

from guidance_ops import flowopt


def spd(n, low, high, seed):
    """A symmetric positive definite matrix with eigenvalues spread over [low, high] (both reached)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(low, high, n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


def affine(a, b):
    return lambda x: a @ x + b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iterates_follow_the_linear_recursion_and_reach_the_fixed_point(seed):
    g = torch.Generator().manual_seed(100 + seed)
    a, b = spd(6, 0.5, 2.0, seed), torch.randn(6, generator=g, dtype=torch.float64)
    y, x0 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    solution = torch.linalg.solve(a, y - b)
    eta = 0.9 * flowopt.step_size_bound(0.5, 2.0)
    output, x, errors = flowopt.flowopt(affine(a, b), x0, y, eta, 120)
    # x_k - x* = (I - eta A)^k (x_0 - x*): the paper's update on f(x) = A x + b, written independently
    expected = solution + torch.linalg.matrix_power(torch.eye(6, dtype=torch.float64) - eta * a, 120) @ (x0 - solution)
    assert torch.allclose(x, expected, atol=1e-12)
    assert torch.allclose(output, a @ x + b)
    assert len(errors) == 121 and errors[-1] < 1e-3 * errors[0]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert torch.allclose(x, solution, atol=1e-3)


def test_the_bound_is_exact_for_a_multiple_of_the_identity():
    lam, y = 4.0, torch.ones(3, dtype=torch.float64)
    f = affine(lam * torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    bound = flowopt.step_size_bound(lam, lam)
    assert bound == pytest.approx(2 / lam)
    _, x_in, inside = flowopt.flowopt(f, torch.zeros(3, dtype=torch.float64), y, 0.95 * bound, 100)
    _, _, outside = flowopt.flowopt(f, torch.zeros(3, dtype=torch.float64), y, 1.05 * bound, 100)
    assert inside[-1] < 1e-3 * inside[0] and torch.allclose(x_in, y / lam, atol=1e-3)
    assert outside[-1] > 10 * outside[0]  # |1 - eta lam| = 1.1: the error grows geometrically


def test_below_the_bound_converges_for_every_spread_of_the_spectrum():
    for low, high in [(0.1, 1.0), (1.0, 10.0), (0.9, 1.1)]:
        a = spd(5, low, high, 7)
        y = torch.arange(5, dtype=torch.float64)
        _, x, errors = flowopt.flowopt(affine(a, 0.0), torch.zeros(5, dtype=torch.float64), y,
                                       0.99 * flowopt.step_size_bound(low, high), 3000)
        assert errors[-1] < 1e-2 * errors[0], (low, high)
        assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))  # up to round-off


def test_no_bound_without_monotonicity():
    assert flowopt.step_size_bound(0.0, 1.0) == 0.0
    assert flowopt.step_size_bound(-1.0, 1.0) == 0.0


def test_estimate_brackets_the_spectrum_and_is_exact_for_the_identity():
    a = spd(8, 0.5, 3.0, 3)
    bound, mu, lip = flowopt.estimate_step_size_bound(affine(a, 1.0), torch.zeros(8, dtype=torch.float64), probes=8,
                                                      generator=torch.Generator().manual_seed(0))
    assert 0.5 - 1e-9 <= mu <= lip <= 3.0 + 1e-9
    assert bound == pytest.approx(2 * mu / lip ** 2)
    bound, mu, lip = flowopt.estimate_step_size_bound(lambda x: 2.5 * x, torch.zeros(4, 3), probes=2)
    assert mu == pytest.approx(2.5) and lip == pytest.approx(2.5) and bound == pytest.approx(2 / 2.5)


def test_zero_iterations_is_one_pass_from_the_start():
    calls, seen = [], []

    def f(x):
        calls.append(x.clone())
        return 2 * x + 1

    x0, y = torch.randn(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    output, x, errors = flowopt.flowopt(f, x0, y, 0.1, 0, lambda k, x, out, err: seen.append((k, err)))
    assert len(calls) == 1 and x is x0 and torch.equal(output, 2 * x0 + 1)
    assert errors == [pytest.approx(float(torch.linalg.vector_norm(2 * x0 + 1)))] and seen == [(0, errors[0])]
    calls.clear()
    flowopt.flowopt(f, x0, y, 0.1, 3)
    assert len(calls) == 4  # one pass per update and one for the last iterate
    assert torch.allclose(calls[1], x0 - 0.1 * (2 * x0 + 1))


def test_sampler_from_is_the_euler_flow_ode():
    """f is the Euler solver of dx/dsigma = v(x) with a denoised prediction D = x - sigma v (rectified flow)."""
    velocity = lambda x: -0.5 * x + 0.25  # noqa: E731
    sigmas = torch.tensor([0.8, 0.5, 0.2, 0.0])
    steps = []
    f = flowopt.sampler_from(lambda x, s, i: (x - s * velocity(x),) * 2, sigmas, lambda: steps.append(1))
    x0 = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    expected = x0
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        expected = expected + (s_next - s) * velocity(expected)
    assert torch.allclose(f(x0), expected, atol=1e-12) and len(steps) == 3


def test_official_defaults():
    assert flowopt.ETA == {"flux": 0.0025, "sd3": 0.01}
    assert flowopt.EDIT_N_MAX == {"flux": 13, "sd3": 12} and flowopt.EDIT_STEPS == 15
    assert (flowopt.INVERSION_STEPS, flowopt.INVERSION_N_MAX, flowopt.INVERSION_ITERATIONS) == (10, 10, 30)
    assert (flowopt.SOURCE_GUIDANCE, flowopt.TARGET_GUIDANCE) == (1.0, 3.5)
