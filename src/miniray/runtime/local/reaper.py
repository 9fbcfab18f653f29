"""Waiting for the local backend's child processes to exit, off the head's lock and its router.

A child whose socket closed, or that was told to exit, may take a while to end (atexit hooks, a
stuck C call, a stopped process): ``popen.wait`` then blocks for the whole grace period before
the kill. Done under the head's lock, or on the router thread, that stalled every driver thread
and every other child's results for up to a second. Each exit gets a short-lived thread here
instead: it waits, kills after the grace period, and reports the exit status to the head.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable


class Reaper:
    """Reaps children on threads of their own; ``join`` waits for every one (shutdown)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def reap(
        self,
        popen: subprocess.Popen,
        grace_s: float,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        """Wait for ``popen`` to exit (SIGKILL it after ``grace_s``), then ``on_exit(code)``."""
        thread = threading.Thread(
            target=_reap,
            args=(popen, grace_s, on_exit),
            name=f"miniray-reaper-{popen.pid}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError:  # no new threads while the interpreter exits (3.12+): wait here
            _reap(popen, grace_s, on_exit)
            return
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def join(self) -> None:
        """Return once every child handed to ``reap`` so far is gone (none is left orphaned)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()


def _reap(popen: subprocess.Popen, grace_s: float, on_exit: Callable[[int], None] | None) -> None:
    code = wait_or_kill(popen, grace_s)
    if on_exit is not None:
        on_exit(code)


def wait_or_kill(popen: subprocess.Popen, grace_s: float) -> int:
    """The exit status of ``popen``, SIGKILLed if it is still running after ``grace_s``."""
    try:
        return popen.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        popen.kill()
        return popen.wait()
