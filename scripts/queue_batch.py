#!/usr/bin/env python3
"""Queue one ComfyUI job per prompt and collect the outputs.

    python scripts/queue_batch.py --workflow workflows/api/omniforcing_t2av_5s.json --prompts prompts.txt \\
        [--server http://127.0.0.1:8188] [--out outputs/] [--node 10] [--field text] [--seed 100]

`prompts.txt` holds one prompt per line (blank lines and lines starting with # are skipped). Each
prompt replaces the text input of the prompt node of an API-format graph (ComfyUI: Workflow > Export
(API)); by default the node titled "Prompt", else the only CLIP Text Encode / OmniForcing prompt
schedule node. Jobs are queued one after another and followed through /history; the output files
(videos, images, audio) are listed, or downloaded into --out. Standard library only.
Exit status: 0 all done, 1 some job rejected or failed, 2 the server cannot be reached / bad arguments.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PROMPT_TYPES = ("CLIPTextEncode", "OmniForcingPromptSchedule")


class ServerDown(RuntimeError):
    pass


class Client:
    def __init__(self, server: str, timeout: float = 30):
        self.server, self.timeout = server.rstrip("/"), timeout
        self.client_id = uuid.uuid4().hex

    def _open(self, req):
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerDown(f"cannot reach ComfyUI at {self.server} ({reason}). Is it running? Start it with "
                             f"'python main.py --listen 127.0.0.1 --port <port>' and pass --server "
                             f"http://127.0.0.1:<port>") from None

    def get_json(self, path: str):
        with self._open(self.server + path) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with self._open(self.server + path) as r:
            return r.read()

    def post_prompt(self, graph: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        req = urllib.request.Request(self.server + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with self._open(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:
                return e.code, {"error": {"message": text.decode(errors="replace")[:500]}}


def read_prompts(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def find_prompt_node(graph: dict, node: str | None, field: str) -> str:
    if node is not None:
        if node not in graph:
            raise ValueError(f"--node {node}: the graph has no node with that id (ids: {', '.join(graph)})")
        if field not in graph[node].get("inputs", {}):
            raise ValueError(f"--node {node} ({graph[node]['class_type']}) has no input '{field}'")
        return node
    cands = [k for k, v in graph.items() if v.get("class_type") in PROMPT_TYPES and
             isinstance(v.get("inputs", {}).get(field), str)]
    titled = [k for k in cands if graph[k].get("_meta", {}).get("title", "").lower() == "prompt"]
    if len(titled) == 1:
        return titled[0]
    if len(cands) == 1:
        return cands[0]
    raise ValueError(f"cannot tell which node takes the prompt ({len(cands)} candidates: {', '.join(cands) or 'none'}); "
                     f"pass --node <id> (and --field if its input is not '{field}')")


def describe_rejection(resp: dict) -> str:
    err = resp.get("error", {})
    lines = [f"  {err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".rstrip()]
    for nid, ne in (resp.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({ne.get('class_type', '?')}): {e.get('message', '')}: {e.get('details', '')}")
    return "\n".join(lines)


def wait_for(client: Client, prompt_id: str, timeout: float, poll: float = 0.5) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = client.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        entry = hist.get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error") and \
                entry["status"].get("completed") is not None:
            return entry
        time.sleep(poll)
    raise TimeoutError(f"job {prompt_id} did not finish within {timeout:.0f}s (still queued or running)")


def output_files(entry: dict) -> list[dict]:
    files = []
    for node_out in (entry.get("outputs") or {}).values():
        for key in ("images", "gifs", "videos", "audio"):
            for f in node_out.get(key, []) or []:
                if isinstance(f, dict) and "filename" in f:
                    files.append(f)
    return files


def execution_error(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type', '?')} (node {data.get('node_id')}): {data.get('exception_message', '')}".strip()
        if kind == "execution_interrupted":
            return "interrupted"
    return "failed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", required=True, type=Path, help="API-format graph (JSON)")
    ap.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    ap.add_argument("--node", default=None, help="id of the node whose text input gets the prompt")
    ap.add_argument("--field", default="text", help="that node's input name (default %(default)s)")
    ap.add_argument("--seed", type=int, default=None, help="set every 'seed' input to SEED + job index")
    ap.add_argument("--out", type=Path, default=None, help="download the output files into this folder")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for each job")
    args = ap.parse_args(argv)

    try:
        graph = json.loads(args.workflow.read_text(encoding="utf-8"))
        prompts = read_prompts(args.prompts)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "nodes" in graph and "links" in graph:
        print(f"error: {args.workflow} is a UI-format workflow; export it in API format (Workflow > Export (API)) "
              f"or use the copy in workflows/api/", file=sys.stderr)
        return 2
    if not prompts:
        print(f"error: {args.prompts} holds no prompts (one per line)", file=sys.stderr)
        return 2
    try:
        target = find_prompt_node(graph, args.node, args.field)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    client = Client(args.server)
    failures = 0
    try:
        client.get_json("/system_stats")
        for i, text in enumerate(prompts):
            g = copy.deepcopy(graph)
            g[target]["inputs"][args.field] = text
            if args.seed is not None:
                for node in g.values():
                    if isinstance(node.get("inputs", {}).get("seed"), int):
                        node["inputs"]["seed"] = args.seed + i
            label = f"[{i + 1}/{len(prompts)}] {text[:60]!r}"
            code, resp = client.post_prompt(g)
            if code != 200 or "prompt_id" not in resp:
                failures += 1
                print(f"{label}: rejected by the server (HTTP {code}):\n{describe_rejection(resp)}", file=sys.stderr)
                continue
            print(f"{label}: queued as {resp['prompt_id']}", flush=True)
            t0 = time.monotonic()
            try:
                entry = wait_for(client, resp["prompt_id"], args.timeout)
            except TimeoutError as e:
                failures += 1
                print(f"{label}: {e}", file=sys.stderr)
                continue
            if entry["status"]["status_str"] != "success":
                failures += 1
                print(f"{label}: failed: {execution_error(entry)}", file=sys.stderr)
                continue
            files = output_files(entry)
            print(f"{label}: done in {time.monotonic() - t0:.1f}s, {len(files)} file(s)")
            for f in files:
                rel = "/".join(p for p in (f.get("subfolder"), f["filename"]) if p)
                if args.out is None:
                    print(f"    {f.get('type', 'output')}/{rel}")
                    continue
                q = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                            "type": f.get("type", "output")})
                dest = args.out / f"{i + 1:03d}_{f['filename']}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(client.get_bytes(f"/view?{q}"))
                print(f"    -> {dest}")
    except ServerDown as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failures:
        print(f"{failures} of {len(prompts)} job(s) did not finish", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
