"""Feature caching across sampling steps as MODEL -> MODEL patches: DeepCache for UNets, block caching for DiTs,
and a loader for the cache schedules both share (files written by the schedule search, or by hand)."""
import logging
import math

from ..guidance_ops import cache_schedule as schedules
from . import host
from .base import ModelPatchNode, model_input

log = logging.getLogger("trainfree")

SCHEDULE_TYPE = "TRAINFREE_CACHE_SCHEDULE"
UNIFORM, NON_UNIFORM, FROM_INPUT = "uniform", "non-uniform", "from schedule input"
MODES = [UNIFORM, NON_UNIFORM, FROM_INPUT]
LAST = -1


def _common_inputs(interval_default, interval_tip):
    return {
        "cache_interval": ("INT", {"default": interval_default, "min": 1, "max": 100, "tooltip": interval_tip}),
        "schedule": (MODES, {"default": UNIFORM, "tooltip":
                             "uniform: a full step every cache_interval steps (step i is full when i % N == 0). "
                             "non-uniform: as many full steps, denser around step 15 (DeepCache's 1:N non-uniform "
                             "schedule, power 1.4). from schedule input: the connected schedule (a searched or "
                             "hand-written one) decides every step; cache_interval is then not used."}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                    "Reuse only from this point of the schedule on (0 = the start); earlier steps "
                                    "all run in full."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                  "Reuse only up to this point of the schedule (1 = the end); later steps all run "
                                  "in full."}),
    }


_SCHEDULE_INPUT = {"cache_schedule": (SCHEDULE_TYPE, {"tooltip":
                                                     "A cache schedule (from Load Cache Schedule or the schedule "
                                                     "search). Used when 'schedule' is 'from schedule input'."})}


def plan_maker(units, mode, interval, schedule):
    """``plan_for(steps) -> {unit: [compute?]}`` for the node's settings, checked when the run's step count is
    known; errors name the fix."""
    if mode == FROM_INPUT and schedule is None:
        raise ValueError("'schedule' is 'from schedule input' but no cache_schedule is connected: connect one (Load "
                         "Cache Schedule, or the schedule search) or choose uniform / non-uniform")
    if mode != FROM_INPUT and schedule is not None:
        raise ValueError(f"a cache_schedule is connected but 'schedule' is '{mode}', which would ignore it: set "
                         f"'schedule' to '{FROM_INPUT}' or disconnect the schedule")
    if schedule is not None:
        schedules.check_units(schedule, units)

    def plan_for(steps):
        if schedule is not None:
            schedules.check_fits(schedule, steps, units)
            return {unit: list(schedule.compute[unit]) for unit in units}
        pattern = (schedules.uniform if mode == UNIFORM else schedules.non_uniform)(steps, interval)
        return {unit: list(pattern) for unit in units}
    return plan_for


def window(model, start_percent, end_percent):
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): swap them")
    start = math.inf if start_percent == 0 else host.percent_to_sigma(model, start_percent)
    return start, host.percent_to_sigma(model, end_percent)


def finish_logger(title):
    def finish(run):
        report = host.cache_report(run)
        speed = report.get("measured_speedup")
        log.info("TrainFree %s: %d of %d model evaluations reused cached features (%s)%s%s", title,
                 report["reusing_evaluations"], report["evaluations"],
                 ", ".join(f"{unit}: {n}" for unit, n in report["reused"].items()) or "none",
                 "" if not report["missed"] else f"; {sum(report['missed'].values())} ran in full for want of a "
                                                 f"cached feature of their shape",
                 "" if speed is None else f"; measured speed-up {speed:.2f}x")
        return report
    return finish


class TrainFreeDeepCache(ModelPatchNode):
    CATEGORY = "trainfree/caching"
    DESCRIPTION = ("DeepCache (Ma, Fang, Wang, CVPR 2024): on full steps the whole UNet runs and the deep feature "
                   "entering the chosen skip branch's up-block is kept; on the steps between, only the shallow "
                   "branch runs (the first input blocks and the last output blocks) and reuses it. Cond, uncond "
                   "and extra passes (PAG's perturbed one) each keep their own feature. Logs the evaluations "
                   "reused and the measured speed-up. SD1.5 / SD2.x / SDXL; for SD3 / Flux use Block Cache.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input("An SD1.5, SD2.x or SDXL UNet."),
            **_common_inputs(3, "N: one full step, then N-1 steps that reuse the deep feature (uniform 1:N). The "
                                "paper's SD1.5 demo: 5 with the non-uniform schedule; SDXL: 3 (the package's "
                                "default). 1 = every step in full."),
            "cache_branch": ("INT", {"default": 0, "min": 0, "max": 20, "tooltip":
                                     "Skip branch b (DeepCache's cache_branch_id): reuse steps run input blocks "
                                     "0..b and output blocks L-b..L. 0 = the shallowest, cheapest branch (the "
                                     "package's default); larger = more of the UNet recomputed, closer to the "
                                     "uncached result. SD1.5 has branches 0-11, SDXL 0-8."}),
        }, "optional": dict(_SCHEDULE_INPUT)}

    def patch(self, model, cache_interval, schedule, start_percent, end_percent, cache_branch, cache_schedule=None):
        m = model.clone()
        depth = host.unet_depth(m)
        if cache_branch > depth:
            raise ValueError(f"cache_branch {cache_branch} does not exist: this UNet has branches 0 to {depth}; "
                             f"choose one of them")
        units = [f"branch {cache_branch}"]
        plan_for = plan_maker(units, schedule, cache_interval, cache_schedule)
        host.install_deepcache(m, host.new_key("deepcache"), cache_branch, plan_for,
                               window(m, start_percent, end_percent), finish=finish_logger("DeepCache"))
        return (m,)


def block_units(blocks, first, last):
    """The DiT's blocks ``first``..``last`` (one count over all blocks, Flux's double blocks then its single
    ones; -1 = the last block) as the block cache's units: one range per kind of block."""
    total = sum(blocks.values())
    last = total - 1 if last == LAST else last
    if not 0 <= first <= last < total:
        raise ValueError(f"blocks {first} to {last} do not fit this model's {total} blocks ("
                         + ", ".join(f"{n} {kind}" for kind, n in blocks.items())
                         + f"): choose first_block <= last_block below {total} (last_block -1 = the last)")
    units, offset = [], 0
    for kind, count in blocks.items():
        lo, hi = max(first, offset), min(last, offset + count - 1)
        if lo <= hi:
            units.append((f"{kind} {lo - offset}-{hi - offset}", kind, lo - offset, hi - offset))
        offset += count
    return units


class TrainFreeBlockCache(ModelPatchNode):
    CATEGORY = "trainfree/caching"
    DESCRIPTION = ("Block caching for DiTs (SD3, Flux): on full steps every block runs and the residual a range of "
                   "blocks adds to the image (and text) stream is kept; on the steps between, the range is skipped "
                   "and its residual added. Per-chunk (cond, uncond, PAG's perturbed pass). Logs the evaluations "
                   "reused and the measured speed-up. For SD1.5 / SDXL use DeepCache.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input("An SD3 or Flux model."),
            **_common_inputs(3, "N: one full step, then N-1 steps that skip the block range (uniform 1:N). 1 = "
                                "every step in full."),
            "first_block": ("INT", {"default": 1, "min": 0, "max": 200, "tooltip":
                                    "First block of the skipped range, counting all blocks in order (Flux: double "
                                    "blocks, then single blocks; SD3: joint blocks). 1 keeps the first block "
                                    "computed on every step."}),
            "last_block": ("INT", {"default": LAST, "min": LAST, "max": 200, "tooltip":
                                   "Last block of the skipped range (same count); -1 = the model's last block."}),
        }, "optional": dict(_SCHEDULE_INPUT)}

    def patch(self, model, cache_interval, schedule, start_percent, end_percent, first_block, last_block,
              cache_schedule=None):
        m = model.clone()
        units = block_units(host.dit_blocks(m), first_block, last_block)
        plan_for = plan_maker([u[0] for u in units], schedule, cache_interval, cache_schedule)
        host.install_block_cache(m, host.new_key("blockcache"), units, plan_for,
                                 window(m, start_percent, end_percent), finish=finish_logger("Block Cache"))
        return (m,)


class TrainFreeLoadCacheSchedule:
    CATEGORY = "trainfree/caching"
    DESCRIPTION = ("Loads a cache schedule (JSON: per cached unit, one letter per sampling step, C = compute, R = "
                   "reuse) saved by the schedule search or written by hand, from ComfyUI's output or input folder "
                   f"({host.SCHEDULE_SUBFOLDER}/) or the pack's presets.")
    RETURN_TYPES = (SCHEDULE_TYPE, "STRING")
    RETURN_NAMES = ("cache_schedule", "summary")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"schedule_file": (host.saved_schedules() or ["(none saved yet)"], {"tooltip":
                              "A schedule file. Files the search saves appear here after a refresh."})}}

    @classmethod
    def IS_CHANGED(cls, schedule_file):
        return host.schedule_file_stamp(schedule_file)

    def load(self, schedule_file):
        schedule = host.load_schedule(schedule_file)
        return schedule, schedules.describe(schedule)


NODE_CLASS_MAPPINGS = {"TrainFreeDeepCache": TrainFreeDeepCache, "TrainFreeBlockCache": TrainFreeBlockCache,
                       "TrainFreeLoadCacheSchedule": TrainFreeLoadCacheSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeDeepCache": "DeepCache (TrainFree)",
                              "TrainFreeBlockCache": "Block Cache for DiTs (TrainFree)",
                              "TrainFreeLoadCacheSchedule": "Load Cache Schedule (TrainFree)"}
