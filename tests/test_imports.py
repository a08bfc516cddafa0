"""The package's shape: layers that follow the data's path, no cycles, no reaching into another
module's private names, modules and functions short enough to read (docs/architecture.md).

Layers, lowest first: ``config``, ``io``, ``noise`` (usable by all) → ``physics`` → ``data`` →
``nn`` → ``inference`` → ``analysis`` → ``evaluation`` → ``cli``. A module imports only its own
layer and those below it; the exceptions are listed by name below, so the lists can only shrink
(an entry that is no longer needed fails the test too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ceriakeras

PACKAGE = Path(ceriakeras.__file__).resolve().parent
LAYERS = {"config": 0, "io": 0, "noise": 0, "validate": 0, "modelcheck": 0, "physics": 1, "data": 2, "nn": 3, "inference": 4,
          "analysis": 5, "evaluation": 6, "cli": 7, "__init__": 0}
"""Layer of each top-level module or folder of the package."""
UPWARD_IMPORTS = {
    # export calibrates the model it writes on the consumers' own path (served model, columns)
    ("nn.export", "inference.served"),
    ("nn.export", "evaluation.calibration"),
    ("nn.plan", "inference.served"),
    ("nn.plan", "evaluation.plan"),
    # distillation learns from a served teacher, loaded the way its consumers load it
    ("nn.distill", "inference.served"),
}
"""(importer, imported) pairs allowed to point up the layers."""
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_MODULES: set[str] = set()
"""Modules still over :data:`MAX_MODULE_LINES` lines (to be split; the list can only shrink)."""
LONG_FUNCTIONS: set[str] = set()
"""Functions still over :data:`MAX_FUNCTION_LINES` lines (the list can only shrink)."""


def package_modules(package_dir: Path = PACKAGE) -> dict[str, Path]:
    """``{dotted name relative to the package: file}``, e.g. ``analysis.run``; a folder's
    ``__init__.py`` is named by the folder (``analysis``), the package's own by ``__init__``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str]]]:
    """``(imported module, names taken from it)`` for each import of module ``name``,
    at module level and inside functions alike; only the package's own modules."""
    root = PACKAGE.name
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = [root, *package[:len(package) - (node.level - 1)]]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [a.name for a in node.names]
            # from . import x, from ..analysis import run: x may be a module
            targets = [(f"{base}.{n}", []) for n in names
                       if f"{base}.{n}".removeprefix(root + ".") in modules]
            targets.append((base, [n for n in names
                                   if f"{base}.{n}".removeprefix(root + ".") not in modules]))
        else:
            continue
        for target, taken in targets:
            if not (target == root or target.startswith(root + ".")):
                continue
            dotted = target.removeprefix(root).lstrip(".") or "__init__"
            while dotted not in modules and "." in dotted:
                dotted = dotted.rsplit(".", 1)[0]
            if dotted != name and (dotted in modules):
                found.append((dotted, taken))
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: package modules it imports}``."""
    modules = package_modules()
    return {name: {m for m, _ in _imports(name, path, modules)} for name, path in modules.items()}


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


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_folders_relative_imports_and_function_level_imports():
    graph = import_graph()
    assert {"analysis.run", "inference.predict", "noise", "io.files"} <= set(graph)
    assert "inference.predict" in graph["analysis.run"]      # from ..inference.predict import …
    assert "analysis.resume" in graph["analysis.run"]        # from .resume import …
    assert "evaluation.calibration" in graph["nn.export"]    # inside export_run
    assert "config" in graph["io.files"]


def test_every_module_has_a_layer():
    assert not [m for m in package_modules() if m.split(".")[0] not in LAYERS]


def test_package_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_imports_point_down_the_layers():
    upward = {(a, b) for a, targets in import_graph().items() for b in targets
              if _layer(b) > _layer(a)}
    assert upward - UPWARD_IMPORTS == set(), "imports up the layers"
    assert UPWARD_IMPORTS - upward == set(), "listed exceptions no longer needed: remove them"


def test_inference_never_needs_training_or_evaluation():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("inference"):
            bad = {t for t in targets if t in ("nn.train", "nn.export") or t.startswith("evaluation")}
            assert not bad, f"{module} imports {bad}"


def test_no_module_imports_another_modules_private_names():
    modules = package_modules()
    private = [f"{name} takes {taken} from {target}"
               for name, path in modules.items()
               for target, names in _imports(name, path, modules)
               for taken in names if taken.startswith("_") and not taken.startswith("__")]
    assert not private


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_modules_and_functions_stay_short(name):
    path = package_modules()[name]
    text = path.read_text(encoding="utf-8")
    n_lines = len(text.splitlines())
    if name in LONG_MODULES:
        assert n_lines > MAX_MODULE_LINES, f"{name} is short now: drop it from LONG_MODULES"
    else:
        assert n_lines <= MAX_MODULE_LINES, f"{name} has {n_lines} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            qualified = f"{name}.{node.name}"
            if qualified in LONG_FUNCTIONS:
                assert length > MAX_FUNCTION_LINES, f"{qualified} is short now: drop it"
            else:
                assert length <= MAX_FUNCTION_LINES, f"{qualified} has {length} lines"
