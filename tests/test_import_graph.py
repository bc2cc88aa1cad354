"""Our packages import one another without cycles, and each stays in its layer.

Every module of `ds_cluster` (its own files and the top-level folders it links to) is
parsed (not imported) with `ast`. Each `import` and `from ... import` of our own
packages is an edge of the graph, wherever it stands: at module level, inside a
function, or under `if TYPE_CHECKING:` (a cycle there is still two modules that each
need the other). `importlib.import_module("literal")` counts as well. A parent package a
submodule import runs first is not an edge: that is how Python loads packages, not a
dependency of ours.

One import goes by a computed name: the CLI's dispatch table (`ds_cluster.cli.SUBCOMMANDS`,
subcommand -> module, imported only when that subcommand runs). Its modules are edges of
`ds_cluster.cli` for the cycle check. Any other import by a computed name fails the test,
since this graph could not see it.

The layers, from the floor up: `common` (what the gateway and the shards share at run time)
imports nothing else of ours; `gateway`, `shard` and the local `supervisor` stand on
`common` only; `tools` may use all of those; the CLI dispatches to everything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "ds_cluster"
# The top-level folders that `ds_cluster/` links to, by the name they install under.
LINKED_FOLDERS = ("common", "gateway", "shard", "tools")
CLI = "ds_cluster.cli"
# Layer -> the layers it may import (its own included). The CLI sits above all of them.
ALLOWED = {
    "common": {"common"},
    "gateway": {"common", "gateway"},
    "shard": {"common", "shard"},
    "supervisor": {"common", "supervisor"},
    "tools": {"common", "gateway", "shard", "supervisor", "tools"},
}

Graph = dict[str, set[str]]


def our_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages."""
    modules = {}
    trees = [(root / folder, (NAMESPACE, folder)) for folder in LINKED_FOLDERS]
    trees.append((root / NAMESPACE, (NAMESPACE,)))
    for top, prefix in trees:
        for path in sorted(top.rglob("*.py")):
            relative = path.relative_to(top)
            if relative.parts[0] in LINKED_FOLDERS and top.name == NAMESPACE:
                continue  # a link to a folder walked on its own
            parts = [*prefix, *relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module `name` lives in: itself, or the nearest enclosing package we have."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _ours(name: str) -> bool:
    return name.split(".")[0] == NAMESPACE


def layer(module: str) -> str | None:
    """`common`, `gateway`, `shard`, `supervisor` or `tools`; None for the CLI itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def _computed_imports(tree: ast.AST) -> Iterator[ast.Call]:
    """Calls of `importlib.import_module(...)` or `__import__(...)`."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
            isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
        ):
            yield node


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> tuple[set[str], list[str]]:
    """The modules of ours that `name` imports, and the places it imports by a name this
    parse cannot know (`module:line`)."""
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(_owner(alias.name, modules) for alias in node.names if _ours(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            if not _ours(base):
                continue
            for alias in node.names:  # `from pkg import module` names a module
                child = f"{base}.{alias.name}"
                targets.add(child if child in modules else _owner(base, modules))
    unknown = []
    for call in _computed_imports(tree):
        arg = call.args[0] if call.args else None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            if _ours(arg.value):
                targets.add(_owner(arg.value, modules))
        elif name != CLI:
            unknown.append(f"{name}:{call.lineno}")
    targets.discard(None)
    targets.discard(name)
    return {target for target in targets if target is not None}, unknown


def cli_dispatch(modules: Mapping[str, Path]) -> set[str]:
    """The modules named in `ds_cluster.cli.SUBCOMMANDS` (read from the source, not run)."""
    tree = ast.parse(modules[CLI].read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(target, "id", None) for target in node.targets] == ["SUBCOMMANDS"]
            and isinstance(node.value, ast.Dict)
        ):
            names = set()
            for value in node.value.values:
                assert isinstance(value, ast.Tuple), ast.dump(value)
                first = value.elts[0]
                assert isinstance(first, ast.Constant) and isinstance(first.value, str)
                names.add(first.value)
            return names
    raise AssertionError(f"no SUBCOMMANDS table in {modules[CLI]}")


def import_graph(root: Path = REPO_ROOT) -> tuple[Graph, list[str]]:
    """Module -> modules of ours it imports (the CLI's dispatch included), and the
    imports by computed names found outside the CLI."""
    modules = our_modules(root)
    graph: Graph = {}
    unknown: list[str] = []
    for name, path in modules.items():
        graph[name], found = imports_of(name, path, modules)
        unknown += found
    graph[CLI] |= cli_dispatch(modules)
    return graph, unknown


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path `a, b, ..., a`) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; our graph is far from deep
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(min(group), group, graph) for group in groups]


def _cycle_through(start: str, group: set[str], graph: Mapping[str, set[str]]) -> list[str]:
    """A shortest path from `start` back to itself inside `group` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph.get(node, ()) & group):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles_between_our_modules() -> None:
    graph, _ = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_every_package_stays_in_its_layer() -> None:
    """`common` imports nothing else of ours, the gateway and the shard never import each
    other, and nothing but the CLI reaches the CLI."""
    graph, _ = import_graph()
    crossings = sorted(
        (module, target)
        for module, targets in graph.items()
        if (own := layer(module)) is not None
        for target in targets
        if layer(target) not in ALLOWED[own]
    )
    assert not crossings, crossings


def test_nothing_imports_a_folder_by_its_bare_name() -> None:
    """`import common...` would load a second copy of a module beside `ds_cluster.common...`
    (two registries, two sets of globals): every import goes through the namespace."""
    bare = []
    for name, path in our_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            bare += [f"{name}:{node.lineno}" for n in names if n.split(".")[0] in LINKED_FOLDERS]
    assert not bare, bare


def test_every_import_has_a_name_the_graph_can_see() -> None:
    _, unknown = import_graph()
    assert not unknown, f"imports by a computed name (outside {CLI}'s dispatch): {unknown}"


def test_the_checker_finds_a_cycle_and_names_it() -> None:
    """The checker itself: the cycle the supervisor and the CLI once formed (the CLI
    dispatches to the supervisor by name; the supervisor imported a helper from the CLI)
    is found, and so is a longer one; an acyclic graph has none."""
    assert cycles(
        {CLI: {"ds_cluster.supervisor.cluster"}, "ds_cluster.supervisor.cluster": {CLI}}
    ) == [[CLI, "ds_cluster.supervisor.cluster", CLI]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_checker_sees_function_level_relative_and_by_name_imports(tmp_path: Path) -> None:
    package = tmp_path / "common"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from ds_cluster.common import b\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text(
        "import importlib\nimportlib.import_module('ds_cluster.common.a')\n"
    )
    modules = our_modules(tmp_path)
    graph = {name: imports_of(name, path, modules)[0] for name, path in modules.items()}
    a, b, c = (f"ds_cluster.common.{x}" for x in "abc")
    assert cycles(graph) == [[a, b, c, a]]
