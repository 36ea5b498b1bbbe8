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
from harness.server import ComfyServer

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


def reference_prompt(path, definitions, steps=6, seed=3, caption="a blue digit four on a light background"):
    return run_workflows.to_reference_prompt(path, caption, steps=steps, seed=seed, definitions=definitions)


def pixels(png):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
