"""scripts/queue_batch.py: prompt-node detection, argument checks, and whole runs against a stub ComfyUI
(a tiny HTTP server on 127.0.0.1 in a thread). Faults and hostile servers: test_queue_batch_faults.py."""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "queue_batch.py"
API = ROOT / "workflows" / "api"
TOY = API / "omniforcing_toy_demo.json"
sys.path.insert(0, str(ROOT / "scripts"))
import queue_batch  # noqa: E402

FAST = ["--poll", "0.01", "--retry-delay", "0.001", "--http-timeout", "5"]


# -- a stub ComfyUI --------------------------------------------------------------------------------------------

class Stub(ThreadingHTTPServer):
    """Accepts every graph; a job finishes after `polls` GET /history calls and yields `outputs(n)`.
    `faults` are served once each, in order, to the first request whose path starts with their prefix:
    an HTTP code, "html", "drop" (close without answering) or a float (sleep that long first).
    `down` drops every request; `on_history(stub)` runs at each GET /history."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.posts, self.views, self.jobs = [], [], {}
        self.in_flight = self.max_in_flight = 0
        self.polls = 2
        self.faults = []
        self.reject = None           # body of an HTTP 400 answer to every POST /prompt
        self.fail_jobs = set()       # job numbers (1-based) that end in an execution error
        self.never_finish = set()    # job numbers that stay queued
        self.outputs = lambda n: [{"filename": f"toy_{n:05d}_.mp4", "subfolder": "omniforcing", "type": "output"}]
        self.down = False
        self.on_history = None

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a slow answer: expected here, not worth a traceback

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}"

    def fault_for(self, path):
        with self.lock:
            for i, (prefix, action) in enumerate(self.faults):
                if path.startswith(prefix):
                    return self.faults.pop(i)[1]

    def post(self, graph):
        with self.lock:
            self.posts.append(graph)
            if self.reject is not None:
                return 400, self.reject
            pid = uuid.uuid4().hex
            self.jobs[pid] = {"n": len(self.posts), "polls": self.polls, "done": False}
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return 200, {"prompt_id": pid, "number": len(self.posts), "node_errors": {}}

    def history(self, pid):
        if self.on_history:
            self.on_history(self)
        with self.lock:
            job = self.jobs.get(pid)
            if job is None or job["n"] in self.never_finish:
                return {}
            job["polls"] -= 1
            if job["polls"] > 0:
                return {}
            if not job["done"]:
                job["done"], self.in_flight = True, self.in_flight - 1
            if job["n"] in self.fail_jobs:
                status = {"status_str": "error", "completed": False, "messages": [["execution_error", {
                    "node_id": "3", "node_type": "OmniForcingSampler", "exception_message": "boom"}]]}
                return {pid: {"outputs": {}, "status": status}}
            return {pid: {"outputs": {"6": {"images": self.outputs(job["n"]), "animated": [True]}},
                          "status": {"status_str": "success", "completed": True, "messages": []}}}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fault(self):
        """True when a fault answered (or dropped) this request."""
        action = "drop" if self.server.down else self.server.fault_for(self.path)
        if isinstance(action, float):
            time.sleep(action)
            return False
        if action == "drop":
            self.close_connection = True
        elif action == "html":
            self.answer(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        elif isinstance(action, int):
            self.answer(action, b"Internal Server Error", "text/plain")
        return action is not None

    def do_POST(self):
        graph = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
        if not self.fault():
            self.answer(*self.server.post(graph))

    def do_GET(self):
        if self.fault():
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/system_stats":
            self.answer(200, {"system": {"comfyui_version": "stub"}, "devices": []})
        elif url.path.startswith("/history/"):
            self.answer(200, self.server.history(urllib.parse.unquote(url.path[len("/history/"):])))
        elif url.path == "/view":
            q = dict(urllib.parse.parse_qsl(url.query))
            self.server.views.append(q)
            self.answer(200, f"bytes of {q['filename']}".encode(), "video/mp4")
        else:
            self.answer(404, b"404: Not Found", "text/plain")


@pytest.fixture
def stub():
    s = Stub()
    t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    t.start()
    yield s
    s.shutdown()
    s.server_close()


def prompts_file(tmp_path, *lines, name="p.txt"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def batch(stub, tmp_path, *extra, prompts=("a red ball bounces", "rain starts", "a dog barks"), workflow=TOY):
    """Run the script in this process; returns the exit status."""
    return queue_batch.main(["--workflow", str(workflow), "--prompts", str(prompts_file(tmp_path, *prompts)),
                             "--server", stub.url, *FAST, *map(str, extra)])


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


# -- the prompt node -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(API.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_api_workflow_has_exactly_one_prompt_node(path):
    graph = json.loads(path.read_text())
    node, name = queue_batch.find_prompt_node(graph)
    assert name == "text" and isinstance(graph[node]["inputs"][name], str)
    assert "prompt" in graph[node]["_meta"]["title"].lower()
    # without titles the node type alone must single it out too
    untitled = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in graph.items()}
    assert queue_batch.find_prompt_node(untitled) == (node, name)
    assert graph[node]["class_type"] in queue_batch.PROMPT_TYPES


def test_the_toy_workflow_prompt_is_its_text_encoder():
    graph = json.loads(TOY.read_text())
    assert queue_batch.find_prompt_node(graph, None, "text") == ("2", "text")
    assert graph["2"]["class_type"] == "OmniForcingToyTextEncode"


def test_a_node_titled_prompt_wins_and_a_prompt_input_is_found():
    g = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a"}},
         "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "b"}, "_meta": {"title": "Prompt"}},
         "3": {"class_type": "SomeCustomNode", "inputs": {"prompt": "c", "clip": ["4", 0]}}}
    assert queue_batch.find_prompt_node(g) == ("2", "text")
    g["2"]["_meta"]["title"] = "negative"
    g["3"]["_meta"] = {"title": "prompt"}
    assert queue_batch.find_prompt_node(g) == ("3", "prompt")
    assert queue_batch.find_prompt_node(g, "3") == ("3", "prompt")


def test_ambiguous_or_wrong_nodes_are_explained():
    g = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a"}},
         "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "b"}}}
    with pytest.raises(ValueError, match="pass --node"):
        queue_batch.find_prompt_node(g, None, "text")
    with pytest.raises(ValueError, match="no node with that id"):
        queue_batch.find_prompt_node(g, "9", "text")
    with pytest.raises(ValueError, match="has no input 'seed'"):
        queue_batch.find_prompt_node(g, "1", "seed")
    assert queue_batch.find_prompt_node(g, "2", "text") == ("2", "text")


# -- arguments ---------------------------------------------------------------------------------------------------

def test_server_down_is_a_clear_message(tmp_path):
    prompts = prompts_file(tmp_path, "# a comment", "a dog barks", "", "rain starts")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = run("--workflow", API / "omniforcing_t2av_5s.json", "--prompts", prompts,
            "--server", f"http://127.0.0.1:{port}", "--retries", "2", "--retry-delay", "0.001")
    assert r.returncode == 2
    assert "cannot reach ComfyUI" in r.stderr and "Is it running?" in r.stderr and "Traceback" not in r.stderr


def test_ui_format_and_empty_prompt_files_are_refused(tmp_path):
    empty = prompts_file(tmp_path, "", "# nothing")
    r = run("--workflow", ROOT / "workflows" / "omniforcing_t2av_5s.json", "--prompts", empty)
    assert r.returncode == 2 and "UI-format" in r.stderr
    r = run("--workflow", API / "omniforcing_t2av_5s.json", "--prompts", empty)
    assert r.returncode == 2 and "holds no prompts" in r.stderr


def test_rejection_lists_node_errors():
    text = queue_batch.describe_rejection({
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {"11": {"class_type": "OmniForcingSampler", "errors": [
            {"message": "Failed to validate prompt for output 24", "details": "width=100 is not a positive multiple of 32"}]}}})
    assert "node 11 (OmniForcingSampler)" in text and "width=100" in text


# -- whole runs --------------------------------------------------------------------------------------------------

def test_toy_workflow_batch_downloads_every_output(stub, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(stub, tmp_path, "--out", out, "--seed", "100") == 0
    assert [g["2"]["inputs"]["text"] for g in stub.posts] == ["a red ball bounces", "rain starts", "a dog barks"]
    assert [g["3"]["inputs"]["seed"] for g in stub.posts] == [100, 101, 102]
    assert sorted(p.name for p in out.iterdir()) == ["001_toy_00001_.mp4", "002_toy_00002_.mp4", "003_toy_00003_.mp4"]
    assert (out / "002_toy_00002_.mp4").read_bytes() == b"bytes of toy_00002_.mp4"
    assert stub.views[0] == {"filename": "toy_00001_.mp4", "subfolder": "omniforcing", "type": "output"}
    text = capsys.readouterr().out
    assert "Summary: 3 job(s): 3 done" in text
    assert "#2   done      line 2    'rain starts': " + str(out / "002_toy_00002_.mp4") in text


def test_without_out_the_files_are_listed(stub, tmp_path, capsys):
    assert batch(stub, tmp_path, prompts=["one"]) == 0
    assert "output/omniforcing/toy_00001_.mp4" in capsys.readouterr().out and not stub.views


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_parallel_keeps_that_many_jobs_queued(stub, tmp_path, parallel):
    stub.polls = 4
    prompts = [f"prompt {i}" for i in range(6)]
    assert batch(stub, tmp_path, "--parallel", parallel, "--out", tmp_path / "out", prompts=prompts) == 0
    assert stub.max_in_flight == parallel and len(stub.posts) == 6
    assert len(list((tmp_path / "out").iterdir())) == 6


def test_a_rejected_graph_is_submitted_once_and_its_errors_shown_once(stub, tmp_path, capsys):
    stub.reject = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
                   "node_errors": {"3": {"class_type": "OmniForcingSampler", "errors": [
                       {"message": "Failed to validate prompt for output 6", "details": "nearest valid width is 96"}]}}}
    assert batch(stub, tmp_path, "--parallel", 2) == 1
    assert len(stub.posts) == 1
    out, err = capsys.readouterr()
    assert err.count("nearest valid width is 96") == 1 and "rejected by the server" in err
    assert "Summary: 3 job(s): 1 rejected, 2 skipped" in out
    assert "not queued: the server rejected job 1" in out


def test_a_rejected_prompt_line_is_pointed_at(stub, tmp_path, capsys):
    stub.reject = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
                   "node_errors": {"2": {"class_type": "OmniForcingToyTextEncode", "errors": [
                       {"message": "Custom validation failed for node", "details": "bad time '9x'"}]}}}
    assert batch(stub, tmp_path, prompts=["# header", "9x: oops", "fine"]) == 1
    out, err = capsys.readouterr()
    assert "line 2 of the prompts" in err and "bad time '9x'" in err
    assert "#1   rejected  line 2    '9x: oops': HTTP 400 (an error in the prompt node: check this line)" in out


def test_a_failed_job_is_reported_and_the_rest_still_run(stub, tmp_path, capsys):
    stub.fail_jobs = {2}
    assert batch(stub, tmp_path, "--out", tmp_path / "out") == 1
    out, err = capsys.readouterr()
    assert "Summary: 3 job(s): 2 done, 1 failed" in out
    assert "#2   failed    line 2    'rain starts': OmniForcingSampler (node 3): boom" in out
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_a_job_that_never_finishes_times_out(stub, tmp_path, capsys):
    stub.never_finish = {1}
    assert batch(stub, tmp_path, "--timeout", "0.2", prompts=["stuck", "fine"]) == 1
    assert "did not finish within 0.2s" in capsys.readouterr().out
