"""The real ComfyUI frontend in Debian's Chromium, driven by Playwright, against the real server.

For every example workflow: open the JSON file through the frontend's file input (what Load / drag-and-drop do),
check that no missing-node dialog appears, that every pack node is rendered with its widgets holding the file's
values, and that the frontend's own API conversion equals the harness's. For one workflow per mechanism
(``RUN_IN_BROWSER``), then load it rewired onto the reference model, press Run, wait for the run to finish, check
its images through /history and /view (a classifier's best prompt and chart; saved images of the workflow's size,
not flat), and keep a screenshot of the finished graph as a test artefact. Also: the missing-node dialog does appear for an unknown node, and node search finds the pack's nodes.

Chromium comes from the system (``apt-get install chromium``; ``.ci/run`` installs it), never downloaded at
run time; set ``CHROMIUM`` to use another binary.
"""
import json
import os
import shutil
import tempfile

import pytest

from harness import probe_record, run_workflows
from harness.workflow_api import ui_to_api
from tests.server.conftest import check_workflow_images

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
WORKFLOWS = run_workflows.workflow_paths()
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")
# The workflows also run from the browser (Run) on the reference model, one per mechanism the pack hooks into
# ComfyUI with: a UNet patch, a DiT patch, the inversion family, a cascade, a searched cache, a pack sampler, the
# classifier, judges inside sampling, a restorer's gradients, a DPM latent. Every workflow runs on tiny models
# through ComfyUI's engine in tests/workflows; all of them load, render and convert here.
RUN_IN_BROWSER = ("pag_sd15.json", "pag_flux.json", "inversion_sd15.json", "frecas_sd15.json", "cache_search_sd15.json",
                  "cfgpp_sd15.json", "diffusion_classifier_sd15.json", "dynamic_cfg_sd15.json", "red_diff_sd15.json",
                  "cycle_diffusion_sd15.json")
RUN_STEPS = 3


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


# The file input hands the file to app.handleFile; keeping its promise lets a test wait until the load, and the
# missing-node check the frontend makes during it, have finished (no fixed wait).
_TRACK_LOADS = """() => { if (!app.__trainfreeTracked) { const load = app.handleFile.bind(app);
    app.handleFile = (...args) => (window.__trainfreeLoad = Promise.resolve(load(...args)));
    app.__trainfreeTracked = true; } window.__trainfreeLoad = null; }"""
_NEXT_FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
# Feature probe for the frontend's missing-node report: 1.32.x opens a dialog; 1.49.x shows an error toast whose
# "View details" opens a side panel listing the missing node packs.
_MISSING_REPORTED = """() => !!document.querySelector('.p-dialog') ||
    Array.from(document.querySelectorAll('button')).some(b => b.innerText.trim() === 'View details')"""


def _open(page, workflow, name):
    """Open a workflow the way Load does: through the file input, as a .json file; return when it has loaded."""
    folder = tempfile.mkdtemp(prefix="trainfree-wf-")
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(workflow, f)
    page.evaluate(_TRACK_LOADS)
    page.set_input_files("#comfy-file-input", path)
    page.wait_for_function("() => window.__trainfreeLoad !== null", timeout=30_000)
    page.evaluate("() => window.__trainfreeLoad")
    page.evaluate(_NEXT_FRAMES)
    expected = sorted(n["type"] for n in workflow["nodes"])
    assert sorted(page.evaluate("app.graph._nodes.map(n => n.type)")) == expected
    shutil.rmtree(folder, ignore_errors=True)


def _screenshot(page, path):
    page.locator("#graph-canvas").focus()
    page.keyboard.press(".")  # Fit View: the whole graph in the picture
    page.evaluate(_NEXT_FRAMES)
    page.screenshot(path=path)


def _missing_node_report(page):
    """The text of the frontend's missing-node report ('' when it shows none), in either frontend's form."""
    if page.evaluate("!!document.querySelector('.p-dialog')"):
        probe_record.record("frontend_missing_nodes_as_dialog", True)
        return page.evaluate("Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText).join('\\n')")
    details = page.get_by_role("button", name="View details")
    if not details.count():
        return ""
    probe_record.record("frontend_missing_nodes_as_dialog", False)
    details.first.click()
    page.wait_for_function("() => document.body.innerText.includes('Missing Node Packs') || "
                           "document.body.innerText.includes('Missing Models')", timeout=10_000)
    text = page.evaluate("document.body.innerText")
    return text[text.index("Missing Node Packs"):] if "Missing Node Packs" in text else ""


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
    page.wait_for_function(_MISSING_REPORTED, timeout=10_000)
    assert "TrainFreeNoSuchNode" in _missing_node_report(page)
    page.keyboard.press("Escape")
    page.wait_for_selector(".p-dialog", state="detached", timeout=10_000)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_loads_renders_and_runs_in_the_browser(server, page, object_info, definitions, artifacts, path):
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        workflow = json.load(f)
    page.errors.clear()
    _open(page, workflow, os.path.basename(path))
    assert not _missing_node_report(page), _missing_node_report(page)
    saved = {str(n["id"]): n for n in workflow["nodes"]}  # 1.49.x reports node ids as strings
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
        assert [w[1] for w in node["widgets"]] == saved[str(node["id"])]["widgets_values"], node
    _screenshot(page, os.path.join(artifacts, f"browser_{name}_loaded.png"))
    # The frontend's own conversion to the API format is what Queue sends: the harness's converter must agree.
    frontend = page.evaluate("async () => (await app.graphToPrompt()).output")
    ours = ui_to_api(workflow, definitions)
    assert {k: (v["class_type"], v["inputs"]) for k, v in frontend.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}

    if os.path.basename(path) not in RUN_IN_BROWSER:
        assert not page.errors, page.errors
        return
    _open(page, run_workflows.reference_workflow(workflow, steps=RUN_STEPS), f"{name}_reference.json")
    queued_prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as queued:
        page.get_by_role("button", name="Run", exact=True).first.click()  # 1.49.x: Run, then its mode menu
    answer = queued.value.json()
    assert "prompt_id" in answer, answer
    entry = server.wait(answer["prompt_id"])
    check_workflow_images(server, entry, queued_prompt, name, artifacts)
    # the workflow's images appear on its image nodes (the classifier's only output image is a preview)
    page.wait_for_function("() => app.graph._nodes.some(n => ['SaveImage', 'PreviewImage'].includes(n.type) && "
                           "n.imgs && n.imgs.length && n.imgs.every(i => i.complete))", timeout=30_000)
    _screenshot(page, os.path.join(artifacts, f"browser_{name}_finished.png"))
    assert not page.errors, page.errors


def test_node_search_finds_every_pack_node_and_adds_it(page, object_info, pack_nodes, artifacts):
    """What a user does to add a node: double-click the canvas, type, pick the result."""
    # An empty canvas, loaded like any workflow, so the double-click cannot land on a node.
    _open(page, {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
                 "extra": {}, "version": 0.4}, "empty.json")
    # Feature probe for the frontend's search box: 'Search Nodes...' in 1.32.x, 'Add a node...' in 1.49.x.
    search = page.locator("input[placeholder='Search Nodes...'], input[placeholder='Add a node...']").first
    for attempt in range(3):  # 1.49.x sometimes takes a double-click on a fresh canvas as focusing it
        if attempt:
            page.keyboard.press("Escape")
            page.mouse.click(600, 400)
        page.mouse.dblclick(800, 500)
        try:
            search.wait_for(timeout=5_000)
            break
        except Exception:
            if attempt == 2:
                raise
    probe_record.record("frontend_search_placeholder", search.get_attribute("placeholder"))
    search.press_sequentially("TrainFree")
    names = [object_info[name]["display_name"] for name in pack_nodes]
    try:  # wait until the search has listed every pack node; the assertion below says which one is missing
        page.wait_for_function("names => { const t = Array.from(document.querySelectorAll('[role=option]'))"
                               ".map(o => o.innerText).join('\\n'); return names.every(n => t.includes(n)) }",
                               arg=names, timeout=10_000)
    except Exception:
        pass
    options = page.locator("[role=option]").all_inner_texts()
    for name in pack_nodes:
        assert any(object_info[name]["display_name"] in text and "trainfree" in text for text in options), \
            (name, options)
    page.locator("[role=option]", has_text=object_info["TrainFreePAG"]["display_name"]).first.click()
    page.wait_for_function("() => app.graph._nodes.length === 1", timeout=10_000)
    added = page.evaluate("(() => { const n = app.graph._nodes.at(-1); "
                          "return [n.type, n.widgets.map(w => w.name)] })()")
    assert added[0] == "TrainFreePAG" and "scale" in added[1] and "layers" in added[1], added
    page.screenshot(path=os.path.join(artifacts, "browser_node_search.png"))
