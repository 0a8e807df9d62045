"""The house rules of the tree, checked on the source: import direction, no cycles, module size.

Imports point one way (pipelines -> components -> worker); the dev-only helpers in
``pipelines/dev/`` are imported only by dev entry points, benchmarks and tests; no module is
part of an import cycle (deferred imports inside functions count too); no product module is over
500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("worker", "components", "pipelines")
# Higher layers may import lower ones, never the reverse.
LAYER = {"pipelines": 2, "components": 1, "worker": 0}
DEV = "pipelines.dev"
# Dev entry points: the CLI's `run --local` and `make-model` subcommands.
DEV_IMPORTERS = ("pipelines.dev", "pipelines.__main__")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``path`` imports, anywhere in the file, resolved to the longest known name."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = product_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def test_imports_point_one_way(graph):
    backwards = [
        f"{importer} -> {imported}"
        for importer, imports in graph.items()
        for imported in imports
        if LAYER[imported.split(".")[0]] > LAYER[importer.split(".")[0]]
    ]
    assert backwards == []


def test_only_dev_entry_points_import_the_dev_helpers(graph):
    offenders = [
        f"{importer} -> {imported}"
        for importer, imports in graph.items()
        for imported in imports
        if imported.startswith(DEV) and not importer.startswith(DEV_IMPORTERS)
    ]
    assert offenders == []


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    # A package's __init__ importing its own submodules is not a cycle of meaning, but it is one of
    # import order; the rule is strict: none.
    assert cycles == []


def test_no_product_module_is_over_the_size_limit():
    too_long = {
        name: n
        for name, path in product_modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert too_long == {}


def test_the_checker_sees_a_backward_import(tmp_path):
    # The checks above pass only if the parser finds imports at all: a planted backward import is found.
    planted = tmp_path / "worker" / "planted.py"
    planted.parent.mkdir()
    planted.write_text("def f():\n    from components.launch import launch\n")
    found = imported_modules(planted, "worker.planted", {"components.launch", "worker.planted"})
    assert found == {"components.launch"}
