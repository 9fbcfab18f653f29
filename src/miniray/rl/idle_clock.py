"""IdleClock: the rollouter's idle seconds, by why its lanes waited.

    rollouter lane (holds the lock)                 get_statistics() (holds the lock)
    wait(cond, why): the wait in progress is         counts(): adds the wait in progress up
    (why, since); cond.wait(1.0); add it up          to now, so a wait that has not ended is
                                                     in the statistics already

``why`` is ``"paused"`` (a weight sync) or ``"throttled"`` (no admission room: the staleness
bound). The clock has no lock of its own: every call is made under the rollouter's.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["IdleClock"]


class IdleClock:
    """Counts the seconds the generation loop spends waiting, since it was made."""

    def __init__(self) -> None:
        self._counts: dict[str, Any] = {
            "idle_seconds": 0.0,  # waiting, for either of the two reasons below
            "idle_paused_seconds": 0.0,  # paused (a weight sync)
            "idle_throttled_seconds": 0.0,  # no admission room (staleness bound)
            "started_at": time.time(),
        }
        self._waiting: tuple[str, float] | None = None  # (idle counter, since) while waiting

    def wait(self, cond: threading.Condition, why: str) -> None:
        """``cond.wait(1.0)`` (``cond`` held), counted as idle for ``why``. Woken by resume,
        stop and load_weights (a new version makes room); the timeout only bounds the wait
        should a wake-up ever be missed."""
        self._waiting = (f"idle_{why}_seconds", time.time())
        cond.wait(1.0)
        self._add_until_now()
        self._waiting = None

    def counts(self) -> dict[str, Any]:
        """The idle counters and ``started_at``, the wait in progress included."""
        self._add_until_now()
        return dict(self._counts)

    def _add_until_now(self) -> None:
        if self._waiting is not None:
            why, since = self._waiting
            now = time.time()
            self._counts["idle_seconds"] += now - since
            self._counts[why] += now - since
            self._waiting = (why, now)
