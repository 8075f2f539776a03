"""The import graph of the project's own modules (mtcls/, pipelines/, jobs/), read with ``ast``.

Rules (docs/DESIGN.md, "Architecture"): imports point one way, jobs -> pipelines -> mtcls; no
import cycles between modules, counting imports inside functions too; no cycles between the
subpackages of pipelines; scoring, evaluation, drift and the sinks never import training; jobs never
import each other. Imports under ``if TYPE_CHECKING:`` never run and are left out. An import of a
submodule is an edge to that module only (not to the packages above it, whose ``__init__`` runs
first: counting those would make every package that imports its own submodules a cycle).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("mtcls", "pipelines", "jobs")


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``line``; ``in_function``: inside a function body."""

    importer: str
    imported: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = " (inside a function)" if self.in_function else ""
        return f"{self.importer} -> {self.imported} (line {self.line}){where}"


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project (packages by their ``__init__``)."""
    modules = {}
    for top in TOP_LEVEL:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _walk_imports(other, in_function)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _walk_imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _resolve(name: str, modules: dict[str, Path]) -> Optional[str]:
    """The project module ``name`` refers to (the nearest enclosing module for a name inside one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def module_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import of a project module by a project module."""
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, in_function in _walk_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*parts, *([base] if base else [])])
                # ``from package import submodule`` imports the submodule; ``from module import name`` the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    edges.append(Edge(name, resolved, node.lineno, in_function))
    return edges


MODULES = project_modules()
EDGES = module_edges(MODULES)


def graph(edges: list[Edge], node_of=lambda module: module) -> dict[str, dict[str, Edge]]:
    """``{node: {imported node: first edge}}``, nodes given by ``node_of`` (None: left out)."""
    out: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        a, b = node_of(edge.importer), node_of(edge.imported)
        if a is not None and b is not None and a != b:
            out.setdefault(a, {}).setdefault(b, edge)
    return out


def cycles(g: dict[str, dict[str, Edge]]) -> list[tuple[list[str], list[Edge]]]:
    """Per strongly connected component of more than one node: its nodes, and one cycle through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(set(g) | {w for targets in g.values() for w in targets}):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        start = min(component)
        found.append((sorted(component), _path(g, start, lambda node: node == start, within=component, first_step=True) or []))
    return found


def _path(g: dict[str, dict[str, Edge]], start: str, is_goal, within: Optional[set[str]] = None,
          first_step: bool = False) -> Optional[list[Edge]]:
    """The shortest chain of edges from ``start`` to a node ``is_goal`` accepts (breadth first)."""
    queue = deque([(start, [])])
    seen = set() if first_step else {start}
    while queue:
        node, chain = queue.popleft()
        for target, edge in sorted(g.get(node, {}).items()):
            if within is not None and target not in within:
                continue
            if is_goal(target):
                return [*chain, edge]
            if target not in seen:
                seen.add(target)
                queue.append((target, [*chain, edge]))
    return None


def _describe(chains: list[list[Edge]]) -> str:
    return "\n".join("  " + "\n    ".join(str(e) for e in chain) for chain in chains)


def _describe_cycles(found: list[tuple[list[str], list[Edge]]]) -> str:
    return "\n".join(f"  between {', '.join(nodes)}, e.g.\n    " + "\n    ".join(str(e) for e in chain) for nodes, chain in found)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def pipelines_package(module: str) -> Optional[str]:
    """The node of a pipelines module at package level: its subpackage, or the shared module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipelines" else None


def test_the_graph_is_read():
    assert "mtcls.heads" in MODULES and "pipelines.train.loop" in MODULES and "jobs.score" in MODULES
    assert any(e.importer == "mtcls.heads" and e.imported == "mtcls.kinds" for e in EDGES)
    assert any(e.in_function for e in EDGES)


def test_no_import_cycle_between_modules_at_import_time():
    found = cycles(graph([e for e in EDGES if not e.in_function]))
    assert not found, "import cycles (module level):\n" + _describe_cycles(found)


def test_no_import_cycle_between_modules_counting_imports_inside_functions():
    found = cycles(graph(EDGES))
    assert not found, "import cycles (imports inside functions counted):\n" + _describe_cycles(found)


@pytest.mark.parametrize("lower, upper", [("mtcls", "pipelines"), ("mtcls", "jobs"), ("pipelines", "jobs")])
def test_imports_point_one_way(lower, upper):
    wrong = [e for e in EDGES if _in(e.importer, lower) and _in(e.imported, upper)]
    assert not wrong, f"{lower} must never import {upper}:\n" + "\n".join(f"  {e}" for e in wrong)


def test_jobs_never_import_each_other():
    g = graph(EDGES)
    jobs = [m for m in MODULES if _in(m, "jobs") and m != "jobs"]
    chains = [chain for job in jobs
              if (chain := _path(g, job, lambda m, job=job: _in(m, "jobs") and m not in ("jobs", job)))]
    assert not chains, "a job imports another job:\n" + _describe(chains)


def test_no_import_cycle_between_pipelines_subpackages():
    found = cycles(graph(EDGES, pipelines_package))
    assert not found, "import cycles between pipelines subpackages:\n" + _describe_cycles(found)


@pytest.mark.parametrize("package", ["pipelines.score", "pipelines.evaluate", "pipelines.drift", "pipelines.sink"])
def test_scoring_and_evaluation_never_import_training(package):
    g = graph(EDGES)
    chains = [chain for module in sorted(MODULES) if _in(module, package)
              if (chain := _path(g, module, lambda m: _in(m, "pipelines.train")))]
    assert not chains, f"{package} imports pipelines.train (imports inside functions counted):\n" + _describe(chains[:3])
