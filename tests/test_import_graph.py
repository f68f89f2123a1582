"""The import graph of ``src/daralign`` keeps the rooms' order (docs/architecture.md, "What may
import what"): no circles, no module importing its own package's ``__init__`` back, and each room
importing only the rooms below it. Read from the source (every ``import``, function-level ones
included: a cycle hidden inside a function is still a cycle), so nothing is imported to check it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "daralign"

# room -> the rooms it may import (besides itself). The doors (api.py, cli.py) may import anything;
# the package root holds only ``__version__`` and lazy exports, so anything may read it.
MAY_IMPORT = {
    "core": set(),
    "rollout": {"core"},
    "objectives": {"core"},
    "annotators": {"core", "rollout"},  # fit-proxy samples the policy through the rollout room
    "evaluation": {"core", "rollout", "annotators"},
    "train": {"core", "rollout", "objectives", "annotators", "evaluation"},
    "compare": {"core", "rollout", "objectives", "annotators", "evaluation", "train"},
}


def module_names() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("daralign",) + path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the daralign modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    modules, graph = module_names(), defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level-1 packages
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "daralign":
                    continue
                for alias in node.names:
                    graph[name].add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.split(".")[0] == "daralign"}
    return graph


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "daralign"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def own_package_imports(graph: dict[str, set[str]]) -> list[str]:
    """A module importing its own package (or a package above it) back: the package's ``__init__``
    runs first and may import this very module."""
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if t != m and m.startswith(t + ".") and t != "daralign")


def imports_up(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if room(m) in MAY_IMPORT and room(t) not in MAY_IMPORT[room(m)] | {room(m), "daralign"})


def test_the_graph_is_read():
    graph = import_graph()
    assert "daralign.objectives.dar" in graph["daralign.objectives"]  # the package registers its built-ins
    assert "daralign.core.errors" in graph["daralign.train.loop"]


def test_no_circles():
    assert cycles(import_graph()) == []


def test_no_module_imports_its_own_package_back():
    assert own_package_imports(import_graph()) == []


def test_rooms_import_only_the_rooms_below():
    assert imports_up(import_graph()) == []


def test_each_check_catches_what_it_names():
    graph = {"daralign.a.x": {"daralign.a.y", "daralign.a"}, "daralign.a.y": {"daralign.a.x"},
             "daralign.core.z": {"daralign.train.loop", "daralign.core.errors"}, "daralign.api": {"daralign.train.loop"}}
    assert cycles(graph) == [["daralign.a.x", "daralign.a.y"]]
    assert own_package_imports(graph) == ["daralign.a.x -> daralign.a"]
    assert imports_up(graph) == ["daralign.core.z -> daralign.train.loop"]  # the doors may import anything
