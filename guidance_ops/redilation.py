"""ScaleCrafter's re-dilation (He et al., ICLR 2024, arXiv 2310.07702; official code: YingqingHe/ScaleCrafter,
``model.py`` ReDilateConvProcessor, ``text2image*.py``, ``configs/*.yaml``, ``assets/*_settings/*.txt``).

A UNet sampled at k times its training side length repeats objects because its convolutions see too small a
part of the image. Re-dilation widens every chosen 3x3 convolution of the inner levels by a dilation factor
during the early (structure-forming) steps, with the trained weights unchanged.

Tables are written per UNet level in diffusers' names, each with one factor for the level's ResNet convolutions
and one for its down- or upsampler's convolution ("sites" below; the host maps them onto the model's modules):
``down_blocks.i``, ``down_blocks.i.downsamplers``, ``mid_block``, ``up_blocks.j``, ``up_blocks.j.upsamplers``.
Level ``down_blocks.r`` and ``up_blocks.(L - 1 - r)`` share resolution r of a UNet with L levels.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- the re-dilated convolution


def redilated_conv(x, weight, bias, factor, stride=1, groups=1):
    """``x`` through the convolution (``weight``, ``bias``, ``stride``) with its kernel dilated by ``ceil(factor)``.

    The padding keeps the size of an odd kxk kernel's output (ReDilateConvProcessor: d (1 + (k - 3) / 2)). A
    fractional factor f dilates by d = ceil(f) and bilinearly resizes the input by d / f first and the output
    back to the undilated output size (input size // stride) after, as the official code does.
    """
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    dilation = math.ceil(factor)
    padding = tuple(dilation * (k - 1) // 2 for k in weight.shape[-2:])
    height, width = x.shape[-2:]
    out_size = (int(height / stride[0]), int(width / stride[1]))
    if dilation != factor:
        scale = dilation / factor
        x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bilinear")
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if tuple(out.shape[-2:]) != out_size:
        out = F.interpolate(out, size=out_size, mode="bilinear")
    return out


def dispersed_conv(x, weight, bias, factor, stride=1, groups=1):
    """Dispersed convolution: the 3x3 kernel spread onto 5x5 by ``dispersion_transform()``, then run re-dilated
    at ``factor`` (the official code halves the table's factor where it disperses)."""
    if tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"dispersion maps 3x3 kernels; this one is {tuple(weight.shape[-2:])}")
    transform = dispersion_transform().to(device=weight.device, dtype=weight.dtype)
    spread = torch.einsum("ls,ois->oil", transform, weight.flatten(2)).unflatten(2, (5, 5))
    return redilated_conv(x, spread, bias, factor, stride, groups)


@functools.lru_cache(maxsize=None)
def dispersion_transform(small=3, large=5, input_size=3, scale=2, eta=0.05):
    """R (large^2 x small^2, row-major kernels): the large kernel R a that best stands in for the small kernel a on
    inputs ``scale`` times larger, by least squares over every input position (ScaleCrafter's kernel_disperse.m,
    solved numerically here): structure term, the large kernel on the bilinearly upsampled input against the
    small kernel's upsampled output; pixel term (weight ``eta``), both kernels on the input itself. The defaults
    are the README's call, kernel_disperse(3, 5, 3, 2, 0.05), which gives transforms/R20to1_new.mat."""
    n, up = input_size, scale * (input_size - 1) + 1
    inputs = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)

    def upsample(t):  # the .m file's bilinear upsampling keeps the corners: align_corners=True
        return F.interpolate(t, size=(up, up), mode="bilinear", align_corners=True)

    def responses(x, size):  # [input pixel j, kernel tap k, output p] -> rows (j, p), columns k
        taps = torch.eye(size * size, dtype=torch.float64).reshape(size * size, 1, size, size)
        out = F.conv2d(x, taps, padding=(size - 1) // 2)
        return out.permute(0, 2, 3, 1).reshape(-1, size * size)

    small_out = F.conv2d(inputs, torch.eye(small * small, dtype=torch.float64).reshape(-1, 1, small, small),
                         padding=(small - 1) // 2)
    small_up = upsample(small_out.reshape(-1, 1, n, n)).reshape(n * n, small * small, up, up)
    lhs = torch.cat([responses(upsample(inputs), large), eta * responses(inputs, large)])
    rhs = torch.cat([small_up.permute(0, 2, 3, 1).reshape(-1, small * small),
                     eta * small_out.permute(0, 2, 3, 1).reshape(-1, small * small)])
    return torch.linalg.solve(lhs.T @ lhs, lhs.T @ rhs)


# ---------------------------------------------------------------- when and how much


def schedule_position(timestep):
    """Where a step lies in the schedule, 0 (first, t = 999) to 1 (t = 0): ComfyUI's percent, 1 - t / 999."""
    return 1.0 - float(timestep) / 999.0


def step_factor(factor, position, dilate_percent, progressive):
    """The factor at schedule ``position``, None once ``position >= dilate_percent`` (the official code dilates
    steps i < dilate_tau of 50). Progressive: d_i = max(ceil(d (tau - i) / tau), 2), here with i / tau =
    position / dilate_percent, so it holds for any step count."""
    if position >= dilate_percent:
        return None
    if not progressive:
        return factor
    return max(math.ceil(factor * (1.0 - position / dilate_percent) - 1e-9), 2)


# ---------------------------------------------------------------- tables and presets


def level_table(down=None, mid=None, up=None):
    """A table from ``down`` / ``up``: {block index: (resnet factor, sampler factor or None)} and ``mid``."""
    table = {}
    for kind, sampler, levels in (("down_blocks", "downsamplers", down or {}), ("up_blocks", "upsamplers", up or {})):
        for i, (resnets, resampler) in levels.items():
            table[f"{kind}.{i}"] = resnets
            if resampler is not None:
                table[f"{kind}.{i}.{sampler}"] = resampler
    if mid is not None:
        table["mid_block"] = mid
    return table


def generic_table(levels, pixels, weak=False):
    """A table for any UNet of ``levels`` resolution levels, by relative depth r / (L - 1) as SD1.5's tables go:
    the outermost level is never dilated; 4x pixels: 2 everywhere else; 16x pixels: ceil(1 + 3 r / (L - 1))
    (SD1.5: 2, 3, 4) with the middle block at the deepest level's factor; the weak (noise-damped) 16x table also
    leaves the shallowest dilated level alone, as SD1.5's does. For L = 4 these are SD1.5's own tables."""
    if levels < 2:
        raise PresetMismatch("this UNet has a single resolution level, which ScaleCrafter never dilates")
    factors = {r: 2 if pixels == 4 else -(-(levels - 1 + 3 * r) // (levels - 1)) for r in range(1, levels)}
    if weak:
        factors.pop(1)
    down = {r: (f, f if r < levels - 1 else None) for r, f in factors.items()}
    up = {levels - 1 - r: (f, f) for r, f in factors.items()}
    return level_table(down, mid=factors.get(levels - 1, 2 if pixels == 4 else 4), up=up)


class PresetMismatch(ValueError):
    pass


@dataclass(frozen=True)
class Preset:
    name: str
    levels: int  # resolution levels of the UNet the table is written for; 0: generic (any)
    table: dict
    tau: float  # dilate_tau / 50 of the official config (also its ndcfg_tau where it has a weak table)
    progressive: bool
    weak_table: dict = None  # the noise-damped CFG's weak re-dilation (ndcfg_dilate_settings), if any
    disperse: tuple = ()  # sites of the dispersed convolution (disperse_settings), if any
    pixels: int = 0  # generic presets: 4 or 16 times the training pixel count


_SD_4X = level_table(down={1: (2, 2), 2: (2, 2), 3: (2, None)}, mid=2, up={0: (2, 2), 1: (2, 2), 2: (2, 2)})
_SD_DISPERSE = ("down_blocks.2.downsamplers", "down_blocks.3", "mid_block", "up_blocks.0",
                      "up_blocks.0.upsamplers", "up_blocks.1", "up_blocks.1.upsamplers")
# SDXL has three levels: the official SDXL files also list down_blocks.3, down_blocks.2.downsamplers and
# up_blocks.2.upsamplers, which SDXL lacks (diffusers skips names it does not find); they are left out here.
PRESETS = {p.name: p for p in (
    Preset("SD1.5 1024x1024 (4x pixels)", 4, _SD_4X, 30 / 50, False),
    Preset("SD1.5 2048x2048 (16x pixels)", 4,
           level_table(down={1: (2, 2), 2: (3, 3), 3: (4, None)}, mid=4, up={0: (4, 4), 1: (3, 3), 2: (2, 2)}),
           35 / 50, True,
           level_table(down={2: (3, 3), 3: (4, None)}, mid=4, up={0: (4, 4), 1: (3, 3)}), _SD_DISPERSE),
    Preset("SD2.1 1024x1024 (4x pixels)", 4, _SD_4X, 20 / 50, False),
    Preset("SD2.1 2048x2048 (16x pixels)", 4,
           level_table(down={2: (3, 4), 3: (4, None)}, mid=4, up={0: (4, 4), 1: (4, 4), 2: (3, 3), 3: (2, None)}),
           37 / 50, True,
           level_table(down={2: (3, 4), 3: (4, None)}, mid=4, up={0: (4, 4), 1: (4, 4), 2: (3, 3)}), _SD_DISPERSE),
    Preset("SDXL 2048x2048 (4x pixels)", 3, level_table(mid=2, up={0: (2, 2)}), 30 / 50, False),
    Preset("SDXL 4096x4096 (16x pixels)", 3,
           level_table(down={2: (4, None)}, mid=4, up={0: (4, 4), 1: (3, 3), 2: (2, None)}), 35 / 50, True,
           level_table(mid=2, up={0: (2, 2)}),
           ("down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.0.upsamplers")),
    Preset("generic 4x pixels", 0, None, 30 / 50, False, pixels=4),
    Preset("generic 16x pixels", 0, None, 35 / 50, True, pixels=16),
)}


def generic_disperse(levels):
    """SD1.5's dispersion sites by depth: the two deepest levels, the middle block and the downsampler into the
    deepest level (only where the table dilates: on two levels the outermost stays vanilla)."""
    return (f"down_blocks.{levels - 2}.downsamplers", f"down_blocks.{levels - 1}", "mid_block", "up_blocks.0",
                  "up_blocks.0.upsamplers", "up_blocks.1", "up_blocks.1.upsamplers")


def preset_tables(preset, levels):
    """(table, weak table or None, dispersion sites) of ``preset`` for a UNet of ``levels`` levels; dispersion
    sites only where the table dilates."""
    if preset.levels:
        table, weak, disperse = preset.table, preset.weak_table, preset.disperse
    else:
        table = generic_table(levels, preset.pixels)
        weak = generic_table(levels, 16, weak=True) if preset.pixels == 16 else None
        disperse = generic_disperse(levels) if preset.pixels == 16 else ()
    return table, weak, tuple(site for site in disperse if site in table)


def fitting_presets(levels):
    return [p.name for p in PRESETS.values() if p.levels in (0, levels)]


def conv_factors(preset, table, sites, levels):
    """``{module path: factor}`` of ``table`` on a UNet whose sites are ``sites`` ({site: [paths]}); a table
    written for another architecture, or naming a site the model lacks, is refused with the presets that fit."""
    missing = sorted(site for site in table if not sites.get(site))
    if missing or preset.levels not in (0, levels):
        raise PresetMismatch(
            f"preset {preset.name!r} is written for a UNet with {preset.levels} resolution levels"
            + (f" and names {', '.join(missing)}, which this model lacks" if missing else "")
            + f"; this UNet has {levels}: choose {' or '.join(repr(n) for n in fitting_presets(levels))}")
    return {path: factor for site, factor in table.items() for path in sites[site]}
