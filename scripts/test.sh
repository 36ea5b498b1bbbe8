#!/usr/bin/env bash
# Install what the tests need, then run the whole suite against a real ComfyUI (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest "$@"
