"""Features cached across sampling steps.

- UNets (DeepCache): the blocks deeper than the chosen skip branch are gated through ComfyUI's object patches
  (each gate holds the block's own layers under their own names, so weight patches, casts and offloading act as
  before) and skipped on reuse steps; an ``output_block_patch`` keeps the deep feature entering the shallow
  up-block on full steps and serves it on reuse steps; an ``input_block_patch_after_skip`` hands the skipped
  region an empty tensor, so nothing is computed or copied there.
- DiTs (SD3, Flux): block replace patches skip a contiguous range of blocks on reuse steps and add the residual
  the range produced on its last full step.

An APPLY_MODEL wrapper decides per model evaluation. What is kept lives in the run's state, one entry per chunk
of the batch (cond, uncond and extra passes such as PAG's perturbed one, told apart by their place in the batch
and their conditioning), so no row is ever served another row's features; a chunk with nothing kept for its
shape runs in full.
"""
import math
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel

from ...guidance_ops import cache_schedule as schedules
from .family import DIT_FAMILIES, SHARED_WEIGHTS, UNET_FAMILIES, UnsupportedModel, model_family
from .runs import RunScope, Wrappers, step_of

_ROOT = "diffusion_model."


@dataclass
class CacheRun:
    """One run of a cache patch. ``plan(steps)`` gives ``{unit: [compute?] per step}`` when the run's step count is
    first seen; ``window`` = (sigma_start, sigma_end): steps whose sigma lies outside always compute."""
    plan_for: object
    window: tuple
    record: list = None  # receives (step, feature) of the cond chunk at every full step (schedule search)
    segments: list = None  # the run's sigmas, one descending list per stage (FreCaS's cascade has several)
    plans: list = None  # per segment, {unit: [compute?] per step}
    segment: int = 0  # the running evaluation's segment
    kept: dict = field(default_factory=dict)  # (unit, chunk) -> (signature, feature or residuals)
    reusing: dict = None  # unit -> True for the running evaluation's reused units
    step: tuple = None  # the running evaluation's (segment, step)
    signature: tuple = None  # the running evaluation's rows per chunk, latent shape, dtype and device
    chunks: list = None  # the running evaluation's [(chunk key, rows)]
    seen: dict = field(default_factory=dict)  # chunk -> evaluations of it so far in the running step
    entering: dict = field(default_factory=dict)  # unit -> a DiT range's inputs in the running evaluation
    transformer_index: int = None
    evaluations: int = 0
    reused: dict = field(default_factory=dict)  # unit -> evaluations served from the cache
    missed: dict = field(default_factory=dict)  # unit -> reuse steps that ran in full (nothing kept for a chunk)
    differentiated: int = 0  # evaluations run in full because gradients flow through them
    seconds: dict = field(default_factory=lambda: {"full": [0.0, 0], "reuse": [0.0, 0]})


def _chunks(run, transformer_options, rows):
    """``[(chunk key, row slice)]`` of an evaluation's batch. ComfyUI stacks one chunk per conditioning; a chunk is
    known by its place among the sampler's conditionings (cond, uncond, an extra pass batched in), its
    conditioning's id and how many evaluations of it this step has seen, so a patch's second pass of the
    unconditional prediction (a weak or blurred one) keeps its own features apart from the sampler's."""
    cou = transformer_options.get("cond_or_uncond") or [0]
    uuids = transformer_options.get("uuids") or [None] * len(cou)
    size = rows // len(cou)
    out = []
    for i, (c, u) in enumerate(zip(cou, uuids)):
        seen = run.seen.get((c, str(u)), 0)
        run.seen[(c, str(u))] = seen + 1
        out.append(((c, str(u), seen), slice(i * size, (i + 1) * size)))
    return out


def _segments(sigmas):
    """A run's sigmas as descending runs: a cascade (FreCaS) hands the sampler every stage's schedule, each ending
    at 0, one after another; each stage gets the node's schedule for its own step count."""
    out, start = [], 0
    for i in range(1, len(sigmas)):
        if sigmas[i] > sigmas[i - 1]:
            out.append(sigmas[start:i])
            start = i
    return out + [sigmas[start:]]


def _signature(x, chunks):
    return (x.shape[0] // len(chunks),) + tuple(x.shape[1:]), x.dtype, x.device


def _install(model, key, units, plan_for, window, finish, enter):
    """The cache's RunScope and its APPLY_MODEL wrapper. ``enter(run, reusing, args, kwargs)`` -> (reusing, args,
    kwargs, leave) prepares an evaluation that reuses (``leave()`` runs after it)."""
    def make_run(*_):
        override = scope.trainfree_cache_override
        if override is not None:  # the schedule search runs its candidates through this patch
            return CacheRun(override[0], window, record=override[1])
        return CacheRun(plan_for, window)
    scope = RunScope(model, key, make_run, finish)
    scope.trainfree_cache_units, scope.trainfree_cache_override = tuple(units), None

    def apply_model(executor, x, t, *args, **kwargs):
        run = scope.state
        if run is None:
            return executor(x, t, *args, **kwargs)
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        reusing = _decide(run, units, options, x, t)
        leave = None
        if any(reusing.values()) and enter is not None:
            reusing, args, kwargs, leave = enter(run, reusing, args, kwargs)
        outer, run.reusing = run.reusing, reusing
        kind = "reuse" if any(reusing.values()) else "full"
        _sync(x)
        start = time.perf_counter()
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            run.reusing = outer
            if leave is not None:
                leave()
            _sync(x)
            run.seconds[kind][0] += time.perf_counter() - start
            run.seconds[kind][1] += 1
    model.add_wrapper_with_key(Wrappers.APPLY_MODEL, key, apply_model)
    return scope


def _sync(x):
    if x.device.type == "cuda":  # the measured saving needs the device's work, not just its queue
        torch.cuda.synchronize(x.device)


def _decide(run, units, options, x, t):
    """``{unit: reuse?}`` for this evaluation: the schedule says reuse, the step lies inside the window, and every
    chunk of the batch has a feature kept for its shape."""
    if run.segments is None:
        if "sample_sigmas" not in options:
            raise UnsupportedModel("the cache needs the run's sigmas (transformer_options 'sample_sigmas'), "
                                   "which this sampler does not provide; sample with KSampler or SamplerCustom")
        run.segments = _segments([float(s) for s in options["sample_sigmas"]])
        run.plans = [run.plan_for(len(segment) - 1) for segment in run.segments]
    run.evaluations += 1
    sigma = float(t.flatten()[0])
    following = run.segment + 1
    if following < len(run.segments) and math.isclose(sigma, run.segments[following][0], rel_tol=1e-6):
        run.segment = following  # a cascade's next stage starts
    step = (run.segment, step_of(run.segments[run.segment], sigma))
    if step != run.step:
        run.step, run.seen = step, {}
    plan = run.plans[run.segment]
    inside = run.window[1] <= sigma <= run.window[0]
    chunks = run.chunks = _chunks(run, options, x.shape[0])
    signature = run.signature = _signature(x, chunks)
    reusing = {}
    differentiating = torch.is_grad_enabled()  # null-text inversion's optimisation: the deep path must answer
    if differentiating:
        run.differentiated += 1
    for unit in units:
        wanted = inside and not plan[unit][step[1]] and not differentiating
        have = all(run.kept.get((unit, chunk), (None,))[0] == signature for chunk, _ in chunks)
        reusing[unit] = wanted and have
        if wanted:
            counter = run.reused if have else run.missed
            counter[unit] = counter.get(unit, 0) + 1
    return reusing


def cache_scope(model):
    """The one cache patch on ``model`` (its RunScope): the schedule search sets ``trainfree_cache_override`` =
    (plan_for, record list or None) on it for its own runs. A clear error when there is none, or more than one."""
    found = [scope for scope in model.model_options.get("transformer_options", {}).get("trainfree_runs", {}).values()
             if hasattr(scope, "trainfree_cache_units")]
    if len(found) != 1:
        raise UnsupportedModel("the schedule search needs a model with exactly one cache patch: connect it through "
                               "one DeepCache (SD1.5 / SDXL) or Block Cache (SD3 / Flux) node"
                               + ("" if not found else f" (this one has {len(found)})"))
    return found[0]


def report(run):
    """What a cache run did, in numbers: evaluations, reused and missed per unit, mean seconds of a full and of a
    reusing evaluation, and the speed-up those times give over running every evaluation in full."""
    (full_s, full_n), (reuse_s, reuse_n) = run.seconds["full"], run.seconds["reuse"]
    out = {"evaluations": run.evaluations,
           "steps": None if run.segments is None else sum(len(s) - 1 for s in run.segments),
           "reused": dict(run.reused), "missed": dict(run.missed), "full_for_gradients": run.differentiated,
           "full_evaluations": full_n,
           "reusing_evaluations": reuse_n}
    if full_n:
        full_mean = full_s / full_n
        out["seconds_full"] = full_mean
        if reuse_n:
            out["seconds_reusing"] = reuse_s / reuse_n
            out["measured_speedup"] = (full_n + reuse_n) * full_mean / (full_s + reuse_s)
    return out


# ---------------------------------------------------------------- UNets: DeepCache

_SKIPPING = weakref.WeakKeyDictionary()  # UNet -> the branch whose deep region the running evaluation skips


class _GatedBlock(TimestepEmbedSequential):
    """A UNet block that yields no layers while the running evaluation skips the deep region it lies in
    (ComfyUI's UNet iterates a block's layers itself). Its children are the block's own layers under their own
    names. Every block below the first is gated, whatever the branch: ComfyUI keeps one clone's object patches on
    shared weights, so the gates in place must serve any DeepCache clone that runs; they read which branch it
    skips from the UNet's entry in ``_SKIPPING``."""

    def __init__(self, block, net, kind, index):
        super().__init__(OrderedDict(block.named_children()))
        object.__setattr__(self, "trainfree_place", (weakref.ref(net), kind, index))

    def __iter__(self):
        net, kind, index = self.trainfree_place
        branch = _SKIPPING.get(net())
        return iter(()) if branch is not None and _skipped(net(), branch, kind, index) else super().__iter__()


def _skipped(net, branch, kind, index):
    depth = len(net.input_blocks) - 1
    return kind == "middle" or (kind == "input" and index > branch) or (kind == "output" and index < depth - branch)


def _gated_paths(net):
    depth = len(net.input_blocks) - 1
    return ([("input", i, f"input_blocks.{i}") for i in range(1, depth + 1)] + [("middle", 0, "middle_block")]
            + [("output", i, f"output_blocks.{i}") for i in range(depth)])


def _gates_in_place(net):
    return all(isinstance(net.get_submodule(path), _GatedBlock) for _, _, path in _gated_paths(net))


def unet_depth(model):
    """The deepest skip branch of a UNet (DeepCache's branch ids run 0..depth)."""
    net = model.model.diffusion_model
    if not isinstance(net, UNetModel) or model_family(model) not in UNET_FAMILIES:
        raise UnsupportedModel(f"DeepCache serves UNets (SD1.5, SD2.x, SDXL), not {type(net).__name__}; for SD3 "
                               f"and Flux use the Block Cache node")
    if len(net.output_blocks) != len(net.input_blocks) or net.middle_block is None:
        raise UnsupportedModel("DeepCache needs a UNet whose up path mirrors its down path (one output block per "
                               "input block, and a middle block); this one does not")
    return len(net.input_blocks) - 1


def install_deepcache(model, key, branch, plan_for, window, finish=None):
    """DeepCache on the clone ``model`` at skip ``branch``: reuse steps run input blocks 0..branch and output
    blocks depth-branch..depth only. Returns the RunScope (state: ``CacheRun``)."""
    depth = unet_depth(model)
    if not 0 <= branch <= depth:
        raise UnsupportedModel(f"branch {branch} does not exist: this UNet has branches 0 to {depth}; choose one "
                               f"of them")
    unit = f"branch {branch}"
    net = model.model.diffusion_model
    if any(isinstance(model.object_patches.get(_ROOT + path), _GatedBlock) for _, _, path in _gated_paths(net)):
        raise UnsupportedModel("DeepCache is already applied to this model upstream: keep one DeepCache node")
    for kind, index, path in _gated_paths(net):
        block = model.get_model_object(_ROOT + path)  # another clone's gate while its patches are on the weights
        model.add_object_patch(_ROOT + path, _GatedBlock(block, net, kind, index))

    def skipping():
        run = scope.state
        return run is not None and bool(run.reusing) and run.reusing.get(unit, False)

    def empty_deep_input(h, transformer_options):
        if transformer_options.get("block") == ("input", branch) and skipping():
            return h[:, :0]  # the gated blocks pass it through: nothing computed, nothing copied
        return h

    def cache_point(h, hsp, transformer_options):
        run = scope.state
        if run is None or transformer_options.get("block") != ("output", depth - branch):
            return h, hsp
        chunks = run.chunks
        if skipping():
            h = torch.cat([run.kept[(unit, chunk)][1] for chunk, _ in chunks])
            if run.transformer_index is not None:
                transformer_options["transformer_index"] = run.transformer_index
            return h, hsp
        for chunk, rows in chunks:
            run.kept[(unit, chunk)] = (run.signature, h[rows].detach().clone())  # a constant: no graph kept
        run.transformer_index = transformer_options.get("transformer_index")
        _record(run, chunks, h)
        return h, hsp

    def enter(run, reusing, args, kwargs):
        if not _gates_in_place(net):
            raise UnsupportedModel(SHARED_WEIGHTS.format(title="DeepCache"))
        outer = _SKIPPING.get(net)
        _SKIPPING[net] = branch

        def leave():
            if outer is None:
                _SKIPPING.pop(net, None)
            else:
                _SKIPPING[net] = outer
        return (reusing, *_without_deep_control(args, kwargs, branch, depth), leave)

    model.set_model_input_block_patch_after_skip(empty_deep_input)
    model.set_model_output_block_patch(cache_point)
    scope = _install(model, key, [unit], plan_for, window, finish, enter)
    return scope


def _record(run, chunks, feature):
    """For the schedule search: the cond chunk's kept feature at each full step."""
    if run.record is not None:
        for (cond_or_uncond, _, _), rows in chunks:
            if cond_or_uncond == 0:
                run.record.append((run.step[1], feature[rows].clone()))
                return


def _without_deep_control(args, kwargs, branch, depth):
    """ControlNet residuals of the skipped blocks would be added to the empty tensor: leave them out (their
    effect on the deep feature is in what the last full step kept)."""
    args = list(args)
    control = args[2] if len(args) > 2 else kwargs.get("control")
    if not control:
        return tuple(args), kwargs
    trimmed = dict(control)
    for name, skipped in (("input", range(branch + 1, depth + 1)), ("middle", range(1)),
                          ("output", range(depth - branch))):
        entries = control.get(name)
        if not entries:
            continue
        entries = list(entries)
        for i in skipped:  # ComfyUI pops each block's entry from the end
            if name == "middle":
                entries[-1] = None
            elif len(entries) == depth + 1:
                entries[len(entries) - 1 - i] = None
        trimmed[name] = entries
    if len(args) > 2:
        args[2] = trimmed
    else:
        kwargs = {**kwargs, "control": trimmed}
    return tuple(args), kwargs


# ---------------------------------------------------------------- DiTs: block cache

def dit_blocks(model):
    """``{kind: block count}`` of a DiT, kinds as the block cache names them: Flux 'double' and 'single', SD3
    'joint'."""
    net = model.model.diffusion_model
    family = model_family(model)
    if family == "flux":
        return {"double": len(net.double_blocks), "single": len(net.single_blocks)}
    if family == "sd3":
        return {"joint": len(net.joint_blocks)}
    if family in UNET_FAMILIES:
        raise UnsupportedModel("the block cache serves DiTs (SD3, Flux); for SD1.5 / SDXL use DeepCache")
    raise UnsupportedModel(f"the block cache serves SD3 and Flux, not {type(net).__name__}")


def unit_shares(model, units):
    """``{unit: share of a full evaluation's cost}`` for the schedule search's cost axis: a DeepCache branch counts
    as a whole evaluation (its cost is the share of full steps); a DiT range by its blocks' share of the
    parameters of all blocks (every block sees the same tokens, so parameters track compute)."""
    net = model.model.diffusion_model
    if model_family(model) not in DIT_FAMILIES:
        return {unit: 1.0 for unit in units}
    lists = {"double": getattr(net, "double_blocks", None), "single": getattr(net, "single_blocks", None),
             "joint": getattr(net, "joint_blocks", None)}
    size = lambda block: sum(p.numel() for p in block.parameters())
    total = sum(size(b) for blocks in lists.values() if blocks is not None for b in blocks)
    shares = {}
    for unit in units:
        kind, first, last = schedules.parse_unit(unit)
        blocks = lists[kind][first:last + 1]
        shares[unit] = sum(size(b) for b in blocks) / total
    return shares


def install_block_cache(model, key, units, plan_for, window, finish=None):
    """Block caching on the clone ``model``: each unit ``(name, kind, first, last)`` is a contiguous range of
    blocks of one kind, skipped on its reuse steps, where the residual it added on its last full step is added
    instead. Returns the RunScope (state: ``CacheRun``)."""
    if model_family(model) not in DIT_FAMILIES:
        dit_blocks(model)  # raises the refusal
    replace = model.model_options.setdefault("transformer_options", {}).setdefault("patches_replace", {}) \
        .setdefault("dit", {})
    scope = None
    for name, kind, first, last in units:
        target = "single_block" if kind == "single" else "double_block"
        for block in range(first, last + 1):
            where = "first" if block == first else None
            where = ("only" if where else "last") if block == last else where
            replace[(target, block)] = _range_link(replace.get((target, block)), lambda: scope, name, where)
    scope = _install(model, key, [u[0] for u in units], plan_for, window, finish, None)
    return scope


def _range_link(previous, scope_of, unit, where):
    """A block of a cached range: on full steps it runs (the first block notes the range's inputs, the last one
    keeps the residual per chunk); on reuse steps it is skipped (the last one adds the kept residual)."""
    def run_block(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def block_fn(args, extra):
        run = scope_of().state
        if run is None or run.reusing is None:
            return run_block(args, extra)
        streams = [s for s in ("img", "txt") if s in args]
        if run.reusing.get(unit, False):
            out = {s: args[s] for s in streams}
            if where in ("last", "only"):
                for s in streams:
                    kept = [run.kept[(unit, chunk)][1].get(s) for chunk, _ in run.chunks]
                    out[s] = None if kept[0] is None else out[s] + torch.cat(kept).to(out[s].dtype)
            return out
        if where in ("first", "only"):
            run.entering[unit] = {s: args[s].clone() for s in streams}  # blocks may add to them in place
        out = run_block(args, extra)
        if where in ("last", "only"):
            entering = run.entering.pop(unit)
            for chunk, rows in run.chunks:
                residual = {s: None if out.get(s) is None else (out[s][rows] - entering[s][rows]).detach().clone()
                            for s in streams}
                run.kept[(unit, chunk)] = (run.signature, residual)
            _record(run, run.chunks, out["img"] - entering["img"])
        return out
    return block_fn
