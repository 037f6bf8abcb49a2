#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv with CI's pinned torch/torchaudio.
# Sourced by scripts/demo.sh, scripts/test.sh and .ci/run; exports OMNIFORCING_PY (the interpreter) and
# defines omniforcing_pip_install, which installs more into the same venv under the same torch pin.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OMNIFORCING_VENV:-$ROOT/.venv}"
TORCH_PIN="torch==2.11.0 torchaudio==2.11.0"

# pip install into $VENV with the torch pin always on the command line, so nothing installed later
# (ComfyUI's requirements bring torchvision) can move torch: the resolver picks what matches the pin.
omniforcing_pip_install() {
  if command -v uv >/dev/null 2>&1; then
    VIRTUAL_ENV="$VENV" uv pip install -q $TORCH_PIN "$@" >&2
  else
    "$VENV/bin/python" -m pip install -q $TORCH_PIN "$@" >&2
  fi
}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, torchaudio, safetensors, imageio_ffmpeg, pytest" 2>/dev/null; then
  echo "[env] setting up $VENV (torch + torchaudio + requirements; first run only)" >&2
  PY="${PYTHON:-python3}"
  if ! command -v uv >/dev/null 2>&1; then
    "$PY" -m pip install -q uv >&2 || true
  fi
  if command -v uv >/dev/null 2>&1; then
    uv venv -q --allow-existing -p "$PY" "$VENV" >&2
  else
    "$PY" -m venv "$VENV" >&2
  fi
  omniforcing_pip_install -r "$ROOT/requirements.txt" pytest
fi
export OMNIFORCING_VENV="$VENV"
export OMNIFORCING_PY="$VENV/bin/python"
