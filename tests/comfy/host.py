"""A headless ComfyUI for the host tests: start it on a free port with the pack loaded from outside
the checkout, talk to it over HTTP (stdlib only), and stop it (only the process we started)."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
PACK = "omniforcing"  # the pack's folder name inside ComfyUI's custom_nodes (a symlink to the repo)
TEST_PACK = "omniforcing_test_nodes"
WORKFLOWS = REPO / "workflows"


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the test process dies (killed by a CI timeout, Ctrl-C twice), so
    no orphaned ComfyUI outlives the run. It runs in its own session, out of reach of group signals."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    def __init__(self, comfy_dir: Path, root: Path, models: Path):
        self.comfy_dir, self.root, self.models = Path(comfy_dir), Path(root), Path(models)
        self.base = self.root / "base"
        self.output = self.base / "output"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "comfyui.log"
        self.proc: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "Host":
        packs = self.root / "packs"
        packs.mkdir(parents=True, exist_ok=True)
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (self.base / "input").mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK, REPO), (TEST_PACK, REPO / "tests" / "comfy" / "test_pack" / TEST_PACK)):
            link = packs / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        yaml = self.root / "extra_model_paths.yaml"
        yaml.write_text(f"omniforcing_tests:\n  base_path: {self.models}\n  checkpoints: checkpoints\n"
                        f"  diffusion_models: diffusion_models\n  omniforcing: omniforcing\n"
                        f"  custom_nodes: {packs}\n")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--extra-model-paths-config", str(yaml), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:", "--disable-all-custom-nodes",
               "--whitelist-custom-nodes", PACK, TEST_PACK, "--preview-method", "auto"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                if self.get("/system_stats") is not None:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group, started above
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP --------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read()
                return r.status, (json.loads(text) if text else {})
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:
                return e.code, {"raw": text.decode(errors="replace")}

    def queue(self, graph: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": graph, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.get(f"/history/{prompt_id}")
            entry = h.get(prompt_id) if isinstance(h, dict) else None
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died; log:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s; log:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 300) -> dict:
        code, r = self.queue(graph)
        if code != 200:
            raise AssertionError(f"graph rejected ({code}): {json.dumps(r, indent=1)[:3000]}")
        return self.wait(r["prompt_id"], timeout)

    def output_files(self, entry: dict, node: str, key: str = "images") -> list[Path]:
        return [self.output / f.get("subfolder", "") / f["filename"] for f in entry["outputs"][node][key]]


def status_messages(entry: dict, kind: str) -> list[dict]:
    return [m[1] for m in entry.get("status", {}).get("messages", []) if m[0] == kind]


def error_text(entry: dict) -> str:
    errs = status_messages(entry, "execution_error")
    return " | ".join(f"{e.get('exception_type')}: {e.get('exception_message')}" for e in errs)


# -- example workflows, made runnable on tiny models ------------------------------------------------

def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def tinyfy(graph: dict, *, width: int = 64, height: int = 64, seconds: Optional[int] = None,
           text_mode: str = "processed", **overrides) -> dict:
    """The example graph with the Gemma text encoder swapped for the test stand-in and a tiny size."""
    g = copy.deepcopy(graph)
    for node in g.values():
        if node["class_type"] == "LTXAVTextEncoderLoader":
            node["class_type"] = "OmniForcingTestCLIP"
            node["inputs"] = {"caption_channels": 24, "mode": text_mode}
        if node["class_type"] in ("OmniForcingSampler", "OmniForcingStream"):
            node["inputs"].update(width=width, height=height)
            if seconds is not None:
                node["inputs"]["seconds"] = seconds
            node["inputs"].update(overrides)
    return g


def nodes_of(graph: dict, class_type: str) -> list[str]:
    return [k for k, v in graph.items() if v["class_type"] == class_type]
