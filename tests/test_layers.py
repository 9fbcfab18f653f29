"""Imports point one way only (docs/design.md, "Layers"), and no module imports itself back
through a circle of module-level imports; this test is the contract."""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "miniray"

# layer -> the miniray layers its modules may import ("miniray" = the top-level runtime facade)
ALLOWED = {
    "errors": {"errors"},
    "exceptions": {"errors"},
    "actor": {"errors", "runtime"},  # Ray's ray.actor, a facade over the runtime like exceptions
    "config": {"errors", "config"},
    "atomic_dir": {"atomic_dir"},
    "runtime": {"errors", "runtime"},
    "ps": {"miniray", "errors", "exceptions", "runtime", "atomic_dir", "ps"},
    "train": {"miniray", "errors", "exceptions", "runtime", "config", "atomic_dir", "ps", "train"},
    "rl": {"miniray", "errors", "exceptions", "runtime", "config", "atomic_dir", "train", "rl"},
    "cli": None,  # the top: anything
    "__init__": {"miniray", "errors", "exceptions", "actor", "runtime"},
}


def layer_of(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def imported_layers(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "miniray":
                names.extend(f"miniray.{alias.name}" for alias in node.names)
    layers = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "miniray":
            continue
        layers.add(parts[1] if len(parts) > 1 else "miniray")
    return layers


def test_every_module_imports_only_lower_layers():
    violations = []
    modules = sorted(SRC.rglob("*.py"))
    assert modules, f"no modules found under {SRC}"
    for path in modules:
        layer = layer_of(path)
        allowed = ALLOWED.get(layer)
        if allowed is None and layer == "cli":
            continue
        assert allowed is not None, f"{path} is in a layer the contract does not know: {layer}"
        bad = imported_layers(path) - allowed
        if bad:
            violations.append(f"{path.relative_to(SRC)} ({layer}) imports {sorted(bad)}")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from miniray.ps import create_parameter_server\nimport torch\n")
    assert imported_layers(bad) == {"ps"}


# --- import circles ------------------------------------------------------------------------------


def module_name(path: pathlib.Path, root: pathlib.Path = SRC) -> str:
    """miniray.rl.types for src/miniray/rl/types.py; miniray.rl for src/miniray/rl/__init__.py."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: pathlib.Path = SRC) -> dict[str, pathlib.Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_nodes(tree: ast.AST) -> list[ast.AST]:
    """The nodes of a module that run when the module is imported.

    Function and lambda bodies are skipped (they run when called; a function's decorators and
    default values do run), and so is the body of ``if TYPE_CHECKING:`` (never at run time; its
    ``else:`` does run). Class bodies, ``try``, ``with`` and other ``if`` blocks run and count.
    """
    found: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for child in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
                if child is not None:
                    visit(child)
            return
        if isinstance(node, ast.Lambda):
            for child in [*node.args.defaults, *node.args.kw_defaults]:
                if child is not None:
                    visit(child)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _ancestors(name: str) -> list[str]:
    """miniray, miniray.rl for miniray.rl.types: the packages Python imports before a module."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The miniray modules whose import the module-level code of ``name`` starts or needs.

    - ``import a.b.c`` and ``from a.b.c import x`` run ``a.b.c`` and, first, the packages
      ``a`` and ``a.b``: edges to each of them, except to the importer's own enclosing packages,
      which Python has always started before the importer (they are in ``sys.modules``
      already, and importing a submodule of a half-initialised package is fine).
    - ``from pkg import name`` is the submodule ``pkg.name`` when ``pkg/name.py`` or
      ``pkg/name/__init__.py`` exists; otherwise ``name`` is read from ``pkg``'s ``__init__``,
      which therefore must have run: an edge to ``pkg`` even when it encloses the importer.
      So a package ``__init__`` importing its own submodules is no circle by itself; it is one
      when such a submodule takes names from that ``__init__`` at module level.
    - ``import pkg`` of an enclosing package only binds the (half-initialised) module: no edge,
      unless code that runs at import reads an attribute of it (``X = pkg.remote(Y)``), which
      needs ``pkg``'s ``__init__`` to have run: then an edge to ``pkg``.
    Relative imports are resolved against the importer's package.
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    enclosing = set(_ancestors(name))
    edges: set[str] = set()

    def runs(target: str) -> None:
        for module in [*_ancestors(target), target]:
            if module in modules and module not in enclosing:
                edges.add(module)

    nodes = import_time_nodes(ast.parse(path.read_text(), filename=str(path)))
    bound_packages: dict[str, str] = {}  # local name -> the enclosing package it is bound to
    for node in nodes:
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                runs(alias.name)
                bound = alias.name if alias.asname else alias.name.partition(".")[0]
                if bound in enclosing:
                    bound_packages[alias.asname or bound] = bound
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, node.module] if node.module else base)
        else:
            assert node.module is not None
            source = node.module
        runs(source)
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in modules:
                runs(submodule)
            elif source in modules:
                edges.add(source)  # a name from the package's __init__ (or a module's global)
    for node in nodes:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in bound_packages:
                edges.add(bound_packages[node.value.id])
    edges.discard(name)
    return edges


def import_graph(root: pathlib.Path = SRC) -> dict[str, set[str]]:
    modules = all_modules(root)
    return {name: import_edges(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles, as closed paths: for every module on one, the shortest circle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan; about a hundred modules, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles: set[tuple[str, ...]] = set()
    for component in components:
        for start in component:
            cycles.add(_shortest_cycle(graph, component, start))
    return [list(cycle) for cycle in sorted(cycles)]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> tuple[str, ...]:
    """The shortest closed path from start back to start inside its component, breadth first,
    rotated to begin at its smallest module so that one circle is reported once."""
    previous: dict[str, str] = {}  # node -> the node it was reached from
    frontier = [start]
    while start not in previous:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    backwards = [previous[start]]
    while backwards[-1] != start:
        backwards.append(previous[backwards[-1]])
    ring = backwards[::-1]  # start, ..., the node that imports start
    first = ring.index(min(ring))
    ring = ring[first:] + ring[:first]
    return (*ring, ring[0])


def test_no_import_circle_inside_any_package():
    """No module of miniray imports itself back through a chain of module-level imports.

    Only imports that run when a module is imported count: those inside functions and under
    ``if TYPE_CHECKING:`` make no circle at import time and are left out. How ``from pkg import
    name`` and package ``__init__`` files are read is in ``import_edges``. The graph spans all of
    src/miniray, so a circle inside any package (and across packages) fails here.
    """
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles (module-level imports):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def _package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_sees_a_circle(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import A\n",
            "a.py": "from pkg import b\nA = 1\n",
            "b.py": "import os\nfrom .c import C\n",
            "c.py": "from pkg.a import A\nC = 2\n",
        },
    )
    assert import_cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_what_makes_no_circle(tmp_path):
    pkg = _package(
        tmp_path,
        {
            # an __init__ re-exporting its submodules, which import each other one way
            "__init__.py": "from pkg.a import A\nfrom pkg.b import B\n",
            "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\nA = 1\n",
            "b.py": "from pkg import a\nimport pkg\nB = 2\n\ndef f():\n    from pkg import B\n",
        },
    )
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": set(), "pkg.b": {"pkg.a"}}
    assert import_cycles(graph) == []


def test_a_submodule_taking_names_from_its_init_is_a_circle(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import A\nfrom pkg.b import B\nX = 0\n",
            "a.py": "from pkg import X\nA = 1\n",
            "b.py": "import pkg as p\n\n@p.decorate\ndef B():\n    pass\n",
        },
    )
    assert import_cycles(import_graph(pkg)) == [["pkg", "pkg.a", "pkg"], ["pkg", "pkg.b", "pkg"]]
