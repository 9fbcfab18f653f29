"""QueueSender: the rollouter's sender thread, which puts finished groups in the queue.

    rollouter lanes (hold the lock)        sender thread                          queue
    offer(groups) -------------------->   takes the whole outbox
                                          put_many(groups, versions, timeout=1) --> answers
                                          count the answers under the lock: accepted;
                                          too stale: give_back(its prompt position); full:
                                          put again after the queue's wait for room, until
                                          taken or stopped(); closed: closed()
    in_hand(): waiting + being put        (their staleness room: admission_capacity(offered=))
    stop(): put what was offered, read the answer, end

Groups go one ``put_many`` at a time, in order, so the accounting is exact. A lane never waits
for the queue's answer: a blocking answer came back late on 2 busy cores, as it goes through
the driver (~5% of the rollouter's time). The lock is the rollouter's: its lanes read
``counts`` (admission control) and ``in_hand`` under it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from miniray.rl.endpoints import call
from miniray.rl.types import Sample

__all__ = ["CALL_TIMEOUT_S", "QueueSender", "queue_answer"]

CALL_TIMEOUT_S = 60.0  # a queue call's answer, at most (then endpoints' CallTimeoutError)

Groups = list[list[Sample]]


def queue_answer(queue: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """``queue.method(...)``'s answer, waiting at most ``CALL_TIMEOUT_S``."""
    return call(queue, method, *args, **kwargs).result(time.monotonic() + CALL_TIMEOUT_S)


class QueueSender:
    """Puts offered groups in ``queue`` on its own thread; see the module docstring."""

    def __init__(
        self,
        queue: Any,
        lock: threading.Condition,
        *,
        give_back: Callable[[int], None],
        closed: Callable[[], None],
        stopped: Callable[[], bool],
        crashed: Callable[[BaseException], None],
    ):
        """``give_back(position)`` (under ``lock``) for a group the queue found too stale;
        ``closed()`` when the queue is closed; ``stopped()`` ends the retries of a full queue;
        ``crashed(exc)`` gets the thread's error."""
        self.queue = queue
        self._cond = lock
        self._give_back = give_back
        self._closed = closed
        self._stopped = stopped
        self._crashed = crashed
        self._outbox: Groups = []
        self._sending = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        # The queue's answers so far (the rollouter's statistics; accepted: admission control).
        self.counts = {"groups_accepted": 0, "groups_rejected_stale": 0, "groups_rejected_full": 0}

    def offer(self, groups: Groups) -> None:
        """Hand ``groups`` to the thread (the caller holds the lock)."""
        self._outbox.extend(groups)
        self._cond.notify_all()

    def in_hand(self) -> int:
        """Groups offered and not answered yet (the caller holds the lock)."""
        return len(self._outbox) + self._sending

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the thread put what was offered, read the answer, and end."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(CALL_TIMEOUT_S + 5)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._outbox and not self._stop:
                        self._cond.wait(1.0)
                    if not self._outbox:
                        return
                    groups, self._outbox = self._outbox, []
                    self._sending = len(groups)
                try:
                    # A full queue is retried after its wait for room (backpressure) until
                    # it takes them or the rollouter stops.
                    while groups:  # each at its oldest sample's version; 1 s wait for room
                        versions = [min(s.v_start for s in group) for group in groups]
                        answer = queue_answer(self.queue, "put_many", groups, versions, timeout=1.0)
                        with self._cond:
                            groups = self._count(groups, answer)
                        if self._stopped():
                            break
                finally:
                    with self._cond:
                        self._sending = 0
                        self._cond.notify_all()  # accepted groups may make admission room
        except BaseException as exc:
            self._crashed(exc)

    def _count(self, groups: Groups, answers: list[Any]) -> Groups:
        """Count a put's answers (under the lock); returns the groups refused as full."""
        retry = []
        for group, answer in zip(groups, answers):
            name = getattr(answer, "name", str(answer))
            if name == "ACCEPTED":
                self.counts["groups_accepted"] += 1
            elif name == "REJECTED_STALE":
                self.counts["groups_rejected_stale"] += 1
                self._give_back(group[0].metadata["prompt_position"])
            elif name == "CLOSED":
                self._closed()
                return []
            else:
                self.counts["groups_rejected_full"] += 1  # full: try again after the wait
                retry.append(group)
        return retry
