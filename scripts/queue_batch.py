#!/usr/bin/env python3
"""Queue one ComfyUI job per prompt and collect the outputs.

    python scripts/queue_batch.py --workflow workflows/api/omniforcing_t2av_5s.json --prompts prompts.txt \\
        [--server http://127.0.0.1:8188] [--out outputs/] [--parallel 2] [--node 10] [--field text] [--seed 100]

`prompts.txt` holds one prompt per line (UTF-8; blank lines and lines starting with # are skipped). Each
prompt replaces the text input of the prompt node of an API-format graph (ComfyUI: Workflow > Export
(API)): by default the node titled "Prompt", else the only CLIP Text Encode / OmniForcing prompt schedule /
OmniForcing toy text node. Up to --parallel jobs are kept queued and followed through /history; the
output files (videos, images, audio) are listed, or downloaded into --out as <job>_<name>. The first
graph the server rejects stops the batch (its node errors are shown once). Connection failures, timeouts
and server errors (5xx) are retried --retries times. A summary lists every job at the end, also after
Ctrl-C. The server is not trusted: files are only ever written directly inside --out.
Standard library only.
Exit status: 0 all jobs done, 1 some job rejected / failed / not run, 2 bad arguments or the server cannot
be reached at the start, 130 interrupted.
"""
from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_TYPES = ("CLIPTextEncode", "OmniForcingPromptSchedule", "OmniForcingToyTextEncode")
PROMPT_FIELDS = ("text", "prompt")
OUTPUT_KEYS = ("images", "gifs", "videos", "audio")
# Failures that may pass if we ask again. RemoteDisconnected is a ConnectionResetError.
TRANSIENT = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
             TimeoutError, http.client.IncompleteRead)


class ServerDown(Exception):
    """The server cannot be reached (after the retries)."""


class BadReply(Exception):
    """The server answered, but not with something usable."""


class UnsafeName(ValueError):
    """A file name from the server that could write outside --out."""


def clean(text, limit: int = 200) -> str:
    """Server text made safe for a terminal: no escape sequences, bounded length."""
    text = str(text)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- talking to the server ----------------------------------------------------------------------------------

class Client:
    def __init__(self, server: str, timeout: float = 30, retries: int = 3, retry_delay: float = 0.5):
        self.server, self.timeout = server, timeout
        self.retries, self.retry_delay = retries, retry_delay
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, data: bytes | None = None, consume=lambda r: r.read()):
        """Send a request and hand the response to `consume`, retrying transient failures.

        A POST is only re-sent when it surely was not queued (connection refused, or a 5xx answer):
        after a reset or a timeout the job may already be in the queue and would run twice."""
        url = self.server + path
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return consume(r)
            except urllib.error.HTTPError as e:
                if e.code < 500 or last:
                    raise
                e.close()
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                unsent = isinstance(reason, ConnectionRefusedError)
                if last or not isinstance(reason, TRANSIENT) or (data is not None and not unsent):
                    raise self._down(reason, path, sent=data is not None and not unsent) from None
            time.sleep(self.retry_delay * 2 ** attempt)

    def _down(self, reason, path: str, sent: bool) -> ServerDown:
        if isinstance(reason, TimeoutError):
            what = f"ComfyUI at {self.server} did not answer {path} within {self.timeout:g}s"
        else:
            what = f"cannot reach ComfyUI at {self.server} ({clean(reason)})"
        if sent:
            return ServerDown(f"{what}; the job may or may not have been queued")
        return ServerDown(f"{what}. Is it running? Start it with 'python main.py --listen 127.0.0.1 --port <port>' "
                          f"and pass --server http://127.0.0.1:<port>")

    def get_json(self, path: str):
        try:
            body, ctype = self._request(path, consume=lambda r: (r.read(), r.headers.get("Content-Type", "")))
        except urllib.error.HTTPError as e:
            raise BadReply(f"HTTP {e.code} from {path}: {clean(read_error(e), 120)}") from None
        return parse_json(body, ctype, path)

    def download(self, path: str, fh) -> None:
        def consume(r):
            fh.seek(0)
            fh.truncate()  # a retry starts over
            while chunk := r.read(1 << 20):
                fh.write(chunk)
        try:
            self._request(path, consume=consume)
        except urllib.error.HTTPError as e:
            raise BadReply(f"HTTP {e.code} from {clean(path, 120)}") from None

    def post_prompt(self, graph: dict) -> tuple[int, object]:
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        try:
            return 200, parse_json(self._request("/prompt", data=body), "", "/prompt")
        except urllib.error.HTTPError as e:
            text = read_error(e)
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"error": {"message": clean(text, 500)}}


def read_error(e: urllib.error.HTTPError) -> str:
    try:
        return e.read(4096).decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        return ""


def parse_json(body: bytes, ctype: str, path: str):
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        head = clean(body[:80].decode("utf-8", errors="replace"), 80)
        raise BadReply(f"{path} answered {ctype or 'something'} instead of JSON ({head!r}); "
                       f"is --server the address of ComfyUI?") from None


def check_server_url(url: str) -> str:
    hint = f" (did you mean http://{url}?)" if re.fullmatch(r"[\w.-]+:\d+", url) else ""
    bad = ValueError(f"--server {url!r} is not an address like http://127.0.0.1:8188{hint}")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise bad
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    return url.rstrip("/")


# -- the graph and the prompts ------------------------------------------------------------------------------

def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each prompt line; utf-8-sig drops a BOM some editors write."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         f"save it as UTF-8") from None
    lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    return [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]


def text_input(node, field: str | None) -> str | None:
    """The name of the node's string input that takes the prompt (`field`, else text / prompt)."""
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return None
    return next((n for n in ([field] if field else PROMPT_FIELDS) if isinstance(inputs.get(n), str)), None)


def title(node) -> str:
    meta = node.get("_meta") if isinstance(node, dict) else None
    return str(meta.get("title", "")) if isinstance(meta, dict) else ""


def find_prompt_node(graph: dict, node: str | None = None, field: str | None = None) -> tuple[str, str]:
    """(node id, input name) that gets the prompt: --node, else the node titled "Prompt", else the
    only node of a prompt type."""
    if node is not None:
        if node not in graph:
            raise ValueError(f"--node {node}: the graph has no node with that id (ids: {', '.join(graph)})")
        inputs = graph[node].get("inputs", {}) if isinstance(graph[node], dict) else {}
        name = field or next((n for n in PROMPT_FIELDS if n in inputs), None)
        if name not in inputs:
            raise ValueError(f"--node {node} ({graph[node].get('class_type', '?')}) has no input "
                             f"'{field or ' or '.join(PROMPT_FIELDS)}' (inputs: {', '.join(inputs) or 'none'})")
        return node, name
    fields = {k: text_input(v, field) for k, v in graph.items()}
    titled = [k for k, v in graph.items() if fields[k] and title(v).strip().lower() == "prompt"]
    if len(titled) == 1:
        return titled[0], fields[titled[0]]
    typed = [k for k, v in graph.items() if fields[k] and v.get("class_type") in PROMPT_TYPES]
    if len(typed) == 1:
        return typed[0], fields[typed[0]]
    raise ValueError(f"cannot tell which node takes the prompt ({len(typed)} candidates: "
                     f"{', '.join(typed) or 'none'}); title it \"Prompt\" or pass --node <id> (and --field if its input is not 'text')")


def load_graph(path: Path) -> dict:
    try:
        graph = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as e:
        raise ValueError(f"{path} is not a JSON workflow ({e})") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise ValueError(f"{path} is a UI-format workflow; export it in API format (Workflow > Export (API)) "
                         f"or use the copy in workflows/api/")
    if not isinstance(graph, dict) or not all(isinstance(v, dict) for v in graph.values()):
        raise ValueError(f"{path} is not an API-format graph ({{node id: {{class_type, inputs}}}})")
    return graph


def describe_rejection(resp) -> str:
    resp = resp if isinstance(resp, dict) else {"error": {"message": str(resp)}}
    err = resp.get("error")
    err = err if isinstance(err, dict) else {"message": err or ""}
    lines = [clean(f"  {err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".rstrip(), 500)]
    node_errors = resp.get("node_errors")
    for nid, ne in (node_errors.items() if isinstance(node_errors, dict) else ()):
        ne = ne if isinstance(ne, dict) else {}
        for e in ne.get("errors") or []:
            e = e if isinstance(e, dict) else {"message": e}
            lines.append(clean(f"  node {nid} ({ne.get('class_type', '?')}): {e.get('message', '')}: "
                               f"{e.get('details', '')}", 500))
    return "\n".join(lines)


# -- the outputs ---------------------------------------------------------------------------------------------

def output_files(entry: dict) -> list[dict]:
    outputs = entry.get("outputs")
    files = []
    for node_out in (outputs.values() if isinstance(outputs, dict) else ()):
        for key in OUTPUT_KEYS:
            items = node_out.get(key) if isinstance(node_out, dict) else None
            files += [f for f in (items if isinstance(items, list) else ()) if isinstance(f, dict) and "filename" in f]
    return files


def execution_error(entry: dict) -> str:
    for msg in entry.get("status", {}).get("messages") or []:
        kind, data = (msg if isinstance(msg, list) and len(msg) == 2 else (None, None))
        data = data if isinstance(data, dict) else {}
        if kind == "execution_error":
            return clean(f"{data.get('node_type', '?')} (node {data.get('node_id')}): "
                         f"{data.get('exception_message', '')}".strip())
        if kind == "execution_interrupted":
            return "interrupted"
    return "failed"


def safe_part(value, what: str, allow_dirs: bool) -> str:
    """A server-given file name or subfolder, refused if it could point anywhere unexpected."""
    if not isinstance(value, str) or "\0" in value or any(not c.isprintable() for c in value):
        raise UnsafeName(f"unsafe {what} from the server: {clean(repr(value), 120)}")
    parts = re.split(r"[\\/]", value)
    absolute = value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value)
    if absolute or ".." in parts or (not allow_dirs and len(parts) > 1) or (not allow_dirs and not value.strip(".")):
        raise UnsafeName(f"unsafe {what} from the server: {clean(repr(value), 120)}")
    return value


def destination(out: Path, job_index: int, f: dict, taken: set) -> tuple[Path, str]:
    """Where a server file goes (directly inside `out`, which is resolved) and its /view query."""
    name = safe_part(f.get("filename"), "file name", allow_dirs=False)
    subfolder = safe_part(f.get("subfolder") or "", "subfolder", allow_dirs=True)
    kind = safe_part(f.get("type") or "output", "folder type", allow_dirs=False)
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    dest, n = out / f"{job_index:03d}_{name}", 1
    while dest in taken:  # two outputs of one job with the same name (different subfolders)
        n += 1
        dest = out / f"{job_index:03d}_{stem}_{n}{dot}{ext}"
    # `name` has no separator, so only the folder needs resolving; a symlink named like `dest` is
    # replaced by save(), never followed
    if dest.parent != out or dest.parent.resolve() != out:
        raise UnsafeName(f"unsafe file name from the server: {clean(repr(name), 120)}")
    taken.add(dest)
    return dest, urllib.parse.urlencode({"filename": name, "subfolder": subfolder, "type": kind})


def save(client: Client, query: str, dest: Path) -> None:
    """Download into a fresh temporary file next to `dest`, then rename it over `dest`: the rename
    replaces a symlink that is already there instead of writing through it."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; outputs should look like any other file
        with os.fdopen(fd, "wb") as fh:
            client.download(f"/view?{query}", fh)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = current_umask()


# -- the batch -----------------------------------------------------------------------------------------------

@dataclass
class Job:
    index: int                   # 1-based
    line: int                    # line of the prompt file
    text: str
    status: str = "waiting"      # waiting, queued, done, failed, rejected, skipped
    prompt_id: str = ""
    files: list = field(default_factory=list)
    note: str = ""
    queued_at: float = 0.0

    def label(self, total: int) -> str:
        return f"[{self.index}/{total}] {self.text[:60]!r}"


class Batch:
    def __init__(self, client: Client, graph: dict, target: tuple[str, str], jobs: list[Job], args):
        self.client, self.graph, self.target, self.jobs, self.args = client, graph, target, jobs, args
        self.out = args.out.resolve() if args.out else None
        self.taken: set = set()

    def graph_for(self, job: Job) -> dict:
        g = copy.deepcopy(self.graph)
        node, name = self.target
        g[node]["inputs"][name] = job.text
        if self.args.seed is not None:
            for n in g.values():
                if isinstance(n.get("inputs", {}).get("seed"), int):
                    n["inputs"]["seed"] = self.args.seed + job.index - 1
        return g

    def run(self) -> None:
        """Keep up to --parallel jobs queued, follow each through /history, stop queueing at a rejection."""
        waiting, active = deque(self.jobs), []
        while waiting or active:
            while waiting and len(active) < self.args.parallel:
                job = waiting.popleft()
                if not self.submit(job):
                    self.skip(waiting, f"not queued: the server rejected job {job.index}")
                    break
                active.append(job)
            for job in list(active):
                if self.follow(job):
                    active.remove(job)
            if active:
                time.sleep(self.args.poll)

    def skip(self, jobs, note: str) -> None:
        for j in jobs:
            j.status, j.note = "skipped", note
        jobs.clear()

    def submit(self, job: Job) -> bool:
        job.status = "queued"  # from here on it may be on the server, whatever comes back
        try:
            code, resp = self.client.post_prompt(self.graph_for(job))
        except BadReply as e:
            code, resp = 200, {"error": {"message": str(e)}}
        except ServerDown as e:
            job.status, job.note = "failed", str(e)
            raise
        pid = resp.get("prompt_id") if isinstance(resp, dict) else None
        if code == 200 and isinstance(pid, str) and 0 < len(pid) <= 200:
            job.prompt_id, job.queued_at = pid, time.monotonic()
            print(f"{job.label(len(self.jobs))}: queued as {clean(pid)}", flush=True)
            return True
        self.reject(job, code, resp)
        return False

    def reject(self, job: Job, code: int, resp) -> None:
        job.status = "rejected"
        errors = resp.get("node_errors") if isinstance(resp, dict) else None
        only_prompt = isinstance(errors, dict) and set(errors) == {self.target[0]}
        job.note = f"HTTP {code}" + (" (an error in the prompt node: check this line)" if only_prompt else "")
        details = describe_rejection(resp)
        print(f"{job.label(len(self.jobs))}: rejected by the server (HTTP {code}), line {job.line} of the prompts; "
              f"the remaining prompts are not queued:\n{details}", file=sys.stderr, flush=True)

    def follow(self, job: Job) -> bool:
        """Check one queued job; True once it is finished (done or failed)."""
        try:
            hist = self.client.get_json(f"/history/{urllib.parse.quote(job.prompt_id, safe='')}")
        except BadReply as e:
            return self.fail(job, str(e))
        entry = hist.get(job.prompt_id) if isinstance(hist, dict) else None
        status = entry.get("status") if isinstance(entry, dict) else None
        if not (isinstance(status, dict) and status.get("status_str") in ("success", "error")
                and status.get("completed") is not None):
            if time.monotonic() - job.queued_at > self.args.timeout:
                return self.fail(job, f"did not finish within {self.args.timeout:g}s (still queued or running)")
            return False
        if status["status_str"] != "success":
            return self.fail(job, execution_error(entry))
        self.collect(job, output_files(entry))
        return True

    def fail(self, job: Job, why: str) -> bool:
        job.status, job.note = "failed", why
        print(f"{job.label(len(self.jobs))}: failed: {why}", file=sys.stderr, flush=True)
        return True

    def collect(self, job: Job, files: list[dict]) -> None:
        took = time.monotonic() - job.queued_at
        print(f"{job.label(len(self.jobs))}: finished in {took:.1f}s, {len(files)} file(s)", flush=True)
        problems = []
        for f in files:
            try:
                job.files.append(self.fetch(job, f))
                print(f"    -> {job.files[-1]}", flush=True)
            except (UnsafeName, BadReply, OSError) as e:
                problems.append(clean(e))
                print(f"    ! {problems[-1]}", file=sys.stderr, flush=True)
        job.status, job.note = ("failed", "; ".join(problems)) if problems else ("done", "")

    def fetch(self, job: Job, f: dict) -> str:
        """Download one output file (or just name it without --out); returns what to show."""
        if self.out is None:
            name = safe_part(f.get("filename"), "file name", allow_dirs=False)
            sub = safe_part(f.get("subfolder") or "", "subfolder", allow_dirs=True)
            kind = safe_part(f.get("type") or "output", "folder type", allow_dirs=False)
            return "/".join(p for p in (kind, sub, name) if p)
        dest, query = destination(self.out, job.index, f, self.taken)
        save(self.client, query, dest)
        return str(dest)


STATUSES = ("done", "failed", "rejected", "skipped", "queued", "waiting")


def outcome(job: Job) -> str:
    if job.note:
        return job.note
    if job.status == "done":
        return ", ".join(job.files) or "no files"
    if job.status == "queued":
        return f"still on the server as {job.prompt_id}" if job.prompt_id else "may have been queued"
    return "not queued"


def summary(jobs: list[Job]) -> None:
    counts = [(sum(j.status == s for j in jobs), s) for s in STATUSES]
    print(f"\nSummary: {len(jobs)} job(s): " + ", ".join(f"{n} {s}" for n, s in counts if n))
    for j in jobs:
        head = j.text if len(j.text) <= 40 else j.text[:39] + "…"
        print(f"  #{j.index:<3} {j.status:<9} line {j.line:<4} {head!r}: {outcome(j)}")
    sys.stdout.flush()


# -- the command line ------------------------------------------------------------------------------------------

def parse_args(argv):
    intro, _, rest = __doc__.split("\n\n", 2)
    ap = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", required=True, type=Path, help="API-format graph (JSON)")
    ap.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    ap.add_argument("--node", default=None, help="id of the node whose text input gets the prompt")
    ap.add_argument("--field", default=None, help="that node's input name (default: text, else prompt)")
    ap.add_argument("--seed", type=int, default=None, help="set every 'seed' input to SEED + job index")
    ap.add_argument("--out", type=Path, default=None, help="download the output files into this folder")
    ap.add_argument("--parallel", type=int, default=1, help="jobs kept queued at once (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for each job once queued")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between /history checks")
    ap.add_argument("--http-timeout", type=float, default=30, help="seconds to wait for one HTTP answer")
    ap.add_argument("--retries", type=int, default=3, help="retries of a transient failure (default %(default)s)")
    ap.add_argument("--retry-delay", type=float, default=0.5, help="first retry delay, doubled each time")
    args = ap.parse_args(argv)
    for name in ("parallel", "timeout", "http_timeout"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("poll", "retries", "retry_delay"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must not be negative")
    return args


def prepare(args) -> tuple[dict, tuple[str, str], list[Job], str]:
    """Everything checked before contacting the server; ValueError / OSError carry the message."""
    server = check_server_url(args.server)
    graph = load_graph(args.workflow)
    prompts = read_prompts(args.prompts)
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompts (one per line)")
    target = find_prompt_node(graph, args.node, args.field)
    if args.out is not None:
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} exists and is not a folder")
        args.out.mkdir(parents=True, exist_ok=True)
    return graph, target, [Job(i, n, t) for i, (n, t) in enumerate(prompts, 1)], server


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs: list[Job] = []
    try:
        try:
            graph, target, jobs, server = prepare(args)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        client = Client(server, args.http_timeout, args.retries, args.retry_delay)
        try:
            client.get_json("/system_stats")
        except (ServerDown, BadReply) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            Batch(client, graph, target, jobs, args).run()
        except ServerDown as e:
            print(f"error: {e}", file=sys.stderr)
            lost = [j for j in jobs if j.status in ("queued", "waiting")]
            for j in lost:
                j.status, j.note = ("failed", "lost contact with the server") if j.status == "queued" else \
                    ("skipped", "not queued: lost contact with the server")
    except KeyboardInterrupt:
        queued = sum(j.status == "queued" for j in jobs)
        print(f"\ninterrupted{f'; {queued} queued job(s) keep running on the server' if queued else ''}",
              file=sys.stderr)
        summary(jobs)
        return 130
    summary(jobs)
    return 0 if all(j.status == "done" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
