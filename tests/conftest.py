"""Shared fixtures: a runtime per test on each backend, and leak checks for processes and shm."""

from __future__ import annotations

import importlib.util
import os

import pytest

import miniray
from deprecation_guard import install as install_deprecation_guard
from ray_support import ray_instance

# Every backend the conformance suite runs against; "ray" when the optional extra is installed.
BACKENDS = [
    name
    for name, module in [
        ("inline", "miniray.runtime.inline"),
        ("local", "miniray.runtime.local.head"),
        ("ray", "ray"),
    ]
    if importlib.util.find_spec(module) is not None
]


def pytest_generate_tests(metafunc):
    """Parametrize ``runtime`` over the backends, at module scope: pytest then runs a module's
    tests grouped by backend, so Ray starts once per module, not once per test.

    Ray joins for tests/runtime (the conformance suite) and for modules that opt in with
    ``RUNTIME_BACKENDS = [...]``: an actor on Ray is a fresh process importing torch, which
    makes other packages' suites several times slower without testing anything new there.
    """
    if "runtime_backend" not in metafunc.fixturenames:
        return
    backends = getattr(metafunc.module, "RUNTIME_BACKENDS", None)
    if backends is None:
        in_runtime_suite = os.path.dirname(str(metafunc.definition.path)) == RUNTIME_TESTS
        backends = [b for b in BACKENDS if b != "ray" or in_runtime_suite]
    metafunc.parametrize("runtime_backend", backends, indirect=True, scope="module")


RUNTIME_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime")


@pytest.fixture(scope="module")
def runtime_backend(request):
    """The backend name of the ``runtime`` fixture; starts the module's Ray instance for ray."""
    if request.param == "ray":
        with ray_instance():
            yield "ray"
    else:
        yield request.param


@pytest.fixture
def runtime(runtime_backend):
    """An initialised runtime on each backend (2 workers, 2 CPUs on Ray); shut down after."""
    if runtime_backend == "ray":
        miniray.init(backend="ray")  # attaches to the module's Ray instance
    else:
        miniray.init(backend=runtime_backend, num_workers=2)
    try:
        yield runtime_backend
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


_GUARD = pytest.StashKey()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The deprecation guard (deprecation_guard.py) around each test's whole protocol, inside
    pytest's own warning capture (which resets ``showwarning`` per test): fixtures of every
    scope that a test sets up run under it too."""
    item.stash[_GUARD] = install_deprecation_guard()
    try:
        return (yield)
    finally:
        item.stash[_GUARD]()


@pytest.fixture(autouse=True)
def _deprecations_in_our_code_fail(request):
    """A logged deprecation notice while our code ran fails the test (warnings raise at once)."""
    yield
    logged = request.node.stash[_GUARD].found
    if logged:
        pytest.fail("our code triggered deprecation notices:\n" + "\n".join(logged))


@pytest.fixture(autouse=True)
def _no_runtime_left_behind():
    yield
    if miniray.is_initialized():
        miniray.shutdown()
        pytest.fail("the test left a runtime running; call miniray.shutdown()")


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _nothing_of_ours_survives_the_suite():
    """After every test ran: no child process of this pytest and no shared-memory segment of
    any local-backend session it started (each test cleans up; this catches what slipped)."""
    yield
    import time

    import psutil

    from miniray.runtime import shm
    from miniray.runtime.local.head import SESSIONS

    deadline = time.monotonic() + 10
    while True:
        children = [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]
        leftovers = [name for session in SESSIONS for name in shm.list_session(session)]
        if (not children and not leftovers) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not leftovers, f"shared-memory segments left behind: {leftovers[:5]}"
    assert not children, "processes left behind: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in children[:5]
    )
