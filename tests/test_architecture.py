"""The package's dependency arrows point one way (issue #36).

Every ``import`` of a ``kvpolicy`` module is read from the source (top-level, inside
functions and under ``TYPE_CHECKING`` alike): the modules form no cycle, and each module
imports only from its own tier or the tiers below it, in the order of the data flow
``config -> policy -> cache layer -> store -> executor`` read from the bottom up.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvpolicy"

#: top-level modules and packages of ``kvpolicy``, lowest tier first
TIERS: list[set[str]] = [
    {"__init__", "errors", "hookspecs", "transfer", "generation", "models"},  # no kvpolicy below them
    {"config"},  # settings as data
    {"selectors", "quantizers"},  # which tokens keep full precision; how the rest are packed
    {"store"},  # one tensor side's tokens: full precision, staging, packed
    {"executors"},  # attention over the stores
    {"cache"},  # model introspection, layer factories, cache layers, the attention bridge
    {"graphs", "distributed"},  # the CUDA-graph path; tensor parallelism
    {"policy"},  # the composition root: policies, layer budgets, the registry, the built-ins
    {"evaluation", "tools", "cli"},  # tools over the library
]


def modules() -> dict[str, Path]:
    """``kvpolicy.x.y`` -> its file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_edges() -> set[tuple[str, str]]:
    """``(importer, imported)`` for every import between two modules of the package. An import
    of a module's own ancestor package is left out (Python runs it first whatever is imported);
    ``from package import name`` counts the submodule ``name`` where there is one."""
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    edges = set()
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
                names = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith("kvpolicy") else None
                if target and target != module and not module.startswith(target + "."):
                    edges.add((module, target))
    return edges


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def tier_of(module: str) -> int:
    name = top(module)
    for tier, members in enumerate(TIERS):
        if name in members:
            return tier
    raise AssertionError(f"{module}: a new top-level module; give it a tier in TIERS")


def test_the_reader_sees_imports_inside_functions_and_type_checking_blocks():
    edges = import_edges()
    assert ("kvpolicy.policy", "kvpolicy.graphs.static_cache") in edges  # imported inside make_cache
    assert ("kvpolicy.executors.chunked", "kvpolicy.executors.partial") in edges  # from package import module
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    assert cycles(import_edges()) == []


def test_every_import_points_to_the_same_tier_or_below():
    upward = sorted((a, b) for a, b in import_edges() if tier_of(b) > tier_of(a))
    assert upward == []


def test_every_top_level_module_has_one_tier_and_there_are_at_most_eight():
    names = [name for tier in TIERS for name in tier]
    assert len(names) == len(set(names))
    assert {top(m) for m in modules()} == set(names)
    assert len(list(PACKAGE.glob("*.py"))) <= 8


def test_the_tests_follow_the_package_tree():
    """Each folder of ``tests/`` is named after a package or module of ``kvpolicy``."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in PACKAGE.glob("*.py")}
    assert folders and folders <= packages, folders - packages
    assert not [p.name for p in tests.glob("test_*.py") if p.stem[5:] in packages], "a package's tests at the top"
