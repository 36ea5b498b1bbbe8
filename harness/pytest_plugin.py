"""Loaded with ``-p harness.pytest_plugin`` (see pyproject.toml).

The repository root is the pack: its ``__init__.py`` imports ComfyUI, so pytest must treat the root as a plain
folder rather than a package it imports before every test.
"""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collect_directory(path, parent):
    if str(path) == REPO:
        return pytest.Dir.from_parent(parent, path=path)


def pytest_report_header(config):
    from harness import comfy_host
    try:
        return f"ComfyUI test host: {comfy_host.host_label()}"
    except RuntimeError as e:
        return f"ComfyUI test host: none ({e})"


def pytest_sessionstart(session):
    """Name the host in the JUnit report, so each result says which ComfyUI it came from."""
    from _pytest.junitxml import xml_key
    xml = session.config.stash.get(xml_key, None)
    if xml is not None:
        from harness import comfy_host
        xml.add_global_property("comfyui_host", comfy_host.host_label())


def pytest_sessionfinish(session):
    folder = os.environ.get("TRAINFREE_ARTIFACTS")
    if folder:
        from harness import probe_record
        probe_record.write(folder)
