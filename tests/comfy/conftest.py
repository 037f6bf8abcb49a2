"""Host tests: a real ComfyUI (COMFYUI_DIR) with the pack and tiny random-weight models.

Outside CI they are skipped when COMFYUI_DIR is not set (and the browser tests when chromium, node or
playwright-core is missing). In CI (`CI=true`, what `.ci/run` sets up) nothing here may skip: a skip
becomes an error that names the missing prerequisite, so a broken CI setup cannot pass silently.
One server per session; the model files are written once by `make_tiny_models.py` in a subprocess
(it imports ComfyUI's VAE classes).
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
needs_comfyui = pytest.mark.skipif(not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
                                   reason="set COMFYUI_DIR to a ComfyUI checkout to run the host tests")


_HOSTS: list = []  # the running server(s), stopped right after the last test here, not at session end


def _here(item) -> bool:
    try:
        Path(str(item.fspath)).resolve().relative_to(HERE)
        return True
    except ValueError:
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped host or browser test is a failure: the prerequisites are CI's job to provide."""
    outcome = yield
    rep = outcome.get_result()
    if not (IN_CI and rep.skipped) or hasattr(rep, "wasxfail") or not _here(item):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3 else str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = (f"CI=true: tests/comfy must not skip, but {item.nodeid} would be skipped: {reason}\n"
                    f"(COMFYUI_DIR={COMFYUI_DIR!r}; .ci/run installs ComfyUI, chromium and playwright-core)")


def pytest_runtest_teardown(item, nextitem):
    """Stop the ComfyUI server once no test here is left, so the rest of the suite has the cores."""
    if not _HOSTS:
        return
    items = item.session.items
    later = items[items.index(item) + 1:] if item in items else []
    if not any(_here(i) for i in later):
        while _HOSTS:
            _HOSTS.pop().stop()


def _stand_in_png(path: Path, width: int = 96, height: int = 64) -> None:
    """A small RGB gradient PNG (stdlib only), for checkouts that lack ComfyUI's input/example.png."""
    rows = b"".join(b"\x00" + bytes(v for x in range(width)
                                    for v in (x * 255 // (width - 1), y * 255 // (height - 1), 128))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


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
    _HOSTS.append(h)
    # the i2av example uses ComfyUI's stock example image; a checkout without input/ gets a stand-in
    example = Path(COMFYUI_DIR) / "input" / "example.png"
    target = h.base / "input" / "example.png"
    if example.is_file():
        target.write_bytes(example.read_bytes())
    else:
        _stand_in_png(target)
    yield h
    h.stop()  # a no-op when pytest_runtest_teardown stopped it already
