"""Project level (the source tree, every package): the import graph of the project's packages:
layers one way (``models`` <- ``store`` <- ``service``, ``training``, the last two never
importing each other), no cycle between any two modules, and no private API of BentoML. Every
import statement counts, those inside functions and under ``TYPE_CHECKING`` included: a cycle
hidden in a function body is still a cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support.paths import ROOT

#: Each package may import those of a lower rank and itself, nothing else.
LAYERS = {"models": 0, "store": 1, "service": 2, "training": 2}
PROJECT_PACKAGES = (*LAYERS, "bench", "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "fixtures" not in path.parts:
                modules[module_name(path)] = path
    return modules


def imported_names(path: Path, name: str) -> Iterator[tuple[str, int]]:
    """Every module name an import statement in ``path`` refers to (``from X import Y`` yields
    ``X.Y`` and ``X``: Y may be a module or a name in X), with its line."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield source, node.lineno
            for alias in node.names:
                yield f"{source}.{alias.name}", node.lineno


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between project modules, and every import of a private BentoML module."""
    modules = project_modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        for target, line in imported_names(path, name):
            if target == "bentoml._internal" or target.startswith("bentoml._internal."):
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            if target in modules and target != name:
                edges[name].add(target)
    return edges, private


def test_the_graph_sees_the_imports_it_must_see() -> None:
    edges, _ = import_graph()
    assert "store.registry" in edges["store.local.registry"]  # relative, from a subpackage
    assert "models.onnx_io" in edges["store.registry"]  # absolute
    assert "store.local" in edges["store.state"]  # inside a function body


def test_layers_import_one_way() -> None:
    edges, _ = import_graph()
    wrong = []
    for source, targets in edges.items():
        layer = source.split(".")[0]
        if layer not in LAYERS:
            continue
        for target in targets:
            other = target.split(".")[0]
            if other != layer and (other not in LAYERS or LAYERS[other] >= LAYERS[layer]):
                wrong.append(f"{source} imports {target}")
    assert wrong == [], ("imports against the layers (models <- store <- service, training):\n"
                         + "\n".join(sorted(wrong)))


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the graph's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert sorted(c for c in strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    edges, _ = import_graph()
    cycles = [c for c in strongly_connected(edges) if len(c) > 1]
    assert cycles == [], f"modules that import each other (directly or through others): {cycles}"


def test_no_private_bentoml_api() -> None:
    _, private = import_graph()
    assert private == [], "\n".join(private)
