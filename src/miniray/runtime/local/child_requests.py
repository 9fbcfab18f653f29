"""A child's get() and wait() on the head: answered when their objects are stored, or at their
deadline. A worker blocked on one frees its slot (``Child.blocked``: the scheduler may start
an extra worker). Every method runs under the head lock; the router calls ``answer_ready`` at
every turn and wakes itself by ``next_deadline_in``.
"""

from __future__ import annotations

import time

from miniray.runtime.local import protocol
from miniray.runtime.local.ledger import SegmentLedger
from miniray.runtime.local.objects import ObjectTable, lost
from miniray.runtime.local.processes import Child, Processes
from miniray.runtime.local.values import stored_error


class Request:
    """A Get or a Wait from ``child``, with its deadline (a Wait's timeout) if any."""

    def __init__(self, child: Child, message: protocol.Get | protocol.Wait):
        self.child = child
        self.message = message
        timeout = message.timeout if isinstance(message, protocol.Wait) else None
        self.deadline = None if timeout is None else time.monotonic() + timeout


class ChildRequests:
    def __init__(
        self, session_id: str, objects: ObjectTable, ledger: SegmentLedger, processes: Processes
    ):
        self._session_id = session_id
        self._objects = objects
        self._ledger = ledger
        self._processes = processes
        self._waiting: dict[tuple[int, int], Request] = {}  # (child key, request id) -> it

    def add(self, child: Child, message: protocol.Get | protocol.Wait) -> bool:
        """Answer now if it can be; else keep it (True: the child now blocks on it)."""
        request = Request(child, message)
        if self._try_answer(request):
            return False
        self._waiting[(child.key, message.request_id)] = request
        child.blocked += 1
        return True

    def cancel(self, child: Child, request_id: int) -> None:
        """The child stopped waiting (timeout, interrupt)."""
        if self._waiting.pop((child.key, request_id), None) is not None:
            child.blocked -= 1

    def forget(self, child: Child) -> None:
        """A dead child waits for nothing."""
        self._waiting = {k: r for k, r in self._waiting.items() if r.child is not child}

    def answer_ready(self) -> None:
        """Answer what can be answered, and every request past its deadline."""
        for key, request in list(self._waiting.items()):
            if self._try_answer(request):
                del self._waiting[key]
                request.child.blocked -= 1
        now = time.monotonic()
        for key, request in list(self._waiting.items()):
            if request.deadline is not None and request.deadline <= now:
                self._try_answer(request, expired=True)
                del self._waiting[key]
                request.child.blocked -= 1

    def next_deadline_in(self) -> float | None:
        deadlines = [r.deadline for r in self._waiting.values() if r.deadline is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _try_answer(self, request: Request, *, expired: bool = False) -> bool:
        message = request.message
        entries = [self._objects.get(oid) for oid in message.ids]
        if isinstance(message, protocol.Get):
            missing = [oid for oid, e in zip(message.ids, entries) if e is None]
            if missing:
                error = stored_error(lost(missing[0]), self._session_id)
                self._reply(request, [error] * len(entries))
                return True
            stored = [e.stored for e in entries if e is not None]
            failed = [s for s in stored if s is not None and s[0]]
            if not failed and any(s is None for s in stored):
                return False
            payload = [failed[0]] * len(entries) if failed else stored
            self._ledger.deliver(request.child.key, *payload)
            self._reply(request, payload)
            return True
        ready = [
            oid for oid, e in zip(message.ids, entries) if e is not None and e.stored is not None
        ]
        if len(ready) < message.num_returns and not expired:
            return False
        self._reply(request, ready)
        return True

    def _reply(self, request: Request, payload: list) -> None:
        self._processes.send(request.child, protocol.Reply(request.message.request_id, payload))
