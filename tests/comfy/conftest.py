"""Host tests: a real ComfyUI (COMFYUI_DIR) with the pack and tiny random-weight models.

Skipped when COMFYUI_DIR is not set (CI has no ComfyUI). One server per session; the model files
are written once by `make_tiny_models.py` in a subprocess (it imports ComfyUI's VAE classes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
needs_comfyui = pytest.mark.skipif(not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
                                   reason="set COMFYUI_DIR to a ComfyUI checkout to run the host tests")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    r = subprocess.run([sys.executable, str(HERE / "make_tiny_models.py"), str(models), COMFYUI_DIR],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"writing tiny models failed:\n{r.stdout}\n{r.stderr}"
    return models


@pytest.fixture(scope="session")
def host(tmp_path_factory, tiny_models):
    from host import Host

    root = tmp_path_factory.mktemp("comfyui")
    h = Host(Path(COMFYUI_DIR), root, tiny_models).start()
    # the i2av example uses ComfyUI's stock example image
    example = Path(COMFYUI_DIR) / "input" / "example.png"
    if example.is_file():
        (h.base / "input" / "example.png").write_bytes(example.read_bytes())
    yield h
    h.stop()
