"""Shared fixtures: a runtime per test on each backend, and leak checks for processes and shm."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest

import miniray

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

# Ray's environment for every instance the tests start: no usage reporting (no network), and no
# auth token written to ~/.ray.
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def ray_instance(**init_options):
    """One local Ray instance (2 CPUs, no dashboard) for the duration of the block.

    Starting Ray takes 5-15 s on two cores, so tests share an instance per module and
    ``miniray.init(backend="ray")`` attaches to it; ``miniray.shutdown()`` then kills only what
    miniray created.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("a Ray instance is already running in this process")
    saved = {key: os.environ.get(key) for key in RAY_TEST_ENV}
    os.environ.update(RAY_TEST_ENV)
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            **init_options,
        )
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
