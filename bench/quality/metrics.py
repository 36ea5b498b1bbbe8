"""Image metrics for the quality harness; plain torch functions over [N, 3, H, W] images in 0..1."""
import torch
import torch.nn.functional as F

from guidance_ops.digit_oracle import border_colour, ink_map  # noqa: F401 (shared with the oracle)

CLIP_EPS = 1.0 / 255


def foreground_colour(images, threshold=0.5):
    """Mean RGB of the pixels whose ink is above ``threshold`` (the background colour when there are none)."""
    ink = ink_map(images)
    weight = (ink > threshold).float()
    total = weight.sum(dim=(2, 3)).clamp_min(1)
    mean = (images * weight).sum(dim=(2, 3)) / total
    return torch.where(weight.sum(dim=(2, 3)) > 0, mean, border_colour(images))


def nearest_colour(rgb, palette):
    """Name of the palette colour closest in chromaticity (RGB with the grey level taken out) to each row."""
    names = list(palette)
    ref = torch.tensor([palette[n] for n in names], dtype=rgb.dtype)
    centre = lambda x: x - x.mean(dim=-1, keepdim=True)  # noqa: E731
    a = F.normalize(centre(rgb), dim=-1)
    b = F.normalize(centre(ref), dim=-1)
    return [names[i] for i in (a @ b.T).argmax(dim=1).tolist()]


def nearest_background(images, backgrounds):
    """Name of the background (``{name: (low, high) grey level}``) whose range middle is closest to each image's
    border grey level."""
    names = list(backgrounds)
    middles = torch.tensor([sum(backgrounds[n]) / 2 for n in names], dtype=images.dtype)
    grey = border_colour(images).mean(dim=1)
    return [names[i] for i in (grey[:, None] - middles[None]).abs().argmin(dim=1).tolist()]


def clipped_share(images):
    """Share of channel values at the ends of the range (0 or 1 within one 8-bit step): over-saturation."""
    return ((images <= CLIP_EPS) | (images >= 1 - CLIP_EPS)).float().mean().item()


def mean_chroma(images):
    """Mean of max(R,G,B) - min(R,G,B) over all pixels."""
    return (images.amax(dim=1) - images.amin(dim=1)).mean().item()


def psnr(a, b):
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1.0 / mse)).mean().item()


def ssim(a, b, window=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004) with a Gaussian window, per channel, averaged."""
    coords = torch.arange(window, dtype=a.dtype) - window // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window)
    blur = lambda x: F.conv2d(x, kernel, groups=a.shape[1])  # noqa: E731
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def _sqrtm_psd(m):
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(x, y):
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (as in FID)."""
    x, y = x.double(), y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)
    root_x = _sqrtm_psd(cov_x)
    cross = _sqrtm_psd(root_x @ cov_y @ root_x)
    return ((mu_x - mu_y).pow(2).sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * torch.trace(cross)).item()


def component_sizes(mask):
    """Pixel counts of the 8-connected components of each mask ``[N, 1, H, W]`` (bool): a list per image, largest
    first. Labels spread by 3x3 max-pooling until they settle: every component ends up carrying its largest
    pixel index."""
    mask = mask.bool()
    n = mask.shape[0]
    index = torch.arange(1, mask[0].numel() + 1, dtype=torch.float64).reshape(mask.shape[1:])
    labels = torch.where(mask, index.expand_as(mask), torch.zeros((), dtype=torch.float64))
    while True:
        spread = torch.where(mask, F.max_pool2d(labels, 3, stride=1, padding=1), labels)
        if torch.equal(spread, labels):
            break
        labels = spread
    sizes = []
    for i in range(n):
        found = labels[i][mask[i]].long()
        sizes.append(sorted(torch.unique(found, return_counts=True)[1].tolist(), reverse=True))
    return sizes


def component_count(mask, min_pixels):
    """Number of 8-connected components of at least ``min_pixels`` pixels in each mask ``[N, 1, H, W]``."""
    return [sum(s >= min_pixels for s in sizes) for sizes in component_sizes(mask)]
