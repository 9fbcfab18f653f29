"""The head's ledger of shared-memory segments: when a freed segment may be reused.

    head sends a value to a child ---deliver----> out[segment][child] += 1
    child reports it unmapped -----on_unmapped--> out[segment][child] -= consumed
    the driver's GC drops a view --on_local_unmap (any thread: queued, then drained)
    object table frees the value ----free-------> orphan while anyone maps it
    orphan nobody maps any more ------------------> reclaim: back to the creator's pool
                                                    (creator gone: unlinked)

A segment goes back to the process that created it (runtime/segments.py) only once no child has
a delivery of it outstanding and no view of it is alive in this process; until then it is an
orphan. Every decision is here; the head calls in under its lock, and only ``on_local_unmap``
runs without it. The creator of a segment is read from its name (``shm.parse_name``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from miniray.runtime import segments, shm
from miniray.runtime.serialization import Serialized


class SegmentLedger:
    def __init__(
        self,
        send_reclaim: Callable[[int, str], bool],
        wake: Callable[[], None],
        local_maps: Callable[[str], int] = segments.local_maps,
        reclaim_here: Callable[[str], None] = segments.reclaim,
    ):
        # send_reclaim(creator pid, name): hand a segment back to the live child that created
        # it; False when no such child can take it (then the segment is unlinked).
        self._send_reclaim = send_reclaim
        self._wake = wake  # the router drains local unmaps when woken
        self._local_maps = local_maps
        self._reclaim_here = reclaim_here
        self._out: dict[str, dict[int, int]] = {}  # segment -> child key -> deliveries out
        self._orphans: set[str] = set()  # freed, still mapped somewhere
        self._local_unmaps: deque[str] = deque()

    @property
    def orphans(self) -> frozenset[str]:
        return frozenset(self._orphans)

    def outstanding(self, name: str) -> dict[int, int]:
        """Child key -> deliveries of ``name`` not yet reported consumed (for tests)."""
        return dict(self._out.get(name, {}))

    def deliver(self, child_key: int, *values: Any) -> None:
        """Count segments sent to a child: they stay unreusable until it reports them.

        ``values`` are Serialized, or stored (is_error, Serialized) pairs, or None, all sent in
        one message: pickle sends an object that appears twice in it once (one argument passed
        twice, one error for every ref of a get), so each is counted once, as the child will
        report it consumed."""
        seen: set[int] = set()
        for value in values:
            ser = value[1] if isinstance(value, tuple) else value
            if ser is not None and ser.segment is not None and id(ser) not in seen:
                seen.add(id(ser))
                out = self._out.setdefault(ser.segment, {})
                out[child_key] = out.get(child_key, 0) + 1

    def free(self, ser: Serialized) -> None:
        """The value owning ``ser``'s segment is gone; reuse the segment once nobody maps it."""
        name = ser.segment
        if name is None:
            return
        ser.discard()
        if self._out.get(name) or self._local_maps(name):
            self._orphans.add(name)
        else:
            self._reclaim(name)

    def on_unmapped(self, child_key: int, reports: Iterable[tuple[str, int]]) -> None:
        """A child consumed deliveries and no longer maps these segments."""
        for name, consumed in reports:
            out = self._out.get(name)
            if out is not None and child_key in out:
                out[child_key] -= consumed
                if out[child_key] <= 0:
                    del out[child_key]
                if not out:
                    del self._out[name]
            self._maybe_reclaim(name)

    def on_local_unmap(self, name: str, consumed: int) -> None:
        """segments' hook in the driver. Runs in whichever thread dropped the last view (maybe
        inside the GC, maybe while that thread holds the head lock): only queue and wake."""
        self._local_unmaps.append(name)
        self._wake()

    def drain_local_unmaps(self) -> None:
        while self._local_unmaps:
            self._maybe_reclaim(self._local_unmaps.popleft())

    def forget_child(self, child_key: int) -> None:
        """A dead child maps nothing: its outstanding deliveries no longer hold a segment."""
        for name in list(self._out):
            out = self._out[name]
            out.pop(child_key, None)
            if not out:
                del self._out[name]
                self._maybe_reclaim(name)

    def sweep_created_by(self, pid: int, session_id: str, in_use: set[str | None]) -> None:
        """Unlink the segments a dead child created that no value, call or orphan uses."""
        in_use = in_use | self._orphans
        for name in shm.list_session(session_id):
            if creator_pid(name) == pid and name not in in_use:
                shm.delete(name)

    def _maybe_reclaim(self, name: str) -> None:
        if name in self._orphans and not self._out.get(name) and not self._local_maps(name):
            self._reclaim(name)

    def _reclaim(self, name: str) -> None:
        self._out.pop(name, None)
        self._orphans.discard(name)
        creator = creator_pid(name)
        if creator == os.getpid():
            self._reclaim_here(name)
        elif not self._send_reclaim(creator, name):
            shm.delete(name)


def creator_pid(name: str) -> int:
    """The pid that created segment ``name``; -1 for a name shm did not make."""
    parsed = shm.parse_name(name)
    return -1 if parsed is None else parsed.creator_pid
