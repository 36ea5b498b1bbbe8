"""FreCaS: frequency-aware cascaded sampling (Zhang, Li, Zhang, ICLR 2025, arXiv 2410.18410; official code
github.com/xtudbxk/FreCaS).

Sampling runs in stages of increasing resolution. Each stage denoises on its own stretch of the 1000-step
timestep grid, ``int(linspace(start, end, steps))``; at its last timestep the clean-image estimate is carried to
the next resolution and noised again to the next stage's start, which is the end timestep shifted to a lower
signal-to-noise ratio (more pixels carry the same image, so the same noise level destroys less of it):
SNR' = SNR * (side_prev / side_next) ** gamma for the SD models, the usual resolution shift of the flow time for
SD3 (``t' = k t / (1 + (k - 1) t)``, k = sqrt of the side ratio).

Later stages use frequency-aware CFG: the band the previous stage could not represent (the prediction minus its
bilinear down- and up-sampled copy) gets its own, much larger guidance weight. Cross-attention maps recorded at
the last step of a stage are mixed into the next stage's cross-attention outputs.
"""
import math

import torch
import torch.nn.functional as F

GRID = 1000  # the training timestep grid all the stage timesteps live on


class StageError(ValueError):
    """A stage setting or size that cannot work, with the fix in its message."""


def parse_list(text, name, cast):
    """``"40, 10"`` -> ``[40, 10]``; a clear error for anything else."""
    try:
        values = [cast(part) for part in str(text).replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise StageError(f"{name} must be a comma-separated list of numbers, one per stage (got {text!r})") from None
    if not values:
        raise StageError(f"{name} is empty: give one value per stage, e.g. '40, 10'")
    return values


def check_stages(steps, end_timesteps):
    if len(steps) != len(end_timesteps):
        raise StageError(f"stage_steps has {len(steps)} entries but stage_end_timesteps has {len(end_timesteps)}: "
                         "give one of each per stage")
    if any(n < 1 for n in steps):
        raise StageError(f"every stage needs at least one step (stage_steps {steps})")
    if any(not 0 <= t < GRID for t in end_timesteps):
        raise StageError(f"end timesteps must lie in 0..{GRID - 1} (got {end_timesteps})")
    if end_timesteps[-1] != 0:
        raise StageError(f"the last stage must end at timestep 0 (got {end_timesteps[-1]}): its end is the image")


def stage_timesteps(start, end, steps):
    """The stage's timesteps on the 1000-step grid, truncated to integers as the official scheduler indexes them."""
    return torch.linspace(start, end, steps).to(torch.int32).tolist()


def shifted_start_discrete(grid_sigmas, end, side_ratio, gamma):
    """First timestep of the next stage for a discrete (SD / SDXL) schedule: the first grid timestep whose sigma
    reaches the end timestep's sigma with its SNR scaled by ``side_ratio ** -gamma`` (sigma^2 = 1 / SNR, so the
    target sigma is sigma_end * side_ratio ** (gamma / 2)). ``grid_sigmas``: the 1000 sigmas, ascending in t."""
    target = float(grid_sigmas[end]) * side_ratio ** (gamma / 2)
    reached = torch.nonzero(grid_sigmas >= target * (1 - 1e-6)).flatten()
    if len(reached) == 0:
        raise StageError(f"a stage ending at timestep {end} would restart above the schedule's largest noise level "
                         f"at this resolution step (gamma {gamma}); end that stage at a lower timestep or lower gamma")
    return int(reached[0])


def shifted_start_flow(end, side_ratio):
    """First timestep of the next stage for rectified-flow models (FreCaS's SD3 rule)."""
    k = math.sqrt(side_ratio)
    return int(GRID * k * end / (GRID + (k - 1) * end))


def split_stages(sigmas):
    """Split a cascade schedule at its interior zeros: every stage's sigmas end at 0 (its last step lands on the
    clean estimate, which is what the transition carries on)."""
    values = [float(s) for s in sigmas]
    stages, current = [], []
    for i, value in enumerate(values):
        current.append(value)
        if value == 0.0 and i < len(values) - 1:
            stages.append(current)
            current = []
    stages.append(current)
    return stages


# ---- stage sizes

def stage_sides(base, target, stages):
    """Latent side of every stage, growing geometrically from ``base`` to ``target``; None when a middle stage
    would not land on a whole latent pixel."""
    if stages == 1:
        return [target] if base == target else None
    ratio = (target / base) ** (1.0 / (stages - 1))
    sides = [base * ratio ** s for s in range(stages)]
    if any(abs(side - round(side)) > 1e-6 for side in sides):
        return None
    return [int(round(side)) for side in sides]


def valid_targets(base, stages, near, count=2):
    """Target sides (latent pixels) near ``near`` that give whole-pixel stages from ``base``."""
    found, lo, hi = [], near, near + 1
    while len(found) < count and lo > base // 2:
        for side in (lo, hi):
            if side >= base and stage_sides(base, side, stages) is not None and side not in found:
                found.append(side)
        lo, hi = lo - 1, hi + 1
    return sorted(found)[:count]


def stage_sizes(base_hw, target_hw, stages, factor=8):
    """``[(h, w), ...]`` latent sizes of the stages; a clear error naming valid pixel sizes otherwise."""
    sizes = []
    for axis, base, target in (("height", base_hw[0], target_hw[0]), ("width", base_hw[1], target_hw[1])):
        if target < base:
            raise StageError(f"the latent's {axis} ({target * factor} px) is below the base {axis} "
                             f"({base * factor} px): the cascade only grows; lower the base size")
        sides = stage_sides(base, target, stages)
        if sides is None:
            if stages == 1:
                raise StageError(f"one stage samples at the latent's size: set the base {axis} to {target * factor} "
                                 f"px, or give more stages")
            valid = " or ".join(f"{side * factor} px" for side in valid_targets(base, stages, target))
            raise StageError(f"a {target * factor} px {axis} cannot be reached from {base * factor} px in {stages} "
                             f"stages of equal ratio on whole latent pixels; use a valid {axis} nearby: {valid}")
        sizes.append(sides)
    return list(zip(*sizes))


def side_ratio(previous, current):
    """The ratio of the side that grows most, as the official code picks it."""
    return max(current[0] / previous[0], current[1] / previous[1])


def subsample(x, size):
    """Nearest-neighbour rows and columns of ``x`` at ``size``: a subset of i.i.d. noise is i.i.d. noise of the
    same law, so stage 0 starts from the user's noise at the base size."""
    h, w = x.shape[-2:]
    rows = torch.arange(size[0], device=x.device) * h // size[0]
    cols = torch.arange(size[1], device=x.device) * w // size[1]
    return x[..., rows, :][..., cols]


# ---- frequency-aware CFG

def low_band(x, size):
    """What a latent of ``size`` can hold of ``x``: bilinear down to it and back (the official decomposition)."""
    down = F.interpolate(x, size=tuple(size), mode="bilinear")
    return F.interpolate(down, size=tuple(x.shape[-2:]), mode="bilinear")


def fa_cfg(cond, uncond, low_scale, high_scale, previous_size):
    """Frequency-aware CFG: ``uncond + w_low (cond - uncond)`` on the band the previous stage held and
    ``w_high`` on the newly added band. Linear in the predictions, so denoised and noise predictions alike."""
    delta = cond - uncond
    low = low_band(delta, previous_size)
    return uncond + low * low_scale + (delta - low) * high_scale


# ---- cross-attention maps

def attention_probabilities(q, k, heads):
    """``softmax(q k^T / sqrt(d))`` averaged over heads: [batch, query tokens, key tokens]."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.view(b, n, heads, d).transpose(1, 2).float()
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=1)


def merge_maps(maps):
    """One map from maps of several spatial sizes ``{tokens: [batch, tokens, keys]}``: each stretched along the
    token axis to the largest and averaged, as the official code merges them."""
    largest = max(maps)
    total = 0.0
    for tokens, m in maps.items():
        total = total + stretch(m, largest)
    return total / len(maps)


def stretch(m, tokens):
    """``m`` [batch, tokens', keys] interpolated along its (raster-flattened) token axis to ``tokens``."""
    if m.shape[1] == tokens:
        return m
    return F.interpolate(m.unsqueeze(1), size=(tokens, m.shape[-1]), mode="bilinear").squeeze(1)


def match_keys(m, keys):
    """Adapt a map to a text of ``keys`` tokens when ComfyUI batched the prompt at another length by repeating it
    (repeated keys share attention equally, so repeating divides, folding sums)."""
    have = m.shape[-1]
    if have == keys:
        return m
    if keys % have == 0:
        return m.repeat(1, 1, keys // have) / (keys // have)
    if have % keys == 0:
        return m.view(m.shape[0], m.shape[1], have // keys, keys).sum(dim=2)
    raise StageError(f"the recorded cross-attention map has {have} text tokens and this stage's text {keys}; "
                     "keep the prompts the same across the cascade")


def fuse_attention(out, m, v, heads, weight):
    """``(1 - w) out + w (m @ v)``: the previous stage's map, stretched to this layer, applied to its values.
    ``out``, ``v``: [batch, tokens / keys, heads * d]; ``m``: [batch, tokens', keys]."""
    b, n, inner = out.shape
    d = inner // heads
    m = match_keys(stretch(m, n), v.shape[1]).to(v.dtype)
    vh = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    mixed = (m.unsqueeze(1) @ vh).transpose(1, 2).reshape(b, n, inner)
    return out * (1 - weight) + mixed * weight


def relative_cost(sizes, steps):
    """Model evaluations weighted by latent pixels, against the same step count at the last stage's size: a
    lower bound of the speed-up (attention grows faster than the pixel count)."""
    target = sizes[-1][0] * sizes[-1][1]
    spent = sum(n * h * w for (h, w), n in zip(sizes, steps))
    return spent / (target * sum(steps))
