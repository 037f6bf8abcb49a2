"""The real frontend in a real browser (optional): the example workflows load with no missing nodes and
convert to exactly the shipped API copies, and the in-node live player plays a stream without stalls and
with audio and video in sync, in both of its ways of loading (MediaSource, and the growing MP4 under
ComfyUI's --disable-api-nodes CSP), in every decode mode, also when generation is slower than real time.

Needs Debian's chromium and npm's playwright-core (no browser download):
    apt-get install chromium
    npm i --prefix ~/.cache/omniforcing-playwright playwright-core   # or set PLAYWRIGHT_CORE_DIR
Screenshots and the player's measurements (player_measurements.json / .md) go to test-artifacts/
(git-ignored).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_comfyui
from host import REPO, WORKFLOWS

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


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))  # every shipped workflow
def test_workflow_loads_in_the_frontend_and_matches_its_api_copy(frontend, name):
    r = frontend["workflows"][name]
    assert r["missing"] == [], f"missing node types: {r['missing']}"
    assert not any("missing" in d.lower() and "node" in d.lower() for d in r["dialogs"]), r["dialogs"]
    assert r["same"], f"workflows/api/{name}.json differs from the page's conversion: {r['diff']}"
    assert Path(r["screenshot"]).is_file()


# -- the live player ---------------------------------------------------------------------------------
FPS = 24
FRAME_MS = 1000 / FPS  # 41.7
# A/V offset at each presented frame (requestVideoFrameCallback): the element's clock, which follows the
# audio, at the moment the frame is on screen, minus the frame's media time. In sync it lies within one
# video frame (the frame shown is the one whose span holds the clock); the tolerance is one 60 Hz display
# refresh, as the moment is the browser's predicted vsync and a frame may go out one vsync later.
OFFSET_MAX_MS = FRAME_MS + 1000 / 60  # 58.4 ms
# Picture age (the clock minus the frame on screen, every animation frame) catches a picture frozen while
# the sound goes on, which presents no frames at all: it grows for as long as the freeze lasts (the
# control: ~2000 ms; the issue saw 0.06-1.4 s). In sync it stays below one frame plus one refresh (58 ms);
# on a shared 2-core machine the software compositor sometimes shows a frame late right after a start or a
# takeover (seen: up to 97 ms at load 3.5 with this page size), hence up to six frames for a moment and two
# in the 95th percentile. A file-mode takeover (the hidden element taking over the growing MP4) has held
# a picture for up to 287 ms on this 2-core software compositor (188 and 287 ms once each in full CI runs),
# hence twelve frames there; a frozen picture with running sound reads about 2000 ms.
PICTURE_AGE_MAX_MS = {"mse": 6 * FRAME_MS, "file": 12 * FRAME_MS}  # 250 / 500 ms
PICTURE_AGE_P95_MS = 2 * FRAME_MS  # 83 ms
STREAM_S = 8
SLOW_S = 6
SLOW_DECODE_S = 1.5  # with the model's own time, each 1 s block takes > 1.5 s: slower than real time
START_BUFFER_DEFAULT = 1.0  # the setting's default, registered by the extension
TOY_STREAM = "omniforcing_toy_stream"
SOURCES = ["tiny"] + (["toy"] if (WORKFLOWS / f"{TOY_STREAM}.json").is_file() else [])
DECODES = ["exact", "balanced", "fast"]
PLAYERS = ["mse", "file"]


def _player_runs(control_url: str) -> list[dict]:
    runs = [{"label": f"{s}_{d}_{p}", "source": s, "decode": d, "player": p, "seconds": STREAM_S}
            for s in SOURCES for d in DECODES for p in PLAYERS]
    runs += [{"label": f"slow_{p}", "source": "tiny", "decode": "fast", "player": p, "seconds": SLOW_S,
              "slow": SLOW_DECODE_S} for p in PLAYERS]
    # the setting is read: a 2 s start buffer, generation slower than real time
    runs.append({"label": "slow_start2_mse", "source": "tiny", "decode": "fast", "player": "mse", "seconds": SLOW_S,
                 "slow": SLOW_DECODE_S, "startBuffer": 2.0})
    # Cancel while it plays: the kept part plays to its end
    runs.append({"label": "cancel_file", "source": "tiny", "decode": "fast", "player": "file", "seconds": 20,
                 "slow": SLOW_DECODE_S, "cancelAfter": 1.5})
    # negative controls: a player that never pauses to buffer (the old behaviour) must be seen to stall,
    # and a file whose audio runs 2 s past its video must be seen as a frozen picture
    runs.append({"label": "control_no_pause_mse", "source": "tiny", "decode": "fast", "player": "mse",
                 "seconds": SLOW_S, "slow": SLOW_DECODE_S, "margin": -1})
    runs.append({"label": "control_frozen_picture", "control": control_url})
    return runs


def _frozen_picture_file(folder: Path) -> None:
    """1 s of video and 3 s of sound, through the live writer: a player shows the last frame for 2 s."""
    from omniforcing_core.live import LiveWriter  # tests/conftest.py puts the repository on sys.path

    t = np.arange(3 * 24000) / 24000
    tone = np.stack([0.2 * np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
    frames = np.broadcast_to(np.linspace(0, 1, FPS, dtype=np.float32)[:, None, None, None], (FPS, 64, 64, 3))
    w = LiveWriter(folder, FPS, 24000, 64, 64, name="frozen_picture.mp4", hls=False)
    w.write(np.ascontiguousarray(frames), tone[:, :24000])
    w.write_audio(tone[:, 24000:])
    w.close()


@pytest.fixture(scope="module")
def player(host):
    folder = host.output / "player_control"
    folder.mkdir(parents=True, exist_ok=True)
    _frozen_picture_file(folder)
    runs = _player_runs(f"{host.url}/view?filename=frozen_picture.mp4&subfolder=player_control&type=output")
    ARTIFACTS.mkdir(exist_ok=True)
    runs_file = ARTIFACTS / "player_runs.json"
    runs_file.write_text(json.dumps(runs))
    load_before, t0 = os.getloadavg(), time.monotonic()
    env = dict(os.environ, CHROMIUM=CHROMIUM)
    r = subprocess.run(["node", str(HERE / "browser" / "check_player.mjs"), host.url + "/", str(REPO), str(ARTIFACTS),
                        str(PW), str(runs_file)], capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, f"browser script failed:\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["load"] = {"before": load_before, "after": os.getloadavg(), "cores": os.cpu_count(),
                   "minutes": round((time.monotonic() - t0) / 60, 1)}
    (ARTIFACTS / "player_measurements.json").write_text(json.dumps(out, indent=1))
    (ARTIFACTS / "player_measurements.md").write_text(_table(out))
    return out


def _table(out: dict) -> str:
    rows = ["| run | stalls after start | buffering pauses | swaps | frames | max / p95 frame offset ms "
            "| max / p95 picture age ms |", "|---|---|---|---|---|---|---|"]
    for label, r in out["runs"].items():
        if "error" in r:
            rows.append(f"| {label} | error: {r['error'][:80]} |||||")
            continue
        q, st = r["probe"], (r.get("final") or {}).get("stats") or {}
        f = lambda s: f"{s['max']:.1f} / {s['p95']:.1f}" if s["n"] else "-"  # noqa: E731
        rows.append(f"| {label} | {q['stalls']} | {st.get('bufferingPauses', '-')} | {st.get('swaps', '-')} | "
                    f"{q['frames']} | {f(q['frameOffset'])} | {f(q['pictureAge'])} |")
    ld = out["load"]
    rows.append(f"\nload average (1/5/15 min) before {ld['before']}, after {ld['after']}, {ld['cores']} cores, "
                f"{ld['minutes']} min")
    return "\n".join(rows) + "\n"


def _run(player, label):
    r = player["runs"][label]
    assert "error" not in r, r.get("error")
    js_errors = [c for c in player["console"] if "pageerror" in c and "omniforcing" in c.lower()]
    assert not js_errors, js_errors
    return r


def _assert_smooth(r, seconds):
    """Played from the first frame to the end: no stall, picture and sound together throughout."""
    q, final = r["probe"], r["final"]
    want = "file" if r["run"]["player"] == "file" else "mse"
    assert r["modes"][-1] == want and final["mode"] == want, r["modes"]  # file: MediaSource is refused, falls back
    assert final["status"] == "done" and final["state"] == "ended", final
    assert final["error"] is None and final["duration"] == pytest.approx(seconds + 1 / FPS, abs=0.1), final
    assert final["t"] == pytest.approx(final["duration"], abs=0.05), final  # played to the end
    assert q["started"] and q["stalls"] == 0, q["stallEvents"]
    # the frames were measured (a busy software compositor drops some: ~10 % at load 4 on 2 cores)
    assert q["frames"] >= 0.75 * seconds * FPS, q["frames"]
    assert q["frameOffset"]["max"] <= OFFSET_MAX_MS, q["frameOffset"]
    age = q["pictureAge"]
    assert age["max"] <= PICTURE_AGE_MAX_MS[want] and age["p95"] <= PICTURE_AGE_P95_MS, (age, q["worst"][:5])
    # a (re)start waits for the start buffer unless everything is there already (a file-mode takeover,
    # which follows the other element's playing within a frame or two, is no restart)
    for s in q["starts"]:
        if (s["gapMs"] is None or s["gapMs"] > 300) and not s["complete"]:
            assert s["ahead"] >= r["startBuffer"] - 1e-3, (s, r["startBuffer"])
    assert r["screenshots"].get("playing") and Path(r["screenshots"]["playing"]).is_file()


@pytest.mark.parametrize("source,decode,mode", [(s, d, p) for s in SOURCES for d in DECODES for p in PLAYERS])
def test_live_player_plays_the_stream_without_stalls_and_in_sync(player, source, decode, mode):
    """mse: MediaSource with the HLS segments (CSP bypassed). file: ComfyUI's --disable-api-nodes CSP forbids
    blob: media, so the player plays the growing MP4 with two elements taking turns."""
    r = _run(player, f"{source}_{decode}_{mode}")
    assert r["startBuffer"] == START_BUFFER_DEFAULT  # the extension's registered default
    _assert_smooth(r, STREAM_S)


@pytest.mark.parametrize("label", ["slow_mse", "slow_file", "slow_start2_mse"])
def test_live_player_pauses_to_buffer_when_generation_is_slower_than_real_time(player, label):
    r = _run(player, label)
    _assert_smooth(r, SLOW_S)
    assert r["final"]["stats"]["bufferingPauses"] >= 1, r["final"]
    assert r["advanced"], "playback did not advance while the stream was generating"
    assert any(t.startswith("block") and "buffering" in t for t in r["texts"]), r["texts"]  # said so, honestly
    assert r["screenshots"].get("buffering") and Path(r["screenshots"]["buffering"]).is_file()
    if label == "slow_start2_mse":
        assert r["startBuffer"] == 2.0 and r["probe"]["starts"][0]["ahead"] >= 2.0, r["probe"]["starts"]


def test_live_player_plays_what_a_cancel_kept_to_its_end(player):
    r = _run(player, "cancel_file")
    q, final = r["probe"], r["final"]
    # the page shows "cancelled", not "error": a Cancel pressed while a block decodes is a cancel too
    assert final["status"] == "cancelled" and final["state"] == "ended", final
    assert 2 <= final["seconds"] < 20 and final["duration"] == pytest.approx(final["seconds"], abs=0.1), final
    assert final["t"] == pytest.approx(final["duration"], abs=0.05) and final["error"] is None, final
    assert q["stalls"] == 0 and q["frameOffset"]["max"] <= OFFSET_MAX_MS, q


def test_the_measurements_can_fail(player):
    """Negative controls: the old behaviour (play on to the last frame) stalls when generation is slower than
    real time, and a picture frozen while the sound goes on shows up as an offset far beyond the bound."""
    no_pause = _run(player, "control_no_pause_mse")["probe"]
    assert no_pause["stalls"] >= 1, no_pause
    frozen = _run(player, "control_frozen_picture")["probe"]
    assert frozen["pictureAge"]["max"] > 1500, frozen["pictureAge"]  # ~2 s of sound over one frame
    assert frozen["pictureAge"]["max"] > 3 * max(PICTURE_AGE_MAX_MS.values())
