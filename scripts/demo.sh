#!/usr/bin/env bash
# Install what the demo needs, then run every example workflow headless through ComfyUI's execution engine,
# writing the images and a one-page report to ./demo_output (or the folder given as first argument).
# It runs on ComfyUI 0.33.0 (current master, one of the two test hosts); with COMFYUI_PATH set, on that checkout
# in the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/hosts.sh
if [ -n "${COMFYUI_PATH:-}" ]; then
  exec "${PYTHON:-python3}" -m harness.run_workflows --out "${1:-demo_output}"
fi
COMFYUI_PATH="$(host_comfyui 0.33.0)" exec "$(host_python 0.33.0)" -m harness.run_workflows --out "${1:-demo_output}"
