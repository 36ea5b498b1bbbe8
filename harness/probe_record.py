"""Which branch of each feature probe this test run took, for the cross-host check.

The host adapter's probes (``nodes.host.probes()``) are read at the end of the session; tests that meet a
difference of their own (the frontend's DOM) record it with ``record``. Both land in ``probes.json`` in the
run's artefact folder, and ``python -m harness.probe_record A/probes.json B/probes.json`` prints a table and fails
unless every 'branch' probe takes both values across the hosts and every 'requirement' holds on all of them.
"""
import json
import os
import sys

RECORDED = {}


def record(name, value, kind="branch"):
    RECORDED[name] = [value, kind]


def write(folder):
    from harness import comfy_host
    found = dict(RECORDED)
    try:
        found.update({k: list(v) for k, v in comfy_host.pack_module("nodes.host").probes().items()})
    except KeyError:
        pass  # the pack was not loaded in this process (only server tests ran)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "probes.json"), "w") as f:
        json.dump({"host": comfy_host.host_label(), "probes": found}, f, indent=1)


def check(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    names = sorted({name for run in runs for name in run["probes"]})
    hosts = [run["host"].split(" ")[0] for run in runs]
    print("feature probe".ljust(36) + "".join(h.ljust(18) for h in hosts) + "kind")
    failures = []
    for name in names:
        values = [run["probes"].get(name, [None, None])[0] for run in runs]
        kind = next(run["probes"][name][1] for run in runs if name in run["probes"])
        print(name.ljust(36) + "".join(str(v).ljust(18) for v in values) + kind)
        if kind == "branch" and len(runs) > 1 and len({json.dumps(v) for v in values if v is not None}) < 2:
            failures.append(f"{name}: every host takes the same branch ({values[0]}); the other is untested")
        if kind == "requirement" and not all(values):
            failures.append(f"{name}: missing on a host")
    for failure in failures:
        print("probe check:", failure)
    return not failures


if __name__ == "__main__":
    sys.exit(0 if check(sys.argv[1:]) else 1)
