"""Imports point one way only (docs/design.md, "Layers"); this test is the contract."""

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
