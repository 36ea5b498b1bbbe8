"""bench/cache_speed.py's arithmetic on a hand-made raw result (no ComfyUI, no timing): full evaluations take
1 s, reusing ones 0.25 s, so f = 0.25 and every expected figure below is worked out by hand."""
import json

import pytest

from bench import cache_speed

STEPS = 20
FULL, REUSING = 1.0, 0.25


def evaluations(interval):
    return [[FULL if interval is None or step % interval == 0 else REUSING] * 2 for step in range(STEPS)]


def family():
    runs = {"none": evaluations(None), "N=3": evaluations(3), "N=5": evaluations(5)}
    per_step = {name: [sum(e[0] for e in run) / STEPS] for name, run in runs.items()}
    return {"cfg": 5.0, "seconds_per_step": per_step, "cpu_seconds_per_step": per_step,
            "evaluations": {name: [run] for name, run in runs.items()},
            "node_reports": {name: [{"seconds_full": FULL, "seconds_reusing": REUSING}] for name in ("N=3", "N=5")}}


def saved(tmp_path):
    path = tmp_path / "cache_speed.json"
    path.write_text(json.dumps({"command": "python -m bench.cache_speed --steps 20", "args": {"steps": STEPS},
                                "families": {"sd15": family()}}))
    return path


def test_reprint_measures_f_and_compares_with_the_limit(tmp_path, capsys):
    table = cache_speed.reprint(saved(tmp_path))["sd15"]
    assert table["f"] == {"wall": pytest.approx(0.25), "cpu": pytest.approx(0.25)}
    n3, n5 = table["configurations"]["N=3"]["cpu"], table["configurations"]["N=5"]["cpu"]
    # N=3: 7 full + 13 reusing steps = 10.25 s against 20 s; limit 3 / (1 + 2 * 0.25) = 2
    assert n3["speedup"] == pytest.approx(20 / 10.25)
    assert n3["limit"] == pytest.approx(2.0)
    assert n3["schedule_expectation"] == pytest.approx(20 / 10.25)
    # N=5: 4 full + 16 reusing = 8 s; limit 5 / (1 + 4 * 0.25) = 2.5, which 20 steps meet exactly
    assert n5["speedup"] == pytest.approx(2.5) and n5["limit"] == pytest.approx(2.5)
    assert table["configurations"]["N=5"]["node_f_wall"] == pytest.approx(0.25)
    out = capsys.readouterr().out
    assert "sd15 N=3: 1.95x of 2.00x = 98%: met" in out
    assert "sd15 N=5: 2.50x of 2.50x = 100%: met" in out


def test_a_slow_run_misses_the_target(tmp_path, capsys):
    path = saved(tmp_path)
    result = json.loads(path.read_text())
    result["families"]["sd15"]["cpu_seconds_per_step"]["N=5"] = [0.6]  # 12 s for a run the limit puts at 8 s
    path.write_text(json.dumps(result))
    cache_speed.reprint(path)
    assert "sd15 N=5: 1.67x of 2.50x = 67%: NOT met" in capsys.readouterr().out


def test_a_run_with_more_evaluations_than_steps_is_refused(tmp_path):
    path = saved(tmp_path)
    result = json.loads(path.read_text())
    result["families"]["sd15"]["evaluations"]["N=3"][0].append([FULL, FULL])
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="21 model evaluations in a 20-step run"):
        cache_speed.reprint(path)
