"""The house rules a newcomer relies on, checked on the package's source (docs/layout.md describes the rooms).

- imports only point down: no import cycle between modules, counting imports inside functions and under
  TYPE_CHECKING, and none between rooms (a room is a top-level module or a sub-package of harness/);
- an import inside a function says why on its line (`# lazy: ...`, a measured startup cost);
- no module over 400 lines, no class over 320, no function over 80 (as ruff's formatter writes them, at 120 columns).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "harness"
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 400, 320, 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _targets(node: ast.AST, current: str) -> list[str]:
    """Harness modules an import statement loads (a `from pkg import name` of a submodule counts as that module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = current.split(".")
        is_pkg = MODULES[current].name == "__init__.py"
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    out = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
    return [m for m in out if m in MODULES]


def _scan():
    """(module -> modules it imports, imports inside functions without a reason, long modules, long functions)."""
    edges, unexplained, long_modules, long_functions = defaultdict(set), [], [], []
    for name, path in MODULES.items():
        src = path.read_text()
        lines = src.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PKG.parent)}: {len(lines)} lines")

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = child.end_lineno - child.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long_functions.append(f"{path.relative_to(PKG.parent)}:{child.lineno} {child.name}: {n} lines")
                    visit(child, True)
                elif isinstance(child, (ast.Import, ast.ImportFrom)):
                    edges[name].update(t for t in _targets(child, name) if t != name)
                    statement = lines[child.lineno - 1 : child.end_lineno]  # the formatter may wrap it
                    if in_function and not any("# lazy:" in line for line in statement):
                        unexplained.append(
                            f"{path.relative_to(PKG.parent)}:{child.lineno}: {lines[child.lineno - 1].strip()}"
                        )
                else:
                    visit(child, in_function)

        visit(ast.parse(src), False)
    return edges, unexplained, long_modules, long_functions


EDGES, UNEXPLAINED, LONG_MODULES, LONG_FUNCTIONS = _scan()


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_between_modules():
    assert _cycles(EDGES) == []


def test_no_import_cycle_between_rooms():
    rooms: dict[str, set[str]] = defaultdict(set)
    for a, targets in EDGES.items():
        rooms[_room(a)].update(_room(b) for b in targets if _room(b) != _room(a))
    cycles = _cycles(rooms)
    arrows = [
        f"{a} -> {b}"
        for c in cycles
        for a in sorted(EDGES)
        for b in sorted(EDGES[a])
        if _room(a) in c and _room(b) in c and _room(a) != _room(b)
    ]
    assert cycles == [], "arrows between rooms that import each other:\n" + "\n".join(arrows)


def test_every_import_inside_a_function_says_why():
    assert UNEXPLAINED == []


def test_no_module_over_400_lines():
    assert LONG_MODULES == []


def test_no_function_over_80_lines():
    assert LONG_FUNCTIONS == []


@pytest.mark.parametrize("module", ["harness.config", "harness.cli"])
def test_the_parser_does_not_load_peft_lm_eval_or_mlflow(module):
    """`harness --help`, `harness methods` and a bad flag answer without loading the heavy libraries (see cli.py)."""
    code = f"import sys, {module}; print(sorted(m for m in ('peft', 'lm_eval', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nothing_outside_the_methods_package_imports_a_method_s_internals():
    """A method's modules are its own: outside harness/methods/ the harness reads methods through the registry and
    the verbs of Method (`from harness.methods import METHODS, Method, ...`), never `harness.methods.<module>`."""
    reaching = sorted(
        f"{a} imports {b}"
        for a, targets in EDGES.items()
        if not a.startswith("harness.methods")
        for b in targets
        if b.startswith("harness.methods.")
    )
    assert reaching == [], "\n".join(reaching)


def test_no_class_over_320_lines():
    """A class that outgrows this holds two jobs (the sequence runner's loop and its commits live apart)."""
    long_classes = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                n = node.end_lineno - node.lineno + 1
                long_classes.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {n} lines")
    assert long_classes == []
