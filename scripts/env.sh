#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv with CI's pinned torch/torchaudio.
# Sourced by scripts/demo.sh and scripts/test.sh; prints where the interpreter is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OMNIFORCING_VENV:-$ROOT/.venv}"
TORCH_PIN="torch==2.11.0 torchaudio==2.11.0"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, torchaudio, safetensors, imageio_ffmpeg, pytest" 2>/dev/null; then
  echo "[env] setting up $VENV (torch + torchaudio + requirements; first run only)" >&2
  PY="${PYTHON:-python3}"
  if ! command -v uv >/dev/null 2>&1; then
    "$PY" -m pip install -q uv >&2 || true
  fi
  if command -v uv >/dev/null 2>&1; then
    uv venv -q --allow-existing -p "$PY" "$VENV" >&2
    VIRTUAL_ENV="$VENV" uv pip install -q $TORCH_PIN -r "$ROOT/requirements.txt" pytest >&2
  else
    "$PY" -m venv "$VENV" >&2
    "$VENV/bin/pip" install -q $TORCH_PIN -r "$ROOT/requirements.txt" pytest >&2
  fi
fi
export OMNIFORCING_PY="$VENV/bin/python"
