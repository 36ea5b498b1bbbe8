#!/usr/bin/env bash
# Install what the demo needs, then run every example workflow headless through ComfyUI's execution engine,
# writing the images and a one-page report to ./demo_output (or the folder given as first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m harness.run_workflows --out "${1:-demo_output}"
