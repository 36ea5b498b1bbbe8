"""Every example workflow runs through ComfyUI's real execution engine on tiny models of its own family (the server
tests run each on the reference model)."""
import json
import os

import pytest

from harness import run_workflows
from harness.workflow_api import WorkflowError, ui_to_api

PATHS = run_workflows.workflow_paths()


@pytest.fixture(scope="module")
def engine():
    run_workflows.boot()


def test_there_is_a_workflow_for_every_node_and_family_the_issues_name(engine):
    import nodes
    names = {os.path.basename(p) for p in PATHS}
    assert {"pag_sd15.json", "pag_sdxl.json", "pag_flux.json"} <= names
    used = {n["type"] for p in PATHS for n in json.load(open(p))["nodes"]}
    ours = {k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("TrainFree")}
    assert ours and ours <= used, f"nodes without an example workflow: {ours - used}"


def test_conversion_follows_widget_order_and_the_seed_control_entry(engine):
    prompt = ui_to_api(json.load(open(os.path.join(run_workflows.WORKFLOWS, "pag_sd15.json"))),
                       run_workflows.node_definitions())
    by_type = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert by_type["KSampler"]["seed"] == 42 and by_type["KSampler"]["steps"] == 25
    assert by_type["KSampler"]["sampler_name"] == "euler" and by_type["KSampler"]["denoise"] == 1.0
    assert by_type["TrainFreePAG"] == {"model": ["1", 0], "scale": 3.0, "layers": "auto", "start_percent": 0.0,
                                       "end_percent": 1.0, "adaptive_scale": 0.0, "rescale": 0.0}


def test_unknown_node_types_are_named(engine):
    workflow = {"nodes": [{"id": 1, "type": "NoSuchNode", "inputs": [], "widgets_values": []}], "links": []}
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(workflow, run_workflows.node_definitions())


@pytest.mark.parametrize("path", PATHS, ids=os.path.basename)
def test_workflow_runs_and_writes_an_image(engine, path, tmp_path):
    images, _ = run_workflows.run(path, str(tmp_path), on="tiny")
    assert images and all(os.path.getsize(tmp_path / name) > 0 for name in images)
