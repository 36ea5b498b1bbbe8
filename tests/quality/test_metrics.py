"""The quality harness' metrics on synthetic images with known answers."""
import math

import torch

from bench.quality import metrics
from training import digits


def flat(colour, n=2, side=32):
    return torch.tensor(colour, dtype=torch.float32)[None, :, None, None].expand(n, 3, side, side).clone()


def test_clipped_share_and_chroma_of_known_images():
    img = flat((0.5, 0.5, 0.5))
    assert metrics.clipped_share(img) == 0.0 and metrics.mean_chroma(img) == 0.0
    img[:, 0] = 1.0  # red channel saturated everywhere: one third of all values clipped
    assert math.isclose(metrics.clipped_share(img), 1 / 3, rel_tol=1e-6)
    assert math.isclose(metrics.mean_chroma(img), 0.5, rel_tol=1e-6)


def test_psnr_and_ssim_of_known_pairs():
    a = flat((0.5, 0.5, 0.5))
    assert metrics.ssim(a, a) > 0.999
    b = a + 0.1  # mse 0.01 -> 20 dB
    assert math.isclose(metrics.psnr(a, b), 20.0, rel_tol=1e-4)
    noisy = (a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert metrics.ssim(a, noisy) < 0.5


def test_foreground_colour_finds_the_digit_colour_on_either_background():
    scans, labels = digits.load_scans()
    for name, rgb in digits.COLOURS.items():
        for level in (0.08, 0.9):
            image = digits.render(scans[:3], [rgb] * 3, [level] * 3, torch.zeros(3, 2, dtype=torch.long))
            assert metrics.nearest_colour(metrics.foreground_colour(image), digits.COLOURS) == [name] * 3


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert abs(metrics.frechet_distance(x, x)) < 1e-6
    assert math.isclose(metrics.frechet_distance(x, x + 2.0), 8 * 4.0, rel_tol=1e-6)  # |mu shift|^2, same covariance
    assert metrics.frechet_distance(x, x * 2) > 1.0


def test_nearest_background_reads_the_rendered_background_under_any_colour():
    scans, _ = digits.load_scans()
    for name, (low, high) in digits.BACKGROUNDS.items():
        for level in (low, high):
            for rgb in digits.COLOURS.values():
                image = digits.render(scans[:3], [rgb] * 3, [level] * 3, torch.tensor([[0, 0], [10, -10], [-10, 10]]))
                assert metrics.nearest_background(image, digits.BACKGROUNDS) == [name] * 3
    grey = flat((0.3, 0.3, 0.3)), flat((0.7, 0.7, 0.7))  # either side of the middle between the two ranges
    assert metrics.nearest_background(torch.cat(grey), digits.BACKGROUNDS) == ["dark"] * 2 + ["light"] * 2
