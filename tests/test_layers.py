"""The shape of the house, read from the source (ast, nothing imported):

* layers import downward only: ``router/`` and ``retrieval/`` never import ``server/`` or
  ``clients/``; ``router/`` (pure policy) imports no grpc;
* no import circle among the project's modules (imports inside functions count too;
  those under ``if TYPE_CHECKING:`` do not: they never run);
* no hand-written module is longer than 500 lines (generated stubs in clients/gen aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "router", "retrieval", "clients")
GENERATED = REPO / "clients" / "gen"
MAX_LINES = 500


def module_name(path: Path) -> str:
    """``server/engines/registry.py`` -> ``server.engines.registry`` (packages: no __init__)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    """Every hand-written module of the four layers, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if GENERATED not in path.parents:
                found[module_name(path)] = path
    return found


MODULES = sources()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path) -> set[str]:
    """Dotted names a module imports (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def project_imports(path: Path) -> set[str]:
    """The project modules a module imports (a name resolves to its longest module)."""
    out = set()
    for name in imported_names(path):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in MODULES:
                out.add(candidate)
                break
    out.discard(module_name(path))
    return out


GRAPH = {name: project_imports(path) for name, path in MODULES.items()}


def test_the_walk_sees_the_tree():
    assert {"server.app", "router.batcher", "retrieval.collection", "clients.client"} <= set(
        MODULES
    )
    assert "server.engines.registry" in GRAPH["server.servicers.embedding"]


@pytest.mark.parametrize("lower", ["router", "retrieval"])
def test_lower_layers_never_import_server_or_clients(lower):
    upward = {
        module: sorted(i for i in imports if i.split(".")[0] in ("server", "clients"))
        for module, imports in GRAPH.items()
        if module.split(".")[0] == lower
    }
    assert {m: i for m, i in upward.items() if i} == {}


def test_router_has_no_grpc_import():
    offenders = {
        module: sorted(n for n in imported_names(MODULES[module]) if n.split(".")[0].startswith("grpc"))
        for module in MODULES
        if module.split(".")[0] == "router"
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
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
            connect(node)
    return cycles


def test_find_cycles_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert find_cycles(GRAPH) == []


def test_no_hand_written_module_over_500_lines():
    long = {
        str(path.relative_to(REPO)): n
        for path in MODULES.values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"
