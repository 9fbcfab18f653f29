"""Calling an endpoint (a plain object or an actor handle) with a deadline, written once.

    call(target, "m", *a, **kw) -> Pending     an actor handle: target.m.remote(*a, **kw)
                                               a plain object: target.m(*a, **kw) on its own
                                               daemon thread
    pending.result(deadline)                   waits until ``deadline`` (time.monotonic() s):
        the call returned         -> its value
        the call raised           -> that error, as it is (from an actor: the runtime's
                                     RayTaskError, also an instance of the remote error's class)
        the deadline came first   -> CallTimeoutError naming what was waited for

Telling the two timeouts apart is the point: a called method may raise a ``TimeoutError`` of its
own (a teacher that timed out, a queue put that found no room), and that is the call failing,
which a caller may retry; only ``CallTimeoutError`` says that the caller's own wait ran out.
Before this module the synchronizer, the rollouter and distillation's scheduler and weight sync
each wrote this test, and not all of them the same way.

A plain object's call runs on a thread rather than in the caller so that a call that hangs
cannot hold the caller past its deadline (TRL #6913: a weight sync that hung never resumed the
rollouter); on a daemon thread of its own rather than on a pool so that a call that hangs
forever cannot keep the process alive at exit. ``Pending.of`` wraps work started elsewhere (an
``ObjectRef``, a list of them, a ``concurrent.futures.Future`` or anything with
``result(timeout)`` and ``done()``), so a deadline on it means the same thing.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from typing import Any

import miniray
from miniray.errors import GetTimeoutError, RayTaskError
from miniray.rl.errors import CallTimeoutError

__all__ = ["CallTimeoutError", "Pending", "call"]


class Pending:
    """One call in flight; ``result(deadline)`` waits for it (see the module docstring).

    ``work`` is an ``ObjectRef``; a list of them (one call fanned out: the values in order,
    the first error as soon as any part fails); or a future. ``what`` names the call in a
    timeout's message (``"load_weights() of <actor>"``).
    """

    __slots__ = ("_work", "what")

    def __init__(self, work: Any, what: str):
        if isinstance(work, (list, tuple)) and all(isinstance(r, miniray.ObjectRef) for r in work):
            work = list(work)
        elif not isinstance(work, miniray.ObjectRef) and not (
            callable(getattr(work, "result", None)) and callable(getattr(work, "done", None))
        ):
            raise TypeError(
                f"Pending({what!r}): work={work!r} must be an ObjectRef, a list of them, or have "
                "result(timeout) and done() (a concurrent.futures.Future)"
            )
        self._work = work
        self.what = what

    @classmethod
    def of(cls, work: Any, what: str) -> Pending:
        """``work`` as a ``Pending`` (itself when it already is one)."""
        return work if isinstance(work, Pending) else cls(work, what)

    @classmethod
    def completed(cls, value: Any, what: str = "a finished call") -> Pending:
        """A call whose value is already there (no work to wait for)."""
        future: Future = Future()
        future.set_result(value)
        return cls(future, what)

    @property
    def ref(self) -> miniray.ObjectRef | None:
        """The object ref of an actor call (for ``miniray.wait`` over many), else None."""
        return self._work if isinstance(self._work, miniray.ObjectRef) else None

    def done(self) -> bool:
        refs = self._refs()
        if refs is not None:
            ready, _ = miniray.wait(refs, num_returns=len(refs), timeout=0)
            return len(ready) == len(refs)
        return bool(self._work.done())

    def wait(self, deadline: float, *, clock: Callable[[], float] = time.monotonic) -> bool:
        """True once the call has finished (returned or raised), False at ``deadline``: for a
        caller that reports a late call its own way, or needs readiness only (the value goes
        on as a ref)."""
        remaining = max(0.0, deadline - clock())
        timeout = None if math.isinf(remaining) else remaining
        refs = self._refs()
        if refs is not None:
            ready, _ = miniray.wait(refs, num_returns=len(refs), timeout=timeout)
            return len(ready) == len(refs)
        if isinstance(self._work, Future):
            return bool(futures_wait([self._work], timeout=timeout).done)
        try:
            self._work.result(timeout=timeout)
        except BaseException:  # finished with an error, or not finished: done() tells which
            pass
        return bool(self._work.done())

    def result(
        self,
        deadline: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_error: Callable[[str], BaseException] | None = None,
    ) -> Any:
        """The call's value; its own error re-raised; at ``deadline`` (``clock()`` seconds;
        ``inf``: none) ``timeout_error(what)``, by default a ``CallTimeoutError``.

        A caller whose own timeout means something to its callers (a sync timed out, a batch
        was not generated in time) passes its error class here; raising it directly, rather
        than catching ``CallTimeoutError`` later, cannot mistake a callee's error for ours.
        """
        remaining = max(0.0, deadline - clock())
        timeout = None if math.isinf(remaining) else remaining
        if self._refs() is not None:
            try:
                return miniray.get(self._work, timeout=timeout)
            except GetTimeoutError as exc:
                if isinstance(exc, RayTaskError):  # raised inside the remote call
                    raise
                raise self._timed_out(timeout_error) from exc
        try:
            return self._work.result(timeout=timeout)
        except TimeoutError as exc:
            if self._work.done():  # the call itself raised a TimeoutError: its own failure
                raise
            raise self._timed_out(timeout_error) from exc

    def _refs(self) -> list[miniray.ObjectRef] | None:
        if isinstance(self._work, miniray.ObjectRef):
            return [self._work]
        return self._work if isinstance(self._work, list) else None

    def _timed_out(self, timeout_error: Callable[[str], BaseException] | None) -> BaseException:
        if timeout_error is not None:
            return timeout_error(self.what)
        return CallTimeoutError(f"{self.what} did not answer by its deadline", what=self.what)

    def __repr__(self) -> str:
        return f"Pending({self.what!r})"


def call(target: Any, method: str, *args: Any, **kwargs: Any) -> Pending:
    """Start ``target.method(*args, **kwargs)``; ``target`` is an actor handle or a plain object.

    Only starting can raise here: an unknown method, or a dead handle that refuses the
    submission. Everything the call does is reported by ``Pending.result``. A plain object's
    method runs on a thread of its own, so that a deadline can cut the wait for it short; an
    object with a true ``answers_at_once`` attribute promises its methods never block, and they
    run in the caller's thread.
    """
    what = f"{method}() of {target!r}"
    if isinstance(target, miniray.ActorHandle):
        return Pending(getattr(target, method).remote(*args, **kwargs), what)
    bound = getattr(target, method)
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(bound(*args, **kwargs))
        except BaseException as exc:  # handed to the caller by Pending.result
            future.set_exception(exc)

    if getattr(target, "answers_at_once", False):
        # Its methods return at once (the publisher's snapshot hands over a ref): run here. A
        # thread of its own cost 0.5-7 ms of the weight sync's path on 2 busy cores (its
        # start, and the GIL handed to it and back).
        run()
    else:
        threading.Thread(target=run, name=f"miniray-call-{method}", daemon=True).start()
    return Pending(future, what)
