"""Completing the ``concurrent.futures.Future`` of an ObjectRef (``ref.future()``, ``await ref``).

    runtime thread (head router, child receiver, inline producer)   completer thread
      value stored / reply received --settle(fut, read, release)--> read(): decode the value
      (only queues: never decodes, never runs a user's callback)      fut.set_result / exception
                                                                      -> the user's callbacks
                                                                      release(): drop the hold

Two rules shape this. The value must be decoded while the backend still holds it: a value in a
shared-memory segment can be freed, and its segment reused for the next value, once the backend
has handed it over, so each backend keeps a hold on it (a pending use in the head, a pending
delivery in a child) that ``release`` drops only after ``read`` ran. And neither decoding (a
user's ``__setstate__``) nor ``Future.set_result`` (which runs every done-callback in the
calling thread) may run on a runtime thread: a callback that blocks there, say on ``get()``,
would stop the very thread that must deliver what it waits for. One daemon thread per process
does both, so a callback that blocks holds back other futures' callbacks, never the runtime.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

_lock = threading.Lock()
_jobs: queue.SimpleQueue | None = None


def settle(fut: Future, read: Callable[[], Any], release: Callable[[], None] | None = None) -> None:
    """Complete ``fut`` with ``read()`` (its value, or the exception it raises) on the completer
    thread, then call ``release``. Only queues: safe on any runtime thread, under its locks."""
    jobs = _jobs if _jobs is not None else _start()
    jobs.put((fut, read, release))


def settle_now(fut: Future, read: Callable[[], Any]) -> None:
    """Complete ``fut`` in this thread: for a value already stored when the future is made
    (no callback can be registered yet, and the caller's ref keeps the value alive)."""
    try:
        value = read()
    except BaseException as exc:
        _set(fut, exc, failed=True)
    else:
        _set(fut, value, failed=False)


def _set(fut: Future, outcome: Any, *, failed: bool) -> None:
    try:
        if failed:
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
    except InvalidStateError:
        pass  # the caller cancelled it (asyncio.wait_for timing out cancels the wrapped future)


def _start() -> queue.SimpleQueue:
    global _jobs
    with _lock:
        if _jobs is None:
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(
                target=_complete_forever, args=(jobs,), name="miniray-futures", daemon=True
            ).start()
            _jobs = jobs
        return _jobs


def _complete_forever(jobs: queue.SimpleQueue) -> None:
    while True:
        fut, read, release = jobs.get()
        try:
            if not fut.cancelled():
                settle_now(fut, read)
            if release is not None:
                release()
        except BaseException:  # a bug of ours in a release: say so, keep completing the rest
            traceback.print_exc()
