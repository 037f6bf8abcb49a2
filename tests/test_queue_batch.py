"""scripts/queue_batch.py without a server: argument checks, prompt-node detection, a server that is down."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "queue_batch.py"
sys.path.insert(0, str(ROOT / "scripts"))
import queue_batch  # noqa: E402


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name,node", [("omniforcing_t2av_5s", "10"), ("omniforcing_i2av", "10"),
                                       ("omniforcing_stream_60s_schedule", "10")])
def test_finds_the_prompt_node_of_each_example(name, node):
    graph = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert queue_batch.find_prompt_node(graph, None, "text") == node


def test_ambiguous_or_wrong_nodes_are_explained():
    g = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a"}},
         "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "b"}}}
    with pytest.raises(ValueError, match="pass --node"):
        queue_batch.find_prompt_node(g, None, "text")
    with pytest.raises(ValueError, match="no node with that id"):
        queue_batch.find_prompt_node(g, "9", "text")
    assert queue_batch.find_prompt_node(g, "2", "text") == "2"


def test_server_down_is_a_clear_message(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# a comment\na dog barks\n\nrain starts\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = run("--workflow", ROOT / "workflows" / "api" / "omniforcing_t2av_5s.json", "--prompts", prompts,
            "--server", f"http://127.0.0.1:{port}")
    assert r.returncode == 2
    assert "cannot reach ComfyUI" in r.stderr and "Is it running?" in r.stderr


def test_ui_format_and_empty_prompt_files_are_refused(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n# nothing\n")
    r = run("--workflow", ROOT / "workflows" / "omniforcing_t2av_5s.json", "--prompts", empty)
    assert r.returncode == 2 and "UI-format" in r.stderr
    r = run("--workflow", ROOT / "workflows" / "api" / "omniforcing_t2av_5s.json", "--prompts", empty)
    assert r.returncode == 2 and "holds no prompts" in r.stderr


def test_rejection_lists_node_errors():
    text = queue_batch.describe_rejection({
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {"11": {"class_type": "OmniForcingSampler", "errors": [
            {"message": "Failed to validate prompt for output 24", "details": "width=100 is not a positive multiple of 32"}]}}})
    assert "node 11 (OmniForcingSampler)" in text and "width=100" in text
