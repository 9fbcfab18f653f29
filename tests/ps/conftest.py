"""Fixtures of the parameter-server tests.

``runtime`` (tests/conftest.py) runs a test on every backend; each local-backend actor is a
process that imports torch (about a second on 2 cores), so only tests whose point is the
cross-process behaviour use it. Tests of the server's arithmetic and bookkeeping use
``inline_runtime``: same public API, one process.
"""

from __future__ import annotations

import pytest

import miniray


@pytest.fixture
def inline_runtime():
    miniray.init(backend="inline", num_workers=2)
    try:
        yield "inline"
    finally:
        miniray.shutdown()
