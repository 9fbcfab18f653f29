"""The backend of this process: the driver's (set by ``init``) or a worker's (set at start-up)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from miniray.runtime.backend import Backend

_lock = threading.RLock()
_backend: Backend | None = None


def current() -> Backend:
    """The active backend; like Ray, the first use starts the default one."""
    backend = _backend
    if backend is not None:
        return backend
    from miniray.runtime import api

    with _lock:
        if _backend is None:
            api.init()
    assert _backend is not None
    return _backend


def current_or_none() -> Backend | None:
    return _backend


def set_backend(backend: Backend | None) -> None:
    global _backend
    with _lock:
        _backend = backend
