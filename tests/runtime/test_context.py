"""The process's backend (runtime/context.py): auto-start on first use, without importing api."""

from __future__ import annotations

import ast
import pathlib

import miniray
from miniray.runtime import context

CONTEXT_PY = pathlib.Path(context.__file__)


def test_context_imports_no_api():
    """api imports context; context learns how to auto-start from api (set_auto_start)."""
    tree = ast.parse(CONTEXT_PY.read_text(), filename=str(CONTEXT_PY))
    imported = []
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.Import):
            imported.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
            imported.extend(f"{node.module}.{alias.name}" for alias in node.names)
    assert "miniray.runtime.api" not in imported, imported


def test_first_use_without_init_starts_the_default_backend(monkeypatch):
    monkeypatch.setenv("MINIRAY_BACKEND", "inline")
    assert not miniray.is_initialized()
    try:
        assert miniray.get(miniray.put(41), timeout=10) == 41
        assert miniray.is_initialized()
        assert miniray.backend_name() == "inline"
    finally:
        miniray.shutdown()
