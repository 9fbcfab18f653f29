"""The backend of this process: the driver's (set by ``init``) or a worker's (set at start-up).

How the first use starts the default backend is ``api.init``, which ``api`` registers here when
it is imported (``set_auto_start``): ``api`` imports this module, so this one imports no ``api``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from miniray.errors import RaySystemError

if TYPE_CHECKING:
    from miniray.runtime.backend import Backend

_lock = threading.RLock()
_backend: Backend | None = None
_auto_start: Callable[[], None] | None = None


def set_auto_start(start: Callable[[], None]) -> None:
    """Register what the first use runs to start the default backend (``api.init``)."""
    global _auto_start
    _auto_start = start


def current() -> Backend:
    """The active backend; like Ray, the first use starts the default one."""
    backend = _backend
    if backend is not None:
        return backend
    with _lock:
        if _backend is None:
            worker_backend = _ray_worker_backend()
            if worker_backend is not None:
                set_backend(worker_backend)
            elif _auto_start is None:
                # Importing miniray imports api, which registers it: only a partial import
                # (a bug) gets here.
                raise RaySystemError("no miniray runtime is running: call miniray.init() first")
            else:
                _auto_start()
    assert _backend is not None
    return _backend


def _ray_worker_backend() -> Backend | None:
    """Inside a Ray worker process, the Ray it runs on; starting a local backend there would
    run nested calls on a private runtime the driver never sees."""
    if "ray" not in sys.modules:  # cheap, and never imports ray
        return None
    # Imported here, not at the top: ray_backend imports this module (an import circle), and
    # only a process where ray is already loaded needs it.
    from miniray.runtime.ray_backend import worker_backend_or_none

    return worker_backend_or_none()


def current_or_none() -> Backend | None:
    return _backend


def set_backend(backend: Backend | None) -> None:
    global _backend
    with _lock:
        _backend = backend
