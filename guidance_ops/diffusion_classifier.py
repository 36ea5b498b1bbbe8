"""The Diffusion Classifier (Li, Prabhudesai, Duggal, Brown, Pathak, ICCV 2023, arXiv 2303.16203; official code
github.com/diffusion-classifier/diffusion-classifier, ``eval_prob_adaptive.py``): a text-to-image model scores how
well each candidate prompt explains an image by its denoising error, E_{t, eps} ||target - prediction(x_t, t, c)||^2,
and the prompt with the smallest error wins (argmax of the ELBO under a uniform prior).

As the official code does: the timesteps are evenly spaced on the 1000-step grid; every candidate sees the same
(t, eps) pairs; adaptive elimination evaluates the remaining candidates stage by stage (a cumulative number of
timesteps per stage) and keeps the best k after each. The error is taken in the model's own output space (eps,
v or the flow velocity), where its training loss lives. Ties are broken by the prompt's text, so the result does
not depend on the order the candidates are listed in.
"""
import torch

GRID = 1000


class ClassifierError(ValueError):
    """A setting the classifier cannot run with; the message names the fix."""


def timestep_grid(samples, grid=GRID):
    """The official ``t_to_eval``: ``samples`` timesteps, ``grid // samples`` apart, starting half a gap in."""
    if not 1 <= samples <= grid:
        raise ClassifierError(f"{samples} timesteps do not fit the {grid}-step grid: use 1 to {grid}")
    start = grid // samples // 2
    return list(range(start, grid, grid // samples))[:samples]


def stage_timesteps(samples_per_stage, grid=GRID):
    """Per stage, the timesteps it evaluates that no earlier stage did: stage s reaches ``samples_per_stage[s]``
    timesteps in all, spread evenly over the final stage's grid (the official subsampling)."""
    full = timestep_grid(samples_per_stage[-1], grid)
    done, stages = set(), []
    for n in samples_per_stage:
        step = len(full) // n
        chosen = [t for t in full[step // 2::step][:n] if t not in done]
        done.update(chosen)
        stages.append(chosen)
    return stages


def check_stages(samples_per_stage, keep_per_stage, candidates):
    """Refuse stage plans the elimination cannot follow, naming the fix."""
    if len(samples_per_stage) != len(keep_per_stage) or not samples_per_stage:
        raise ClassifierError(f"give as many 'keep' entries as 'timesteps' entries (got {len(keep_per_stage)} and "
                              f"{len(samples_per_stage)}), e.g. timesteps '50, 500' with keep '5, 1'")
    if any(b <= a for a, b in zip(samples_per_stage, samples_per_stage[1:])):
        raise ClassifierError(f"the timesteps per stage are cumulative and must grow: {samples_per_stage}")
    if any(b > a for a, b in zip(keep_per_stage, keep_per_stage[1:])) or keep_per_stage[-1] != 1:
        raise ClassifierError(f"the candidates kept must shrink stage by stage down to 1 (got {keep_per_stage}): "
                              f"end the 'keep' list with 1")
    if candidates < 2:
        raise ClassifierError("write at least two candidate prompts (one per line)")
    if keep_per_stage[0] > candidates:
        raise ClassifierError(f"the first stage keeps {keep_per_stage[0]} candidates but there are {candidates}: "
                              f"keep at most {candidates}")
    timestep_grid(samples_per_stage[-1])


def shared_noise(count, shape, seed):
    """The eps of every (t, eps) pair, drawn once from ``seed`` and shared by every candidate."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count,) + tuple(shape), generator=generator)


def squared_error(prediction, target):
    """Per row, the mean squared error (the paper's uniformly weighted l2)."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)


def keep_best(mean_errors, keep):
    """The ``keep`` candidates with the lowest mean error; ``mean_errors`` maps each candidate's text to it."""
    return sorted(mean_errors, key=lambda text: (mean_errors[text], text))[:keep]


def bar_chart(values, highlight=None, size=(256, 512)):
    """Bars of ``values`` (one per candidate, in the given order) as an [H, W, 3] float image in 0..1; the bar at
    index ``highlight`` is drawn in red, the others in blue."""
    if not values:
        raise ClassifierError("no values to draw")
    height, width = size
    image = torch.ones(height, width, 3)
    top = max(max(values), 1e-12)
    margin, gap = 12, 4
    slot = (width - 2 * margin) / len(values)
    for i, value in enumerate(values):
        left, right = int(margin + i * slot + gap / 2), int(margin + (i + 1) * slot - gap / 2)
        bar = int(round((height - 2 * margin) * max(value, 0.0) / top))
        colour = (0.85, 0.15, 0.1) if i == highlight else (0.15, 0.35, 0.8)
        image[height - margin - bar:height - margin, left:max(right, left + 1)] = torch.tensor(colour)
    image[height - margin, margin:width - margin] = 0.0  # the axis
    return image
