"""The real ComfyUI frontend in Debian's Chromium, driven by Playwright, against the real server.

For every example workflow: open the JSON file through the frontend's file input (what Load / drag-and-drop do),
check that no missing-node dialog appears, that every pack node is rendered with its widgets holding the file's
values, and that the frontend's own API conversion equals the harness's; then load the workflow rewired onto the
reference model, press Run, wait for the run to finish, and keep a screenshot of the finished graph as a test
artefact. Also: the missing-node dialog does appear for an unknown node, and node search finds the pack's nodes.

Chromium comes from the system (``apt-get install chromium``; ``.ci/run`` installs it), never downloaded at
run time; set ``CHROMIUM`` to use another binary.
"""
import json
import os
import shutil
import tempfile

import pytest

from harness import run_workflows
from harness.server import error_message
from harness.workflow_api import ui_to_api

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
WORKFLOWS = run_workflows.workflow_paths()
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")


@pytest.fixture(scope="module")
def page(server):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium) or set CHROMIUM")
    from playwright.sync_api import sync_playwright
    # A first visit opens the template browser over the canvas; a user who has been here before does not see it.
    server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    profile = tempfile.mkdtemp(prefix="trainfree-chromium-")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=FLAGS, headless=True, viewport={"width": 1600, "height": 1000})
        tab = browser.new_page()
        tab.errors = []
        tab.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.goto(server.url)
        tab.wait_for_function("window.app && window.app.graph && document.querySelector('#comfy-file-input')",
                              timeout=60_000)
        yield tab
        browser.close()
    shutil.rmtree(profile, ignore_errors=True)


def _open(page, workflow, name):
    """Open a workflow the way Load does: through the file input, as a .json file."""
    folder = tempfile.mkdtemp(prefix="trainfree-wf-")
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(workflow, f)
    page.set_input_files("#comfy-file-input", path)
    expected = sorted(n["type"] for n in workflow["nodes"])
    page.wait_for_function("types => JSON.stringify(app.graph._nodes.map(n => n.type).sort()) === types",
                           arg=json.dumps(expected, separators=(",", ":")), timeout=30_000)
    page.wait_for_timeout(500)
    shutil.rmtree(folder, ignore_errors=True)


def _screenshot(page, path):
    page.locator("#graph-canvas").focus()
    page.keyboard.press(".")  # Fit View: the whole graph in the picture
    page.wait_for_timeout(400)
    page.screenshot(path=path)


def _dialog_text(page):
    return page.evaluate("Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText).join('\\n')")


def _rendered_nodes(page):
    return page.evaluate("""app.graph._nodes.map(n => ({id: n.id, type: n.type, size: Array.from(n.size),
        registered: !!LiteGraph.registered_node_types[n.type],
        widgets: (n.widgets || []).map(w => [w.name, w.value])}))""")


def test_a_missing_node_is_reported_by_the_frontend(page):
    """The check below can fail: an unknown node type brings up the missing-node dialog."""
    with open(WORKFLOWS[0]) as f:
        workflow = json.load(f)
    ours = next(n for n in workflow["nodes"] if n["type"].startswith("TrainFree"))
    ours["type"] = "TrainFreeNoSuchNode"
    _open(page, workflow, "missing.json")
    page.wait_for_selector(".p-dialog", timeout=10_000)
    assert "TrainFreeNoSuchNode" in _dialog_text(page)
    page.keyboard.press("Escape")
    page.wait_for_selector(".p-dialog", state="detached", timeout=10_000)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_loads_renders_and_runs_in_the_browser(server, page, object_info, definitions, artifacts, path):
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        workflow = json.load(f)
    page.errors.clear()
    _open(page, workflow, os.path.basename(path))
    assert "missing" not in _dialog_text(page).lower(), _dialog_text(page)
    saved = {n["id"]: n for n in workflow["nodes"]}
    for node in _rendered_nodes(page):
        assert node["registered"], f"{node['type']} is not a registered node type"
        if not node["type"].startswith("TrainFree"):
            continue
        assert node["size"][0] > 50 and node["size"][1] > 30, node
        widgets = dict(node["widgets"])
        spec = object_info[node["type"]]["input"]
        for section in ("required", "optional"):
            for input_name, (kind, *_) in spec.get(section, {}).items():
                if isinstance(kind, list) or kind in WIDGET_KINDS:
                    assert input_name in widgets, f"{node['type']} shows no widget for {input_name}"
        assert [w[1] for w in node["widgets"]] == saved[node["id"]]["widgets_values"], node
    _screenshot(page, os.path.join(artifacts, f"browser_{name}_loaded.png"))
    # The frontend's own conversion to the API format is what Queue sends: the harness's converter must agree.
    frontend = page.evaluate("async () => (await app.graphToPrompt()).output")
    ours = ui_to_api(workflow, definitions)
    assert {k: (v["class_type"], v["inputs"]) for k, v in frontend.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}

    _open(page, run_workflows.reference_workflow(workflow), f"{name}_reference.json")
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as queued:
        page.get_by_role("button", name="Run", exact=True).click()
    answer = queued.value.json()
    assert "prompt_id" in answer, answer
    entry = server.wait(answer["prompt_id"])
    assert entry["status"]["status_str"] == "success", error_message(entry)
    page.wait_for_timeout(1000)  # let the finished image appear on the SaveImage node
    _screenshot(page, os.path.join(artifacts, f"browser_{name}_finished.png"))
    assert not page.errors, page.errors


def test_node_search_finds_every_pack_node_and_adds_it(page, object_info, pack_nodes, artifacts):
    """What a user does to add a node: double-click the canvas, type, pick the result."""
    before = page.evaluate("app.graph._nodes.length")
    page.mouse.dblclick(800, 750)
    page.wait_for_selector("input[placeholder='Search Nodes...']", timeout=10_000)
    page.keyboard.type("TrainFree")
    page.wait_for_timeout(1000)
    options = page.locator("[role=option]").all_inner_texts()
    for name in pack_nodes:
        assert any(object_info[name]["display_name"] in text and "trainfree" in text for text in options), \
            (name, options)
    page.locator("[role=option]", has_text=object_info["TrainFreePAG"]["display_name"]).first.click()
    page.wait_for_function("n => app.graph._nodes.length === n + 1", arg=before, timeout=10_000)
    added = page.evaluate("(() => { const n = app.graph._nodes.at(-1); "
                          "return [n.type, n.widgets.map(w => w.name)] })()")
    assert added[0] == "TrainFreePAG" and "scale" in added[1] and "layers" in added[1], added
    page.screenshot(path=os.path.join(artifacts, "browser_node_search.png"))
