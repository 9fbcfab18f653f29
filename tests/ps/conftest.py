"""Fixtures of the parameter-server tests.

``runtime`` (tests/conftest.py) runs a test on every backend; each local-backend actor is a
process that imports torch (about a second on 2 cores), so only tests whose point is the
cross-process behaviour use it. Tests of the server's arithmetic and bookkeeping use
``inline_runtime``: same public API, one process.
"""

from __future__ import annotations

import os
import sys

import pytest

import miniray

# The GAN example is the top-level package ``ml`` (the seed runs ``python -m ml.train``);
# ``python -m pytest`` finds it through the working directory, plain ``pytest`` through this.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def inline_runtime():
    miniray.init(backend="inline", num_workers=2)
    try:
        yield "inline"
    finally:
        miniray.shutdown()
