"""The import layers (issue 10): parsed from the source, every import counted (module level, inside
functions, `__import__`/`importlib.import_module` of a constant name).

core (omniforcing_core/, no ComfyUI) <- toy (omniforcing_core/toy/, the recipe at toy scale) <- nodes/
(ComfyUI adapters). No cycles anywhere; the core proper does not reach into the toy; a node module
uses another node module's helpers only, never its node classes (shared helpers live in
nodes/common.py and nodes/sharing.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("omniforcing_core", "nodes")
COMFY = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
         "latent_preview", "execution", "node_helpers"}
SHARED_NODE_HELPERS = {"nodes.common", "nodes.sharing"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


SOURCES = _sources()
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in SOURCES.items()}


def _absolute(module: str, level: int, target: str | None) -> str:
    """`from <.. target>` inside `module` -> an absolute dotted name (the pack root is the empty package)."""
    if level == 0:
        return target or ""
    package = module.split(".") if SOURCES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)] if level - 1 <= len(package) else []
    return ".".join([*base, *([target] if target else [])])


def imports_of(module: str) -> list[tuple[str, list[str], int]]:
    """(imported absolute name, names taken from it, line) for every import in `module`."""
    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_absolute(module, node.level, node.module), [a.name for a in node.names], node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("__import__", "importlib.import_module", "import_module")):
            out.append((node.args[0].value, [], node.lineno))
    return out


def project_edges(module: str) -> dict[str, int]:
    """Project modules `module` imports -> first line. `from pkg import sub` counts as importing `pkg.sub`."""
    edges: dict[str, int] = {}
    for target, names, line in imports_of(module):
        hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in SOURCES]
        if target in SOURCES and len(hits) < len(names or [None]):
            hits.append(target)
        for h in hits:
            if h != module:
                edges.setdefault(h, line)
    return edges


GRAPH = {m: project_edges(m) for m in SOURCES}


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next((w for w in it if w in graph), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _layer(module: str) -> str:
    if module.startswith("omniforcing_core.toy"):
        return "toy"
    return "core" if module.startswith("omniforcing_core") else "nodes"


def _where(module: str, line: int) -> str:
    return f"{SOURCES[module].relative_to(ROOT)}:{line}"


# -- the parser itself: these edges exist, so a parser that saw nothing would fail here -------------------

def test_the_parser_sees_relative_function_level_and_string_imports():
    assert "omniforcing_core.loader" in GRAPH["nodes.loader"]  # `from ..omniforcing_core.loader import ...`
    assert "omniforcing_core.toy.train" in GRAPH["omniforcing_core.toy.__main__"]  # inside cmd_train
    assert "omniforcing_core.toy.report" in GRAPH["omniforcing_core.toy.__main__"]  # __import__("...report")
    assert "nodes.common" in GRAPH["nodes.conditioning"]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


# -- the rules ------------------------------------------------------------------------------------------

def test_no_import_cycles():
    found = cycles(GRAPH)
    detail = [" <-> ".join(c) + ": " + ", ".join(f"{a} -> {b} ({_where(a, GRAPH[a][b])})"
                                                for a in c for b in GRAPH[a] if b in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


# The command line is the application on top of both: `demo` streams the embedded toy default.
COMMAND_LINE = {"omniforcing_core.cli", "omniforcing_core.demo", "omniforcing_core.__main__"}


def test_core_does_not_import_the_toy():
    bad = [f"{m} -> {t} ({_where(m, line)})" for m, es in GRAPH.items()
           if _layer(m) == "core" and m not in COMMAND_LINE for t, line in es.items() if _layer(t) == "toy"]
    assert not bad, "the core proper imports the toy recipe:\n" + "\n".join(bad)


def test_core_and_toy_import_no_comfyui():
    bad = [f"{m} imports {t} ({_where(m, line)})" for m in SOURCES if _layer(m) != "nodes"
           for t, _, line in imports_of(m) if t.split(".")[0] in COMFY]
    bad += [f"{m} -> {t} ({_where(m, line)})" for m, es in GRAPH.items() if _layer(m) != "nodes"
            for t, line in es.items() if _layer(t) == "nodes"]
    assert not bad, "omniforcing_core must run without ComfyUI:\n" + "\n".join(bad)


def _node_classes(module: str) -> set[str]:
    """Classes in `module` that are ComfyUI nodes (io.ComfyNode, directly or through a local base)."""
    found: set[str] = set()
    classes = [n for n in TREES[module].body if isinstance(n, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for c in classes:
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in c.bases}
            if c.name not in found and ("ComfyNode" in bases or bases & found):
                found.add(c.name)
                changed = True
    return found


def test_node_modules_share_helpers_not_nodes():
    assert "OmniForcingModelLoader" in _node_classes("nodes.loader")  # the detector sees node classes
    bad = []
    for m in SOURCES:
        if _layer(m) != "nodes" or m == "nodes":  # nodes/__init__.py is the registry: it lists every node
            continue
        for target, names, line in imports_of(m):
            for name in names or [None]:
                sub = f"{target}.{name}"
                if sub in SOURCES:  # `from . import stream`: the whole module
                    src, taken = sub, "the whole module"
                elif target in SOURCES and (name is None or name in _node_classes(target)):
                    src, taken = target, name or "the whole module"
                else:
                    continue
                if src != m and _layer(src) == "nodes" and src not in SHARED_NODE_HELPERS | {"nodes"}:
                    bad.append(f"{m} takes {taken} from {src} ({_where(m, line)})")
    assert not bad, "node modules import other modules' nodes:\n" + "\n".join(bad)


def test_mux_does_not_import_stream():
    assert "nodes.stream" not in GRAPH["nodes.mux"], \
        f"nodes/mux.py imports nodes/stream.py ({_where('nodes.mux', GRAPH['nodes.mux']['nodes.stream'])})"


def layer_edges() -> dict[tuple[str, str], int]:
    """Import counts between the layers (core, toy, nodes), for the summary and the rules above."""
    out: dict[tuple[str, str], int] = {}
    for m, es in GRAPH.items():
        for t in es:
            key = (_layer(m), _layer(t))
            out[key] = out.get(key, 0) + 1
    return out


def test_layer_edges_point_down_only():
    """core <- toy <- nodes (the command line, which uses both, aside)."""
    up = {k: n for k, n in layer_edges().items() if k in {("core", "nodes"), ("toy", "nodes")}}
    assert not up, f"imports from the core or toy into nodes/: {up}"
