"""Registry readiness: the Comfy registry fields, runtime-only requirements, and the README's install and gallery."""
import glob
import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = {"torch", "safetensors", "numpy", "kornia"}


def _read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def test_pyproject_has_the_registry_fields_and_the_license():
    project = tomllib.loads(_read("pyproject.toml"))
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and isinstance(comfy["includes"], list)
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("docs/icon.png")
    assert os.path.isfile(os.path.join(REPO, "docs", "icon.png"))
    assert project["project"]["license"]["text"] == "GPL-3.0-or-later"
    assert re.fullmatch(r"[a-z0-9-]+", project["project"]["name"])
    assert set(project["project"]["dependencies"]) == RUNTIME


def test_requirements_hold_only_runtime_needs():
    names = {line.split("#")[0].strip() for line in _read("requirements.txt").splitlines()} - {""}
    assert names == RUNTIME


def test_readme_shows_both_installs_and_a_gallery_of_every_workflow():
    readme = _read("README.md")
    assert "ComfyUI-Manager" in readme and "git clone" in readme and "custom_nodes" in readme
    for path in glob.glob(os.path.join(REPO, "workflows", "*.json")):
        name = os.path.splitext(os.path.basename(path))[0]
        image = f"docs/gallery/{name}.png"
        assert f"]({image})" in readme, f"README's gallery lacks {name}"
        assert os.path.isfile(os.path.join(REPO, image)), f"{image} is missing: python -m harness.run_workflows --gallery docs/gallery"


def test_the_pack_imports_its_own_modules_relatively():
    """ComfyUI imports the pack as a package under custom_nodes/, with only ComfyUI's folder on sys.path: an
    absolute import of the pack's own packages works in the test harness (which puts the repository on sys.path)
    and fails for users. (A bare ``import nodes`` is ComfyUI's own module, which the host adapter may use.)"""
    import ast
    own = {os.path.splitext(name)[0] for name in os.listdir(os.path.join(REPO, "nodes"))}
    absolute = []
    for path in glob.glob(os.path.join(REPO, "nodes", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "guidance_ops", "*.py")) + [os.path.join(REPO, "__init__.py")]:
        for node in ast.walk(ast.parse(_read(os.path.relpath(path, REPO)))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            absolute += [f"{os.path.relpath(path, REPO)}: {n}" for n in names
                         if n.split(".")[0] == "guidance_ops" or n.startswith("nodes.") and n.split(".")[1] in own]
    assert not absolute, absolute
