"""The inversion math alone: the steps against k-diffusion's Euler step and their exact inverse on a denoiser
with a closed form, the null-text schedule against the paper's numbers, the inner loop on a toy model, ProxEdit's
operators and mask."""
import pytest
import torch

from guidance_ops import inversion as ops


def affine_denoiser(a=0.7, b=0.3):
    """D(x, sigma) = a x / (1 + sigma) + b: smooth enough that the fixed-point inverse contracts."""
    return lambda x, sigma: a * x / (1 + sigma) + b


def test_sample_step_is_k_diffusions_euler_step():
    g = torch.Generator().manual_seed(0)
    x, denoised = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigma, sigma_next = 2.5, 1.25
    d = (x - denoised) / sigma                     # k-diffusion's to_d
    torch.testing.assert_close(ops.sample_step(x, sigma, sigma_next, denoised), x + d * (sigma_next - sigma))
    torch.testing.assert_close(ops.sample_step(x, sigma, 0.0, denoised), denoised)


def test_cfgpp_step_takes_x0_from_the_guided_and_the_noise_from_the_unconditional_prediction():
    g = torch.Generator().manual_seed(1)
    x, guided, uncond = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
    out = ops.sample_step(x, 3.0, 1.0, guided, uncond)
    torch.testing.assert_close(out, guided + 1.0 * (x - uncond) / 3.0)


@pytest.mark.parametrize("iterations, tolerance", [(0, None), (30, 1e-5)])
def test_inversion_is_undone_by_the_sampler(iterations, tolerance):
    denoise = affine_denoiser()
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def predict(x, sigma, *_):
        d = denoise(x, sigma)
        return d, d
    pivots = ops.invert(predict, x0, sigmas, iterations)
    assert pivots.shape == (5, 1, 4, 8, 8) and torch.equal(pivots[-1], x0)
    back = ops.replay(predict, pivots[0], sigmas)
    error = (back - x0).abs().max().item()
    if tolerance is None:
        assert error > 1e-3   # plain DDIM inversion is only approximately undone
    else:
        assert error < tolerance
        for i in range(4):    # and every refined pivot is exactly where the sampler's step from the one above lands
            stepped = ops.sample_step(pivots[i], float(sigmas[i]), float(sigmas[i + 1]), *predict(pivots[i], sigmas[i]))
            torch.testing.assert_close(stepped, pivots[i + 1], rtol=0, atol=1e-5)


def test_null_text_schedule_is_the_papers_at_50_steps():
    for i in range(50):
        assert ops.nti_learning_rate(i, 50) == pytest.approx(1e-2 * (1 - i / 100))
        assert ops.nti_threshold(i) == pytest.approx(1e-5 + i * 2e-5)


def test_inner_loop_fits_the_unconditional_embedding_and_stops_early():
    """A toy 'model' whose unconditional prediction is linear in the embedding: the loop finds an embedding whose
    guided step lands on the target, and stops as soon as the loss is below the threshold."""
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    weight = torch.randn(4, 8, generator=g) * 0.3
    wanted = torch.randn(1, 8, generator=g)

    def uncond(e):
        return (e @ weight.T).reshape(1, 4, 1, 1).expand(1, 4, 4, 4)
    guided = uncond(wanted) + 7.5 * (cond - uncond(wanted))
    target = guided + (x - guided) * (1.0 / 2.0)          # the DDIM step from sigma 2 to 1
    start = torch.zeros(1, 8)
    _, _, first_loss = ops.optimise_null_embedding(start, uncond, cond, x, 2.0, 1.0, target, 7.5, 1, 0.05, -1.0)
    found, done, loss = ops.optimise_null_embedding(start, uncond, cond, x, 2.0, 1.0, target, 7.5, 500, 0.05, 1e-4)
    assert loss < 1e-4 < first_loss and done < 500
    assert not start.requires_grad and torch.equal(start, torch.zeros(1, 8))


def test_proximal_operators():
    delta = torch.tensor([[-4.0, -1.0, 0.5, 2.0, 3.0]])
    tau = ops.proximal_threshold(delta, 0.5)
    assert tau.tolist() == [[2.0]]                                    # the median of |delta|
    torch.testing.assert_close(ops.proximal(delta, tau, "l0"), torch.tensor([[-4.0, 0.0, 0.0, 2.0, 3.0]]))
    torch.testing.assert_close(ops.proximal(delta, tau, "l1"), torch.tensor([[-2.0, 0.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(ops.proximal(delta, ops.proximal_threshold(delta, 0.0)), delta)  # keeps everything
    torch.testing.assert_close(ops.proximal_mask(delta, tau), torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]]))


def test_proximal_mask_grows_by_the_dilation():
    delta = torch.zeros(2, 1, 9, 9)
    delta[:, :, 4, 4] = 1.0
    tau = ops.proximal_threshold(delta, 0.5)
    for radius in (0, 1, 2):
        mask = ops.proximal_mask(delta, tau, radius)
        assert mask.sum(dim=(1, 2, 3)).tolist() == [(2 * radius + 1) ** 2] * 2
        assert mask[0, 0, 4 - radius:5 + radius, 4 - radius:5 + radius].eq(1).all()
