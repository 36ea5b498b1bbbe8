"""Fixtures for tests against ComfyUI's real server (``main.py`` in a subprocess) with the pack installed.

One server serves the whole session. It runs with ``--cache-none``: every prompt executes every node, so a state
that leaks from one run into the next shows in the next run's images instead of hiding behind the cache.
Artefacts (images, screenshots, the server log, memory figures) go to ``$TRAINFREE_ARTIFACTS`` or
``test_artifacts/`` in the repository.
"""
import io
import os

import numpy as np
import pytest

from harness import comfy_host, run_workflows
from harness.server import ComfyServer, error_message

ARTIFACTS = os.environ.get("TRAINFREE_ARTIFACTS", os.path.join(comfy_host.PACK_DIR, "test_artifacts"))
SERVER_ARGS = ("--cache-none",)


@pytest.fixture(scope="session")
def artifacts():
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def server(artifacts):
    with ComfyServer(extra_args=SERVER_ARGS) as running:
        yield running
        with open(os.path.join(artifacts, "server.log"), "w") as f:
            f.write(running.log())


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="session")
def definitions(object_info):
    """Node type -> its inputs as the server reports them: what the converter needs of INPUT_TYPES."""
    return {name: info["input"] for name, info in object_info.items()}


@pytest.fixture(scope="session")
def pack_nodes(object_info):
    return sorted(name for name in object_info if name.startswith("TrainFree"))


def check_workflow_images(server, entry, prompt, name, artifacts):
    """A finished example workflow's results, fetched through /history and /view: a classifier's best prompt is
    one of its candidates and its chart is previewed; otherwise saved images of the workflow's size, not flat."""
    assert entry["status"]["status_str"] == "success", error_message(entry)
    classifiers = [k for k, n in prompt.items() if n["class_type"] in run_workflows.CLASSIFIER_NODES]
    if classifiers:  # analysis, not generation: the UI shows the best prompt; the chart is previewed
        for key in classifiers:
            best = entry["outputs"][key]["text"][0].splitlines()[0]
            assert best in prompt[key]["inputs"]["candidates"].splitlines(), best
        assert server.images(entry, kinds=("temp",)), f"{name} previewed no chart"
        return
    (size,) = ({n["inputs"]["width"] for n in prompt.values()
                if n["class_type"] in run_workflows.LATENT_NODES + run_workflows.CASCADE_NODES}
               or {run_workflows.REFERENCE_SIZE})  # inversion workflows encode a 128 px image
    images = server.images(entry, kinds=("output",))  # previews (the schedule search's Pareto plot) aside
    assert images, f"{name} saved no image"
    for i, png in enumerate(images):
        picture = pixels(png)
        assert picture.shape == (size, size, 3)  # 128; ScaleCrafter's and FreCaS's workflows: above it
        assert picture.std() > 5, "a flat image: the model produced nothing"
        with open(os.path.join(artifacts, f"api_{name}_{i}.png"), "wb") as f:
            f.write(png)


def pixels(png):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
