"""The pack inside ComfyUI's real server: what /object_info tells the frontend, a clean start-up log, and every
example workflow queued through /prompt on the reference model, its images fetched through /history and /view."""
import glob
import os
import re

import pytest

from harness import run_workflows
from harness.server import error_message
from tests.server.conftest import pixels, reference_prompt

WORKFLOWS = sorted(glob.glob(os.path.join(run_workflows.WORKFLOWS, "*.json")))


def test_object_info_lists_every_pack_node_with_display_name_category_and_tooltips(object_info, pack_nodes):
    expected = {"TrainFreeReferenceModel", "TrainFreePAG", "TrainFreeAPG", "TrainFreeFDG", "TrainFreeGuidanceInterval",
                "TrainFreeNoiseDampedCFG", "TrainFreeResidualCFG", "TrainFreeTwoModelGuidance"}
    assert expected <= set(pack_nodes)
    for name in pack_nodes:
        info = object_info[name]
        assert info["display_name"] and info["display_name"] != name and "TrainFree" in info["display_name"], name
        assert info["category"].startswith("trainfree/"), (name, info["category"])
        assert info["description"], name
        assert info["python_module"].startswith("custom_nodes."), (name, info["python_module"])
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_start_up_log_has_no_warning_or_error_from_the_pack(server):
    log = server.log()
    assert "comfyui-trainfree" in log, "the pack's import time line is missing: it was not loaded"
    assert not re.search(r"IMPORT FAILED.*trainfree|Cannot import .*trainfree", log), log[-3000:]
    start_up = log.split("Starting server")[0]
    ours = [line for line in start_up.splitlines()
            if re.search(r"trainfree", line, re.I) and re.search(r"warn|error|traceback|deprecat", line, re.I)]
    assert not ours, ours


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_queued_through_the_api_completes_with_images(server, definitions, artifacts, path):
    entry = server.run(reference_prompt(path, definitions))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    images = server.images(entry)
    assert images, f"{os.path.basename(path)} saved no image"
    for i, png in enumerate(images):
        picture = pixels(png)
        assert picture.shape == (128, 128, 3)
        assert picture.std() > 5, "a flat image: the model produced nothing"
        name = f"api_{os.path.splitext(os.path.basename(path))[0]}_{i}.png"
        with open(os.path.join(artifacts, name), "wb") as f:
            f.write(png)


def test_the_template_browser_lists_every_example_workflow(server):
    """ComfyUI serves a pack's workflows/ folder to the frontend's template browser (README's claim)."""
    listed = server.get("/workflow_templates").get("comfyui-trainfree", [])
    assert sorted(listed) == sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)
    status, body = server.request("GET", "/api/workflow_templates/comfyui-trainfree/pag_sd15.json")
    with open(os.path.join(run_workflows.WORKFLOWS, "pag_sd15.json"), "rb") as f:
        assert status == 200 and body == f.read()
