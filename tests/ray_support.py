"""Ray for the tests: one local instance per module, with no usage reporting and no auth file.

A module of its own (not conftest.py): test modules import it by name, and ``conftest`` would
resolve to whichever conftest.py pytest imported first.
"""

from __future__ import annotations

import contextlib
import os

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
