"""What the memory benches share: the process's peak resident memory, ComfyUI nodes called as the engine calls
them, and measurements run each in a fresh process (a peak only grows)."""
import json
import resource
import subprocess
import sys


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_runner():
    """ComfyUI booted with the pack; returns ``node(class_type, **inputs)``, which runs one node's function."""
    from harness import comfy_host
    comfy_host.boot()
    import nodes

    def node(class_type, **inputs):
        cls = nodes.NODE_CLASS_MAPPINGS[class_type]
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return node


def in_fresh_process(module, *flags):
    """Run ``python -m module flags...`` and return the JSON of the last line it prints."""
    out = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
