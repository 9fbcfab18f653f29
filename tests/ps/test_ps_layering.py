"""miniray.ps sits on the runtime only: it must not import train, rl or cli (DESIGN.md layers)."""

from __future__ import annotations

import ast
import pathlib

import miniray.ps

ALLOWED = ("miniray.ps", "miniray.runtime", "miniray.errors", "miniray.exceptions")


def test_ps_imports_only_the_runtime():
    root = pathlib.Path(miniray.ps.__file__).parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("miniray.") and not name.startswith(ALLOWED):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_seed_module_names_exist():
    # The seed lists miniray/ps/parameter_server.py and miniray/ps/strategies.py.
    from miniray.ps import parameter_server, server, strategies

    assert parameter_server.create_parameter_server is server.create_parameter_server
    assert parameter_server.ParameterServer is server.ParameterServer
    assert issubclass(strategies.STRATEGIES["average"], strategies.SyncStrategy)
