"""The caller's end of a streaming generator task or actor method (``num_returns="streaming"``)
on the embedded backends: the ids of the objects it has yielded so far, in order, and whether it
ended.

    task or method (worker process or thread) --yields--> backend stores the value, append(oid)
    ObjectRefGenerator.__next__ --> next_ref(index, deadline): waits on ``cond`` for the index-th

The backend appends under ``cond`` (the local head's lock, or one of the inline backend's own)
and the generator reads under it. Each appended object carries one reference for the ref the
generator will hand out; ``close`` gives back those it never handed out.

Also the worker side's replay rule, shared by both backends: a retried generator runs
again from the start, and the values the caller already has are skipped (Ray does the same,
so a generator that is retried should yield the same values each time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from miniray.runtime.refs import ObjectRef, nil_ref


class Stream:
    def __init__(
        self,
        cond: threading.Condition,
        check_open: Callable[[], None],
        release: Callable[[str], None],
    ):
        self.cond = cond
        self._check_open = check_open  # raises once the runtime is shut down
        self._release = release  # gives back one reference of an object (never blocks)
        self.ids: list[str] = []
        self.done = False
        self.closed = False  # the generator is gone: nobody will take more refs

    # -- the backend's side (holding cond) -------------------------------------------------
    def append(self, oid: str) -> None:
        self.ids.append(oid)
        if self.closed:
            self._release(oid)
        self.cond.notify_all()

    def end(self) -> None:
        self.done = True
        self.cond.notify_all()

    # -- the generator's side --------------------------------------------------------------
    def next_ref(self, index: int, deadline: float | None) -> ObjectRef | None:
        with self.cond:
            while True:
                self._check_open()
                if index < len(self.ids):
                    return ObjectRef(self.ids[index])  # counts the reference append made
                if self.done:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return nil_ref()
                self.cond.wait(remaining)

    def ready(self, index: int) -> bool:
        with self.cond:
            return index < len(self.ids) or self.done

    def finished(self, index: int) -> bool:
        with self.cond:
            return self.done and index >= len(self.ids)

    def close(self, index: int) -> None:
        # From ObjectRefGenerator.__del__, maybe inside the garbage collector on a thread that
        # holds cond: no lock. An append racing with this may release its object twice, which
        # only frees it (both backends tolerate a second release).
        self.closed = True
        for oid in self.ids[index:]:
            self._release(oid)


def replay(values: Iterator[Any], skip: int) -> Iterator[tuple[int, Any]]:
    """(index, value) for the values of a generator task from ``skip`` on: the first ``skip``
    were handed to the caller by an earlier attempt."""
    for index, value in enumerate(values):
        if index >= skip:
            yield index, value


async def areplay(values: AsyncIterator[Any], skip: int) -> AsyncIterator[tuple[int, Any]]:
    """``replay`` for an async generator method (``async def`` with ``yield``)."""
    index = 0
    async for value in values:
        if index >= skip:
            yield index, value
        index += 1


def not_a_generator_error(name: str, value: Any) -> TypeError:
    return TypeError(
        f"{name}() was called with num_returns='streaming' but returned "
        f"{type(value).__name__}, not a generator: it must use 'yield'"
    )
