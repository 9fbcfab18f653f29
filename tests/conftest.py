"""Shared fixtures: a runtime per test on each backend, and leak checks for processes and shm."""

from __future__ import annotations

import importlib.util
import os

import pytest

import miniray

# Every backend the conformance suite runs against. Ray joins in tests that ask for it.
BACKENDS = [
    name
    for name, module in [
        ("inline", "miniray.runtime.inline"),
        ("local", "miniray.runtime.local.head"),
    ]
    if importlib.util.find_spec(module) is not None
]


@pytest.fixture(params=BACKENDS)
def runtime(request):
    """An initialised runtime (2 workers) on each backend; shut down after the test."""
    miniray.init(backend=request.param, num_workers=2)
    try:
        yield request.param
    finally:
        miniray.shutdown()


@pytest.fixture
def local_runtime():
    """The multi-process local backend only (crash, shared-memory and process tests)."""
    miniray.init(backend="local", num_workers=2)
    try:
        yield "local"
    finally:
        miniray.shutdown()


@pytest.fixture(autouse=True)
def _no_runtime_left_behind():
    yield
    if miniray.is_initialized():
        miniray.shutdown()
        pytest.fail("the test left a runtime running; call miniray.shutdown()")


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
