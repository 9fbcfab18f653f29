"""The head's object table: who counts each object, and when it is freed.

    ObjectRef.__del__ (any thread, maybe inside the GC) --queue_release--> releases deque
    router / driver thread (head lock held) --> ObjectTable --free(stored)--> segment ledger

An object is counted by the driver's ObjectRefs (``local_refs``), by the refs each child holds
(``holders``, child key -> count), by the pending calls that take it as an argument (``uses``)
and by futures waiting for it (``watchers``); one pickled into another value is ``pinned`` until
shutdown. It is freed, and its stored value handed to ``free``, once it is stored and none of
those count it (``is_freeable``). Pure data: no process, no lock (the head holds its own lock
around every call), no wake-up; unit tested in tests/runtime/test_local_objects.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

from miniray.errors import ObjectLostError
from miniray.runtime.local.protocol import Stored


class ObjectEntry:
    __slots__ = ("holders", "local_refs", "pinned", "producer", "stored", "uses", "watchers")

    def __init__(self, producer: str, local_refs: int = 0):
        self.stored: Stored | None = None
        self.producer = producer  # for error messages: "task f()", "put()", ...
        self.local_refs = local_refs
        self.holders: dict[int, int] = {}  # child key -> refs held there
        self.pinned = False
        self.uses = 0  # pending calls that take it as an argument
        self.watchers: list[Callable[[], None]] = []


def is_freeable(entry: ObjectEntry) -> bool:
    """The invariant: a stored object nothing counts any more is freed."""
    return (
        entry.stored is not None
        and entry.local_refs <= 0
        and not entry.holders
        and not entry.pinned
        and entry.uses <= 0
        and not entry.watchers
    )


class ObjectTable:
    """Object id -> ``ObjectEntry``; frees an entry the moment ``is_freeable`` holds."""

    def __init__(self, free: Callable[[Stored], None]):
        self._entries: dict[str, ObjectEntry] = {}
        self._free = free  # the freed value's segment goes back (SegmentLedger.free)
        self._releases: deque[str] = deque()  # driver refs dropped, not yet counted
        self._watched: set[str] = set()  # ids with watchers, until they are stored

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, oid: str) -> bool:
        return oid in self._entries

    def get(self, oid: str) -> ObjectEntry | None:
        return self._entries.get(oid)

    def values(self) -> Iterator[ObjectEntry]:
        return iter(list(self._entries.values()))

    # -- creating and storing -------------------------------------------------------------
    def new(self, oid: str, producer: str, *, owner: int | None) -> ObjectEntry:
        """A new object, counted by one ref: the driver's (``owner`` None) or a child's."""
        entry = ObjectEntry(producer, local_refs=1 if owner is None else 0)
        if owner is not None:
            entry.holders[owner] = 1
        self._entries[oid] = entry
        return entry

    def store(self, oid: str, stored: Stored) -> ObjectEntry | None:
        """Set the value; None (and the value freed) when nobody wants the object any more.

        The caller wakes the object's waiters and then calls ``maybe_free``."""
        entry = self._entries.get(oid)
        if entry is None:
            self._free(stored)
            return None
        entry.stored = stored
        return entry

    def maybe_free(self, oid: str, entry: ObjectEntry) -> None:
        # ``entry`` may have been freed already, deeper in this same event (a waiter that
        # failed with this value released its use of it).
        if self._entries.get(oid) is entry and is_freeable(entry):
            del self._entries[oid]
            assert entry.stored is not None
            self._free(entry.stored)

    def require(self, oids: Iterable[str], what: str = "") -> list[ObjectEntry]:
        """The entries of ``oids``; ObjectLostError naming the first unknown one."""
        entries = []
        for oid in oids:
            entry = self._entries.get(oid)
            if entry is None:
                raise lost(oid, what)
            entries.append(entry)
        return entries

    # -- counting -------------------------------------------------------------------------
    def queue_release(self, oid: str) -> bool:
        """A driver ObjectRef was dropped: safe from any thread, even inside the GC while the
        head lock is held (only a deque append); counted at the next ``drain_releases``.

        True when the caller should wake the router to count it now: the object holds a
        shared-memory segment (a small value waits for the router's next turn, as it always
        did; one not stored yet is counted when it is, on the router's turn). The entry is
        read without the lock: a dict lookup and an attribute read, atomic in CPython."""
        self._releases.append(oid)
        entry = self._entries.get(oid)
        stored = None if entry is None else entry.stored
        return stored is not None and stored[1].segment is not None

    def drain_releases(self) -> None:
        while self._releases:
            oid = self._releases.popleft()
            entry = self._entries.get(oid)
            if entry is not None:
                entry.local_refs -= 1
                self.maybe_free(oid, entry)

    def release_held(self, child_key: int, oids: Iterable[str]) -> None:
        """A child dropped one ref of each of ``oids``."""
        for oid in oids:
            entry = self._entries.get(oid)
            if entry is not None and child_key in entry.holders:
                entry.holders[child_key] -= 1
                if entry.holders[child_key] <= 0:
                    del entry.holders[child_key]
                self.maybe_free(oid, entry)

    def hold(self, child_key: int, oids: Iterable[str]) -> None:
        """A child made a ref of each of ``oids`` it was lent (unpickled from a call's
        arguments): it holds one more, released as its own refs are. Gone objects are skipped
        (a ref unpickled from a stored value whose object is pinned anyway)."""
        for oid in oids:
            entry = self._entries.get(oid)
            if entry is not None:
                entry.holders[child_key] = entry.holders.get(child_key, 0) + 1

    def forget_holder(self, child_key: int) -> None:
        """A dead child holds nothing. (Objects stay until the next count that frees them.)"""
        for entry in self._entries.values():
            entry.holders.pop(child_key, None)

    def pin(self, oids: Iterable[str]) -> None:
        """Pickled into another value: kept until shutdown."""
        for oid in oids:
            entry = self._entries.get(oid)
            if entry is not None:
                entry.pinned = True

    def lend(self, oids: list[str]) -> list[str]:
        """A call carries refs to ``oids`` inside its arguments: one use each for the call's
        time (released with ``release_uses``), never waited for. Returns the known ones."""
        known = [oid for oid in oids if oid in self._entries]
        self.take_uses(known)
        return known

    def take_uses(self, deps: list[str]) -> list[str]:
        """A pending call takes ``deps`` as arguments: one use each. Returns those not stored
        yet; ObjectLostError if one is unknown (nothing is counted then past it)."""
        missing = []
        for oid in deps:
            entry = self._entries.get(oid)
            if entry is None:
                raise lost(oid, "argument ")
            entry.uses += 1
            if entry.stored is None:
                missing.append(oid)
        return missing

    def release_uses(self, deps: Iterable[str]) -> None:
        """A call that took these objects as arguments is over."""
        for oid in deps:
            entry = self._entries.get(oid)
            if entry is not None:
                entry.uses -= 1
                self.maybe_free(oid, entry)

    # -- arguments ------------------------------------------------------------------------
    def stored_of(self, deps: list[str]) -> list[Stored | None]:
        """The stored values of a call's arguments (which it holds uses of), None if not yet."""
        return [self._entries[oid].stored for oid in deps]

    def failed(self, deps: list[str]) -> Stored | None:
        """The stored error of the first argument that failed, if any did."""
        for oid in deps:
            stored = self._entries[oid].stored
            if stored is not None and stored[0]:
                return stored
        return None

    def values_of(self, deps: list[str]) -> dict[str, Stored]:
        """Argument id -> stored value, for a call whose arguments are all stored."""
        values = {}
        for oid in deps:
            stored = self._entries[oid].stored
            assert stored is not None, oid
            values[oid] = stored
        return values

    # -- futures --------------------------------------------------------------------------
    def watch(self, oid: str, entry: ObjectEntry, callback: Callable[[], None]) -> None:
        """Run ``callback`` (outside the lock) once ``oid`` is stored: see take_callbacks."""
        entry.watchers.append(callback)
        self._watched.add(oid)

    def take_callbacks(self) -> list[Callable[[], None]]:
        """Watchers of objects stored since the last call, each holding a use of its object
        until its future has decoded the value (futures.py releases it)."""
        callbacks: list[Callable[[], None]] = []
        for oid in list(self._watched):
            entry = self._entries.get(oid)
            if entry is None or entry.stored is not None:
                self._watched.discard(oid)
            if entry is not None and entry.stored is not None:
                entry.uses += len(entry.watchers)
                callbacks.extend(entry.watchers)
                entry.watchers = []
        return callbacks

    # -- the end --------------------------------------------------------------------------
    def segments_in_use(self) -> set[str | None]:
        return {e.stored[1].segment for e in self._entries.values() if e.stored is not None}

    def clear(self) -> list[Callable[[], None]]:
        """Shutdown: forget every object; the watchers still waiting (to be failed)."""
        waiting = [w for entry in self._entries.values() for w in entry.watchers]
        self._entries.clear()
        self._watched.clear()
        return waiting


def lost(oid: str, what: str = "") -> ObjectLostError:
    """The error for a ref this runtime does not know, saying how that happens."""
    return ObjectLostError(
        f"{what}ObjectRef({oid}) is not known to this runtime: it was freed, or it comes from "
        "an earlier miniray.init() session"
    )
