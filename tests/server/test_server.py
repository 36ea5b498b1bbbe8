"""The pack inside ComfyUI's real server: what /object_info tells the frontend, a clean start-up log, the template
browser's listing. (Every example workflow runs on this server from the browser, test_browser.py, whose images are
checked through /history and /view by ``check_workflow_images``.)"""
import os
import re

from harness import run_workflows
from harness.server import TEST_NODES, ComfyServer
from tests.server.conftest import SERVER_ARGS

WORKFLOWS = run_workflows.workflow_paths()


def test_object_info_lists_every_pack_node_with_display_name_category_and_tooltips(object_info, pack_nodes):
    expected = {"TrainFreeReferenceModel", "TrainFreePAG", "TrainFreeAPG", "TrainFreeFDG", "TrainFreeGuidanceInterval",
                "TrainFreeNoiseDampedCFG", "TrainFreeResidualCFG", "TrainFreeTwoModelGuidance", "TrainFreeScaleCrafter"}
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


def _start_up_lines(server):
    """The start-up log up to 'Starting server', with what differs between any two starts (folders, ports,
    timings) masked."""
    text = server.log().split("Starting server")[0].replace(server.base_dir, "<base>")
    # 0.33.0 may colour its log and tag each line with its level ("\x1b[32m[INFO]\x1b[0m ..."): keep the words only.
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"^\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\]\s*", "", text, flags=re.M)
    return [re.sub(r"\d+(\.\d+)?", "<n>", line).strip() for line in text.splitlines() if line.strip()]


def test_start_up_log_has_nothing_from_the_pack_but_its_import_line(server):
    """Against a server started the same way without the pack: every start-up line the pack adds is one of the
    import-time lines ComfyUI prints per custom node folder, so no warning, error or traceback comes from it."""
    assert "comfyui-trainfree" in server.log(), "the pack's import time line is missing: it was not loaded"
    with ComfyServer(extra_args=SERVER_ARGS, install_pack=False) as bare:
        baseline = set(_start_up_lines(bare))
    added = [line for line in _start_up_lines(server) if line not in baseline]
    import_lines = {"Import times for custom nodes:", "<n> seconds: <base>/custom_nodes/comfyui-trainfree",
                    f"<n> seconds: <base>/custom_nodes/{TEST_NODES}"}
    assert set(added) <= import_lines, added


def test_the_template_browser_lists_every_example_workflow(server):
    """ComfyUI serves a pack's workflows/ folder to the frontend's template browser (README's claim)."""
    listed = server.get("/workflow_templates").get("comfyui-trainfree", [])
    assert sorted(listed) == sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)
    status, body = server.request("GET", "/api/workflow_templates/comfyui-trainfree/pag_sd15.json")
    with open(os.path.join(run_workflows.WORKFLOWS, "pag_sd15.json"), "rb") as f:
        assert status == 200 and body == f.read()
