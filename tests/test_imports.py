"""The package's import graph: module imports point one way (docs/architecture.md), no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import ceriakeras

PACKAGE = Path(ceriakeras.__file__).resolve().parent


def import_graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` from every ``*.py`` file's syntax tree,
    counting imports at module level and inside functions alike (``__init__`` for the package)."""
    modules = {p.stem for p in package_dir.glob("*.py")}
    name = package_dir.name
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    base = node.module
                elif node.level == 1:
                    base = f"{name}.{node.module}" if node.module else name
                else:
                    continue
                if base == name:  # from . import x / from ceriakeras import x
                    targets = [f"{name}.{a.name}" for a in node.names]
                else:
                    targets = [base]
            for target in targets:
                parts = target.split(".")
                if parts[0] != name:
                    continue
                module = parts[1] if len(parts) > 1 and parts[1] in modules else "__init__"
                if module != path.stem:
                    graph[path.stem].add(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, …, a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "config" in graph["io"]                    # module level: from .config import …
    assert "calibration" in graph["export"]           # inside export_run
    assert {"scoring", "calibration"} <= set(graph)


def test_package_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_calibration_and_its_data_loop_stay_below_the_stages_that_use_them():
    graph = import_graph()
    below = {"export", "analyze", "evaluate", "cli"}
    for module in ("calibration", "scoring", "modelinfo", "columns"):
        assert not graph[module] & below, f"{module} imports {graph[module] & below}"
