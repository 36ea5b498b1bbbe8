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
