"""ComfyUI-Manager runs this file (no arguments) to install the pack's runtime needs into ComfyUI's Python.

torch comes with ComfyUI and is never touched here; only missing packages are installed.
"""
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
IMPORT_NAMES = {"torch": "torch", "safetensors": "safetensors", "numpy": "numpy", "kornia": "kornia"}


def missing_requirements():
    with open(os.path.join(HERE, "requirements.txt")) as f:
        names = [line.split("#")[0].strip() for line in f]
    return [n for n in names if n and n != "torch" and importlib.util.find_spec(IMPORT_NAMES.get(n, n)) is None]


def main():
    missing = missing_requirements()
    if missing:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *missing])


if __name__ == "__main__":
    main()
