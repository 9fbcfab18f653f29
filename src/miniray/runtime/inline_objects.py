"""The inline backend's object table: the entries every value lives in, and ``put``/``get``/
``wait``/``future`` over them; the base the rest of the backend (``inline_streams``,
``inline_tasks``, ``inline_actors``) builds on, with the state they share (one lock, the threads
started). ``InlineBackend`` (``inline.py``) puts the parts together and sets that state.

    producer thread --_store--> _Entry.value/error, done.set(), callbacks (futures, wait)
    caller thread   --get(deadline)--> _Entry.done.wait(remaining)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from miniray.errors import GetTimeoutError, RayTaskError
from miniray.runtime import execution, futures, serialization
from miniray.runtime.refs import ObjectRef, new_id

if TYPE_CHECKING:
    from miniray.runtime.inline_actors import _Call
    from miniray.runtime.inline_tasks import _Task


class _Entry:
    __slots__ = ("call", "callbacks", "done", "error", "task", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: serialization.Serialized | None = None
        self.error: BaseException | None = None
        self.callbacks: list[Callable[[], None]] = []
        self.task: _Task | None = None  # the task that produces it (for cancel)
        self.call: _Call | None = None  # or the actor call


class InlineObjects:
    """The object table and the state every part of the inline backend shares."""

    name: str
    _lock: threading.Lock  # guards the tables and the tasks' and calls' states
    _objects: dict[str, _Entry]
    _awaited: dict[int, _Entry]
    _pinned: set[str]
    _threads: list[threading.Thread]
    _sized: set[str]

    def _new_entry(self) -> tuple[str, _Entry]:
        oid = new_id("o")
        entry = _Entry()
        with self._lock:
            self._objects[oid] = entry
        return oid, entry

    def _store(self, entry: _Entry, value: Any = None, error: BaseException | None = None) -> None:
        if error is None:
            try:
                entry.value = serialization.serialize(value, session_id=None)
            except serialization.Rejected as rejected:  # a Verified value's check failed
                error = execution.task_error("a verified result", rejected.cause)
            except Exception as exc:
                error = TypeError(f"could not serialize the result: {exc}")
        entry.error = error
        entry.done.set()
        for callback in entry.callbacks:
            callback()

    def _entry(self, ref: ObjectRef) -> _Entry:
        entry = self._objects.get(ref.id)
        if entry is None:
            raise ValueError(f"{ref!r} is unknown to this runtime (was it created before init?)")
        return entry

    def _value(self, entry: _Entry) -> Any:
        if entry.error is not None:
            raise _reraisable(entry.error)
        assert entry.value is not None
        return serialization.deserialize(entry.value)

    def put(self, value: Any) -> ObjectRef:
        oid, entry = self._new_entry()
        self._store(entry, value)
        return ObjectRef(oid)

    def get(self, refs: list[ObjectRef], deadline: float | None) -> list[Any]:
        entries = [self._entry(r) for r in refs]
        for ref, entry in zip(refs, entries):
            if entry.error is not None:
                break
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not entry.done.wait(remaining):
                raise GetTimeoutError(f"get() timed out waiting for {ref!r}")
            if entry.error is not None:
                break
        return [self._value(e) for e in entries]

    def wait(
        self, refs: list[ObjectRef], num_returns: int, deadline: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        changed = threading.Event()
        entries = [self._entry(r) for r in refs]
        for entry in entries:
            entry.callbacks.append(changed.set)
        while True:
            ready = [r for r, e in zip(refs, entries) if e.done.is_set()]
            if len(ready) >= num_returns:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            changed.wait(remaining)
            changed.clear()
        ready = ready[:num_returns]
        taken = set(ready)
        return ready, [r for r in refs if r not in taken]

    def future(self, ref: ObjectRef) -> Future:
        entry = self._entry(ref)
        fut: Future = Future()
        once = threading.Lock()

        def complete() -> None:
            # Runs in the thread that stored the value (a task's or an actor's): only queue, so
            # a done-callback that blocks cannot stall that actor (see futures.py).
            if once.acquire(blocking=False):
                self._awaited.pop(id(entry), None)
                futures.settle(fut, lambda: self._value(entry))

        # Kept for shutdown to fail: the ref, and so its _objects entry, may be gone already.
        self._awaited[id(entry)] = entry
        entry.callbacks.append(complete)
        if entry.done.is_set():  # stored before (or while) we appended: _store may miss us
            complete()
        return fut

    def release(self, object_id: str) -> None:
        # The one counted ref of this object is gone; calls that need it hold the entry itself.
        if object_id not in self._pinned:
            self._objects.pop(object_id, None)

    def pin(self, object_id: str) -> None:
        self._pinned.add(object_id)

    def _dep_entries(self, deps: list[str]) -> dict[str, _Entry]:
        with self._lock:
            missing = [oid for oid in deps if oid not in self._objects]
            if missing:
                raise ValueError(f"ObjectRef({missing[0]}) is unknown to this runtime")
            return {oid: self._objects[oid] for oid in deps}

    def _resolve(self, entries: dict[str, _Entry]) -> dict[str, Any]:
        values = {}
        for oid, entry in entries.items():
            entry.done.wait()
            values[oid] = self._value(entry)
        return values

    def _failed_dep(self, entries: dict[str, _Entry]) -> BaseException | None:
        """Wait for the arguments; the error of the first that failed, passed on as it is (as
        on the local backend: a cancelled argument cancels its consumers)."""
        for entry in entries.values():
            entry.done.wait()
            if entry.error is not None:
                return entry.error
        return None

    def _start_thread(self, target: Callable[[], Any], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()


async def _all_stored(loop: asyncio.AbstractEventLoop, entries: Any) -> None:
    """Wait on ``loop`` (without blocking it) until every entry is stored."""
    for entry in entries:
        if entry.done.is_set():
            continue
        stored = loop.create_future()

        def settle(stored: asyncio.Future = stored) -> None:
            if not stored.done():
                stored.set_result(None)

        def wake(stored: asyncio.Future = stored) -> None:
            loop.call_soon_threadsafe(settle, stored)

        entry.callbacks.append(wake)
        if not entry.done.is_set():  # _store may have run its callbacks before we appended
            await stored


def _reraisable(error: BaseException) -> BaseException:
    if isinstance(error, RayTaskError):
        return error.as_instanceof_cause()
    return error
