"""Cache schedules: which sampling steps recompute which cached units (issue #13).

Shared by the DeepCache node (UNets; Ma, Fang, Wang, CVPR 2024, arXiv 2312.00858) and the DiT block cache node.
A *unit* is a named part of the model whose output can be reused from the last step that computed it:

    "branch B"                      DeepCache: the deep UNet path below skip branch B (B >= 0)
    "double A-B", "single A-B",     DiT blocks A..B inclusive, by kind (e.g. Flux double / single stream,
    "joint A-B"                     SD3 joint blocks); "double A" is "double A-A"

A schedule holds, per unit, one boolean per sampling step: True = compute (full) step, False = reuse the cache.
The first step of every unit computes: nothing is cached yet.

JSON format (the shared, user-editable file format; ``dump_schedule`` writes it, ``load_schedule`` reads it):

    {"format": "trainfree-cache-schedule", "version": 1, "steps": 20,
     "compute": {"branch 0": "CRRCRRCRRCRRCRRCRRCR"},
     "meta": {"source": "ecad", "drift_psnr": 31.2, "cost": 0.45}}

``compute`` maps each unit name to one character per sampling step, ``C`` = compute, ``R`` = reuse.
``meta`` is free information (where the schedule came from, its measured cost and drift); it is never interpreted.

The schedule searches (CacheQuant's dynamic programming, ECAD-style evolution) live in ``cache_search.py``.
"""
import json
import math
import re
from dataclasses import dataclass, field

FORMAT = "trainfree-cache-schedule"
VERSION = 1
UNIT_FORMS = ('"branch B", "double A-B", "single A-B", "joint A-B" (or "double A" for one block), A <= B, '
              'e.g. "single 0-37"')
_UNIT = re.compile(r"^(branch|double|single|joint) (\d+)(?:-(\d+))?$")


class ScheduleError(ValueError):
    """A cache schedule or a schedule setting that cannot be used; the message names the fix."""


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ScheduleError(f"steps must be a positive whole number, got {steps!r}")


def _check_interval(interval):
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ScheduleError(f"the cache interval must be a whole number >= 1 (1 = always compute), got {interval!r}")


def uniform(steps, interval):
    """DeepCache's uniform 1:N schedule: compute at every ``interval``-th step (``i % interval == 0``)."""
    _check_steps(steps)
    _check_interval(interval)
    return [i % interval == 0 for i in range(steps)]


def _quad_center_indices(steps, count, center, power):
    """One try of DeepCache's ``sample_from_quad_center``: ``count + 1`` points evenly spaced from
    (-center)^(1/p) to (steps - center)^(1/p), raised to p, real part truncated toward zero; the smallest and
    largest values are dropped, the rest shifted by center, and step 0 is added. (-center)^(1/p) is complex, as in
    the official numpy code (its real part is kept); the two end points are taken as exactly -center and
    steps - center, which they are before rounding."""
    start = complex(-center) ** (1.0 / power)
    delta = ((steps - center) ** (1.0 / power) - start) / count
    values = {-center, steps - center}
    values.update(int(((start + k * delta) ** power).real) for k in range(1, count))
    return [0] + [v + center for v in sorted(values)[1:-1]]


def non_uniform(steps, interval, center=15, power=1.4):
    """DeepCache's non-uniform 1:N schedule: K = ceil(steps / interval) compute steps, denser around ``center``.

    The power starts at ``power`` and shrinks by 0.02 until the points give exactly K distinct steps in range.
    Variant: the official code's complex power (``(-center) ** (1/p)`` in numpy, real part kept), with the end
    points exact. For steps=50, interval=5, center=15, power=1.4 this gives the official compute steps
    [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]; it agrees with the official code wherever numpy's rounding of the first
    point does not flip an integer (checked for center 15 and steps 4..150, intervals 2..10).
    ``center`` past the last step is clamped to ``steps - 1`` (the official code would leave the range).
    """
    _check_steps(steps)
    _check_interval(interval)
    if isinstance(center, bool) or not isinstance(center, int) or center < 0:
        raise ScheduleError(f"the non-uniform center must be a step index >= 0, got {center!r}")
    if not power > 1:
        raise ScheduleError(f"the non-uniform power must be > 1 (DeepCache uses 1.4), got {power!r}")
    if interval == 1:
        return [True] * steps
    count = math.ceil(steps / interval)
    center = min(center, steps - 1)
    p = float(power)
    while p > 1:
        chosen = _quad_center_indices(steps, count, center, p)
        if len(set(chosen)) == count and all(0 <= i < steps for i in chosen):
            return [i in chosen for i in range(steps)]
        p -= 0.02
    raise ScheduleError(
        f"no non-uniform schedule with {count} compute steps out of {steps} around step {center}: "
        f"raise the power, move the center, change the interval, or use the uniform schedule")


def parse_unit(name):
    """``"branch B"`` -> ("branch", B, B); ``"double A-B"`` / ``"single A-B"`` / ``"joint A-B"`` -> (kind, A, B)."""
    match = _UNIT.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ScheduleError(f"unknown cache unit {name!r}: write one of {UNIT_FORMS}")
    kind, first, last = match.group(1), int(match.group(2)), match.group(3)
    last = first if last is None else int(last)
    if kind == "branch" and match.group(3) is not None:
        raise ScheduleError(f"unknown cache unit {name!r}: a DeepCache unit is one branch, \"branch B\"")
    if first > last:
        raise ScheduleError(f"cache unit {name!r} runs backwards: write the smaller block first, "
                            f"\"{kind} {last}-{first}\"")
    return kind, first, last


@dataclass(frozen=True)
class Schedule:
    """Per unit, one bool per sampling step (True = compute). Build with ``from_pattern`` or ``from_json``."""
    steps: int
    compute: dict
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_pattern(cls, units, pattern, meta=None):
        """The same compute pattern for every unit (e.g. ``uniform(20, 3)`` for ["branch 0"])."""
        return cls.from_json({"format": FORMAT, "version": VERSION, "steps": len(pattern),
                              "compute": {u: _pattern_text(pattern) for u in units}, "meta": dict(meta or {})})

    @property
    def units(self):
        return tuple(self.compute)

    def computes(self, unit, step):
        """Whether ``unit`` recomputes at sampling step ``step`` (0-based)."""
        return self.compute[unit][step]

    def to_json(self):
        return {"format": FORMAT, "version": VERSION, "steps": self.steps,
                "compute": {u: _pattern_text(p) for u, p in self.compute.items()}, "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, data):
        """Check a schedule's JSON object (see the module docstring) and build it; ScheduleError names the fix."""
        if not isinstance(data, dict):
            raise ScheduleError(f"a cache schedule is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ScheduleError(f'not a cache schedule: "format" must be "{FORMAT}", got {data.get("format")!r}')
        if data.get("version") != VERSION:
            raise ScheduleError(f"unknown cache schedule version {data.get('version')!r}: "
                                f"this pack reads version {VERSION}")
        steps = data.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ScheduleError(f'"steps" must be a positive whole number (the sampler\'s step count), got {steps!r}')
        compute = data.get("compute")
        if not isinstance(compute, dict) or not compute:
            raise ScheduleError('"compute" must map at least one unit name to a pattern such as "CRRCRR..."')
        patterns = {}
        for unit, text in compute.items():
            parse_unit(unit)
            if not isinstance(text, str) or set(text) - {"C", "R"}:
                raise ScheduleError(f"unit {unit!r}: a pattern has only the letters C (compute) and R (reuse), "
                                    f"got {text!r}")
            if len(text) != steps:
                raise ScheduleError(f"unit {unit!r}: the pattern has {len(text)} letters but the schedule has "
                                    f"{steps} steps: write one letter per step")
            if text[0] != "C":
                raise ScheduleError(f"unit {unit!r}: the first step must be C (compute): nothing is cached yet")
            patterns[unit] = tuple(c == "C" for c in text)
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ScheduleError(f'"meta" must be a JSON object, got {type(meta).__name__}')
        return cls(steps, patterns, dict(meta))


def _pattern_text(pattern):
    return "".join("C" if c else "R" for c in pattern)


def load_schedule(text):
    """A ``Schedule`` from JSON text."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ScheduleError(f"the cache schedule is not valid JSON: {error.msg} at line {error.lineno}, "
                            f"column {error.colno}") from None
    return Schedule.from_json(data)


def dump_schedule(schedule):
    """Pretty, stable JSON text of ``schedule`` (one unit per line)."""
    return json.dumps(schedule.to_json(), indent=2, sort_keys=False) + "\n"


def check_fits(schedule, steps, units):
    """ScheduleError unless ``schedule`` is for ``steps`` sampling steps and uses only the ``units`` offered."""
    if schedule.steps != steps:
        raise ScheduleError(f"the schedule has {schedule.steps} steps but the sampler runs {steps}: set steps to "
                            f"{schedule.steps} or make the schedule for {steps} steps")
    unknown = [u for u in schedule.units if u not in units]
    if unknown:
        raise ScheduleError(f"the schedule names {', '.join(map(repr, unknown))}, which this model does not offer; "
                            f"the units here are: {', '.join(units)}")


def relative_cost(schedule, shares):
    """Mean over steps of the fraction of a full pass that runs; ``shares[unit]`` is the fraction of a full pass
    that unit's blocks cost (skipped on its reuse steps). 1.0 = no saving."""
    missing = [u for u in schedule.units if u not in shares]
    if missing:
        raise ScheduleError(f"no cost share for {', '.join(missing)}")
    skipped = sum(shares[u] * (schedule.steps - sum(p)) for u, p in schedule.compute.items())
    return 1.0 - skipped / schedule.steps


def analytic_speedup(interval, shallow_share):
    """DeepCache's speed-up limit for a uniform 1:N schedule, N / (1 + (N - 1) f), where f is the fraction of a
    full pass that a reuse step still runs."""
    _check_interval(interval)
    if not 0 < shallow_share <= 1:
        raise ScheduleError(f"the shallow share must be in (0, 1], got {shallow_share!r}")
    return interval / (1 + (interval - 1) * shallow_share)


def check_units(schedule, units):
    """ScheduleError unless ``schedule`` caches exactly ``units`` (what the cache node was set to cache)."""
    if set(schedule.units) != set(units):
        raise ScheduleError(f"the schedule is for {', '.join(schedule.units)} but the cache node caches "
                            f"{', '.join(units)}: set the node's branch / block range to the schedule's, or use a "
                            f"schedule made for this setting")


def describe(schedule):
    """One line per unit: its pattern and how many of its steps compute."""
    lines = [f"{schedule.steps} steps" + (f" ({schedule.meta['source']})" if "source" in schedule.meta else "")]
    for unit, pattern in schedule.compute.items():
        lines.append(f"{unit}: {_pattern_text(pattern)}  ({sum(pattern)} of {schedule.steps} steps computed)")
    return "\n".join(lines)
