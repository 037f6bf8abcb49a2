"""The real frontend in a real browser (optional): the example workflows load with no missing nodes and
convert to exactly the shipped API copies, and the live player's time advances during a stream.

Needs Debian's chromium and npm's playwright-core (no browser download):
    apt-get install chromium
    npm i --prefix ~/.cache/omniforcing-playwright playwright-core   # or set PLAYWRIGHT_CORE_DIR
Screenshots go to test-artifacts/ (git-ignored).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import needs_comfyui
from host import REPO

HERE = Path(__file__).resolve().parent
ARTIFACTS = REPO / "test-artifacts"


def _playwright_core():
    for cand in (os.environ.get("PLAYWRIGHT_CORE_DIR"),
                 Path.home() / ".cache" / "omniforcing-playwright" / "node_modules" / "playwright-core"):
        if cand and (Path(cand) / "index.mjs").is_file():
            return Path(cand)
    return None


CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
PW = _playwright_core()
pytestmark = [needs_comfyui, pytest.mark.skipif(
    not (CHROMIUM and PW and shutil.which("node")),
    reason="browser test needs chromium, node and playwright-core (see this file's docstring)")]


@pytest.fixture(scope="module")
def frontend(host):
    env = dict(os.environ, CHROMIUM=CHROMIUM)
    r = subprocess.run(["node", str(HERE / "browser" / "check_frontend.mjs"), host.url + "/", str(REPO),
                        str(ARTIFACTS), str(PW)], capture_output=True, text=True, timeout=480, env=env)
    assert r.returncode == 0, f"browser script failed:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["omniforcing_t2av_5s", "omniforcing_stream_60s_schedule", "omniforcing_i2av",
                                  "omniforcing_toy_demo", "omniforcing_toy_stream"])
def test_workflow_loads_in_the_frontend_and_matches_its_api_copy(frontend, name):
    r = frontend["workflows"][name]
    assert r["missing"] == [], f"missing node types: {r['missing']}"
    assert not any("missing" in d.lower() and "node" in d.lower() for d in r["dialogs"]), r["dialogs"]
    assert r["same"], f"workflows/api/{name}.json differs from the page's conversion: {r['diff']}"
    assert Path(r["screenshot"]).is_file()


@pytest.mark.parametrize("mode", ["csp", "mse"])
def test_live_player_time_advances_during_the_stream(frontend, mode):
    """csp: ComfyUI's --disable-api-nodes CSP forbids blob: media -> the player plays the growing MP4.
    mse: CSP bypassed -> MediaSource with the HLS segments."""
    p = frontend["player"][mode]
    assert "error" not in p, p
    want = "file" if mode == "csp" else "mse"
    assert p["modes"][-1] == want and p["after"]["mode"] == want, p  # csp: tries MediaSource first, falls back
    assert p["final"]["status"] == "done", p["final"]
    assert p["advanced"] and p["maxTimeDuring"] > 1.0, p
    assert p["after"]["error"] is None and p["after"]["duration"] == pytest.approx(p["seconds"] + 1 / 24, abs=0.1)
    assert p["screenshot"] and Path(p["screenshot"]).is_file()
    js_errors = [c for c in frontend["console"] if "pageerror" in c and "omniforcing" in c.lower()]
    assert not js_errors, js_errors
