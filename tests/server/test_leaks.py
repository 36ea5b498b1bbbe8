"""Nothing the pack holds grows over many runs that change resolution, batch size and the stack of patches.

A server of its own, with ComfyUI's default cache (loaded models are kept between prompts, as users run it), runs
18 prompts cycling through four shapes and four patch stacks, each followed by inversion, null-text inversion and a
prompt-to-prompt edit of the sampled image. After every run a test-only probe node inside the
server process (``harness/leak_probe.py``) reports what the pack could leak. Runs 10 and 18 have the same shape
and stack, so everything they report must match: the pack's run scopes hold no state, no tensor is reachable
from the pack's objects, the wrappers / callbacks / options of every live model and the live tensors are the same;
and no gc-tracked type gains objects at every one of runs 6, 10, 14 and 18 (not run 2: the first cycle still fills
ComfyUI's and torch's own caches). Resident memory is printed and kept in ``server_memory.json`` as a figure, not a verdict
(a CPU allocator's resident size is too noisy for a pass / fail threshold).
"""
import json
import os

import pytest

from harness.server import ComfyServer, error_message
from tests.server.stack import CHAIN_IMAGE_SLOTS, CHAIN_IMAGES, patch_nodes, stack_prompt

RUNS, FIRST, LAST = 18, 10, 18  # runs FIRST and LAST (1-based) use the same shape and stack
# gc type counts are compared at every run of that phase (6, 10, 14, 18): a leak adds objects every cycle, while
# the server's own transient objects (a pending timer, a request's dict) come and go.
PHASE_RUNS = (6, 10, 14, 18)
# The HTTP layer's own bounded caches (yarl keeps recently parsed URLs): the server's, not the model stack's.
WEB_SERVER_TYPES = ("yarl.", "aiohttp.", "multidict.")
SHAPES = [(128, 128, 1), (64, 96, 2), (192, 128, 1), (96, 64, 3)]


@pytest.fixture(scope="module")
def cached_server():
    with ComfyServer() as running:
        yield running


def _stacks(object_info):
    return [patch_nodes(object_info), ("TrainFreePAG", "TrainFreeAPG"),
            ("TrainFreeFDG", "TrainFreeGuidanceInterval"),
            ("TrainFreeResidualCFG", "TrainFreeTwoModelGuidance", "TrainFreeNoiseDampedCFG")]


def _probed(prompt):
    """The probe runs last: it takes the images of every chain (ImageBatch joins them), so it waits for them all."""
    images = [[key, CHAIN_IMAGE_SLOTS.get(key, 0)] for key in ("94",) + CHAIN_IMAGES if key in prompt]
    joined = images[0]
    for i, image in enumerate(images[1:]):
        prompt[f"96{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": joined, "image2": image}}
        joined = [f"96{i}", 0]
    prompt["99"] = {"class_type": "HarnessLeakProbe", "inputs": {"images": joined}}
    return prompt


def _grown(*samples):
    """Types whose count rises from each sample to the next: ``{type: (count, ...)}``."""
    names = set().union(*samples)
    counts = {name: tuple(s.get(name, 0) for s in samples) for name in names if not name.startswith(WEB_SERVER_TYPES)}
    return {name: c for name, c in counts.items() if all(a < b for a, b in zip(c, c[1:]))}


def test_nothing_the_pack_holds_grows_over_runs(cached_server, object_info, artifacts):
    stacks = _stacks(object_info)
    assert len(stacks) == len(SHAPES) and (LAST - FIRST) % len(SHAPES) == 0
    reports = []
    for i in range(RUNS):
        width, height, batch = SHAPES[i % len(SHAPES)]
        cached_server.request("POST", "/history", {"clear": True})  # the server's own per-prompt bookkeeping
        entry = cached_server.run(_probed(stack_prompt(object_info, patches=stacks[i % len(stacks)], width=width,
                                                       height=height, batch=batch, steps=3, seed=i,
                                                       inversion=True)))
        assert entry["status"]["status_str"] == "success", error_message(entry)
        report = entry["outputs"]["99"]["trainfree_probe"][0]
        reports.append(report)
        assert report["scopes_holding_state"] == 0, f"run {i + 1}: a run scope still holds its run's state"
        assert not report["tensors_held_by_pack"], f"run {i + 1}: the pack's objects hold tensors"
    first, last = reports[FIRST - 1], reports[LAST - 1]
    figures = {"rss_mib_after_each_run": [r["rss_mib"] for r in reports],
               "live_tensors": [r["live_tensors"] for r in reports],
               "live_tensor_mib": [r["live_tensor_mib"] for r in reports],
               "run_scopes": [r["run_scopes"] for r in reports],
               "models_alive": [len(r["model_hooks"]) for r in reports],
               "gc_objects": [sum(r["gc_types"].values()) for r in reports],
               "gc_types_grown_every_cycle": _grown(*(reports[r - 1]["gc_types"] for r in PHASE_RUNS))}
    with open(os.path.join(artifacts, "server_memory.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print("resident memory after each run (MiB):", " ".join(f"{r:.0f}" for r in figures["rss_mib_after_each_run"]))
    assert last["run_scopes"] == first["run_scopes"], "run scopes pile up"
    assert last["model_hooks"] == first["model_hooks"], "the live models' wrappers, callbacks or options grew"
    assert (last["live_tensors"], last["live_tensor_mib"]) == (first["live_tensors"], first["live_tensor_mib"]), \
        "live tensors grew"
    assert not figures["gc_types_grown_every_cycle"], figures["gc_types_grown_every_cycle"]
