"""Which shared-memory segments this process created, maps, and may write into again.

Writing 100 MB into a fresh /dev/shm segment costs ~5x a memcpy: the kernel must allocate and
zero 25,000 pages first. So a segment is not unlinked when its object is freed; it goes back to
the process that created it, which reuses it for the next large value. That is only safe once
no process maps the old contents any more (readers map copy-on-write, and pages they have not
written still show the file), so every process counts its live mappings and reports when a
segment is no longer mapped:

    reader process                     head (driver)                    creator process
    deserialize -> track_mapping       counts deliveries per child      acquire(): reuse a
    mapping garbage-collected ->       object freed and every           pooled segment or
      unmapped hook (name, receipts)   delivery unmapped -> reclaim --> create a new one

A process reports a segment only when it has no mapping of it *and* no delivery of it still
waiting to be deserialized; the report says how many deliveries it consumed, so the head, which
counts what it sent, knows whether another delivery is still in flight.

Pooled segments hold their pages, and in a small /dev/shm (Docker's 64 MB) every process's pool
together could crowd out the next value. So a pooled segment is renamed ``<name>.free``
(shm.mark_free), and a creation that finds the directory full deletes pooled segments, its own
first and then any other process's of the session, until the value fits, and tries once more.
Another process's pool must be reachable: a worker's value must not fail because the driver
keeps pages it is not using. Every removal or reuse of a pooled segment first claims it by a
rename (shm.claim_free, shm.evict_free), so the owner never writes into a segment another process
has just evicted (its pages are gone: the write would SIGBUS), and it gets a new segment instead.
A process also pools only while the directory is less than half full (past that it deletes what
is freed, its pool included), so that most creations find room without evicting first.

Readers keep their mappings too. Mapping a segment afresh costs page faults on first touch
(~25-45 ms per GB per reader here), and a weight sync every step sends each reader the same two
segments in turn. So once the last view over a reader's mapping of a large segment is gone, the
segment is reported unmapped as before (the accounting above does not change), but the mapping
itself goes to ``KeptMaps``, a bounded cache, and a later delivery of that segment reads through
it, its pages already mapped: the creator's rewrite shows through every page this process has
not written (shm's docstring says why). Each delivery gets its own exporter over the kept
mapping, whose views it tracks as the mapping itself was tracked before:

    deliver -> KeptMaps.take: idle mapping, if the file is the one mapped and never written here,
               else a fresh one -> exporter (one per delivery) -> views -> the value
    last view gone -> exporter finalized -> KeptMaps.put(mapping) -> unmapped hook (as before)
                                                  `-> a thread tests it for writes (pagemap) now,
                                                      so take() finds the answer ready
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from miniray.errors import ObjectStoreFullError
from miniray.runtime import shm


def _env_mib(name: str, default: int) -> int:
    """``$name`` as a whole number of MiB, in bytes; a clear error for anything else."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default * 2**20
    if not raw.isdigit():
        raise ValueError(f"${name}={raw!r}: expected a whole number of MiB (0 or more)")
    return int(raw) * 2**20


POOL_LIMIT_BYTES = _env_mib("MINIRAY_SHM_POOL_MB", 1024)
MIN_POOLED_BYTES = 1 << 20
# Readers keep idle mappings of segments this large and no smaller: faulting in a fresh 16 MiB
# mapping costs about 1 ms (16-28 ms per 256 MiB measured on the 2-core development machine),
# little more than checking a kept one (shm.written, ~0.25 ms), and each kept mapping holds a
# file descriptor (Python's mmap keeps one), so at the default limit a process holds at most 64.
MIN_KEPT_BYTES = 16 << 20
# Idle mappings a reader keeps, in bytes. They cost no memory (they map the segment's own pages,
# which its creator's pool holds anyway, and a deleted segment is emptied first, shm.delete), but
# their touched pages count in the reader's RSS: a sum of RSS over processes counts them again.
KEPT_LIMIT_BYTES = _env_mib("MINIRAY_SHM_KEEP_MB", 1024)


@dataclass
class _Mapping:
    """A reader's copy-on-write mapping of a segment, and what it maps."""

    mapping: mmap.mmap
    file: shm.FileId
    generation: int  # KeptMaps' generation when it was mapped: older ones are never kept
    # Tested since its last view went (KeptMaps.put): True if this process never wrote into
    # it, False if it did or the test failed, None while not tested yet.
    unwritten: bool | None = None


def _unwritten(kept: _Mapping) -> bool:
    """Whether this process never wrote into ``kept`` (``shm.written``); a test that cannot
    run (the mapping closed meanwhile) says it did."""
    try:
        return not shm.written(kept.mapping, len(kept.mapping))
    except (ValueError, BufferError, OSError):
        return False


def _test_unwritten(kept: _Mapping) -> None:
    """``_unwritten``, noted on ``kept``: once its last view is gone nothing here can write
    into it any more, so the answer holds until the mapping is handed out again."""
    kept.unwritten = _unwritten(kept)


class _Tester:
    """One thread that tests idle mappings (``_test_unwritten``) off the caller's path: the
    test reads a pagemap entry per page, ~7-8 ms per GB on the 2-core development machine,
    and a reader's next delivery of the segment (the next weight sync) then finds it done."""

    def __init__(self) -> None:
        self._queue: Any = None
        # Re-entrant: submit() runs in finalizers, which a collection inside submit() may run.
        self._lock = threading.RLock()

    def submit(self, kept: _Mapping) -> None:
        with self._lock:
            if self._queue is None:
                import queue

                self._queue = queue.SimpleQueue()
                threading.Thread(
                    target=self._run, args=(self._queue,), name="miniray-kept-maps", daemon=True
                ).start()
            self._queue.put(kept)

    @staticmethod
    def _run(jobs: Any) -> None:
        while True:
            _test_unwritten(jobs.get())

    def forget(self) -> None:
        self._queue = None  # a forked child has no thread: it starts its own


_TESTER = _Tester()
os.register_at_fork(after_in_child=_TESTER.forget)


class KeptMaps:
    """This process's idle copy-on-write mappings of large segments, for the next delivery of
    the same segment (least recently released first out, at most ``KEPT_LIMIT_BYTES``)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # put() runs in finalizers, maybe inside a locked section
        self._idle: OrderedDict[str, _Mapping] = OrderedDict()
        self._bytes = 0
        self._generation = 0
        self.reused = 0  # deliveries read through a kept mapping (for tests and benchmarks)

    def take(self, name: str, size: int) -> _Mapping:
        """A mapping of at least the first ``size`` bytes of ``name``: a kept one if the file is
        the one it maps and this process never wrote into it, else a fresh one."""
        self.prune()
        with self._lock:
            kept = self._idle.pop(name, None)
            if kept is not None:
                self._bytes -= len(kept.mapping)
            generation = self._generation
        if kept is not None:
            # The delivery's object is alive, so its segment is under its own name (not pooled).
            unwritten = kept.unwritten
            if (
                len(kept.mapping) >= size
                and shm.file_id(name) == kept.file
                and (unwritten or (unwritten is None and _unwritten(kept)))
            ):
                kept.unwritten = None  # handed out: views may write into it again
                with self._lock:
                    self.reused += 1
                return kept
            _close(kept.mapping)
        mapping, file = shm.map_private_identified(name, size)
        return _Mapping(mapping, file, generation)

    def put(self, name: str, kept: _Mapping) -> None:
        """The last view over ``kept`` is gone: keep it for the next delivery of ``name``."""
        self.prune()
        dropped = []
        with self._lock:
            if kept.generation != self._generation or len(kept.mapping) > KEPT_LIMIT_BYTES:
                dropped.append(kept.mapping)
            else:
                old = self._idle.pop(name, None)  # two deliveries of one value: keep the newer
                if old is not None:
                    self._bytes -= len(old.mapping)
                    dropped.append(old.mapping)
                self._idle[name] = kept
                self._bytes += len(kept.mapping)
                kept.unwritten = None
                _TESTER.submit(kept)
                while self._bytes > KEPT_LIMIT_BYTES:
                    _old_name, evicted = self._idle.popitem(last=False)
                    self._bytes -= len(evicted.mapping)
                    dropped.append(evicted.mapping)
        for mapping in dropped:
            _close(mapping)

    def prune(self) -> None:
        """Drop the kept mappings of segments that are gone (deleted, or being evicted)."""
        with self._lock:
            idle = tuple(self._idle.items())
        gone = [(name, kept) for name, kept in idle if shm.file_id(name, pooled=True) != kept.file]
        with self._lock:
            # Only those still idle: another thread may have taken one meanwhile.
            dropped = [self._idle.pop(name) for name, kept in gone if self._idle.get(name) is kept]
            self._bytes -= sum(len(kept.mapping) for kept in dropped)
        for kept in dropped:
            _close(kept.mapping)

    def kept_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Drop every idle mapping, and never keep one mapped before now."""
        with self._lock:
            dropped = list(self._idle.values())
            self._idle.clear()
            self._bytes = 0
            self._generation += 1
            self.reused = 0
        for kept in dropped:
            _close(kept.mapping)


def _close(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:
        # A buffer of it is still exported (the exporter whose finalizer is running, or a
        # copy in progress on another thread): it is unmapped when that export ends.
        pass


@functools.lru_cache(maxsize=32)
def _exporter_type(size: int) -> Any:
    """A ctypes array type of ``size`` bytes, made directly: ``c_ubyte * size`` would be cached
    by ctypes forever, one type per size ever seen. Python 3.11 classes cannot export buffers,
    and a memoryview of a memoryview does not keep its parent alive, so a per-delivery object
    that views keep alive (and that takes weakrefs) has to be a ctypes array (or numpy, which
    the runtime does not require)."""
    array_meta: Any = type(ctypes.c_ubyte * 1)
    return array_meta("SegmentView", (ctypes.Array,), {"_type_": ctypes.c_ubyte, "_length_": size})


class SegmentPool:
    """This process's segments: those it created (and may write into again, pooled once
    freed), and its live mappings and unread deliveries of anyone's. One per process
    (``POOL``): unpickling a delivery has nothing but this module to find it by."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # finalizers may run inside a locked section
        self._capacity: dict[str, int] = {}  # segments this process created -> file size
        # Our writable mapping of each segment we created, kept open: mapping 100 MB with
        # MAP_POPULATE and unmapping it again costs about as much as copying the data.
        self._writers: dict[str, mmap.mmap] = {}
        self._free: list[tuple[int, str]] = []  # own segments nobody maps: (capacity, name)
        self._free_bytes = 0
        self._maps: dict[str, int] = {}
        self._pending: dict[str, int] = {}  # deliveries received but not deserialized yet
        self._consumed: dict[str, int] = {}  # deliveries deserialized since the last report
        self._unmapped_hook: Callable[[str, int], None] | None = None
        self.kept = KeptMaps()

    def set_unmapped_hook(self, hook: Callable[[str, int], None] | None) -> None:
        """``hook(name, deliveries consumed)`` once this process no longer maps ``name``."""
        self._unmapped_hook = hook

    def acquire(self, session_id: str, size: int) -> tuple[str, mmap.mmap]:
        """A writable mapping of ``size`` bytes: a pooled segment of ours if one fits."""
        with self._lock:
            best = None
            for i, (capacity, _name) in enumerate(self._free):
                if size <= capacity <= 2 * size and (
                    best is None or capacity < self._free[best][0]
                ):
                    best = i
            if best is not None:
                capacity, name = self._free.pop(best)
                self._free_bytes -= capacity
        if best is not None:
            if not shm.claim_free(name):
                self._drop(name)  # evicted by a process that needed the room: never touch it
            else:
                mapping = self._writers.get(name)
                if mapping is not None and len(mapping) >= size:
                    return name, mapping
                try:
                    mapping = shm.open_shared(name, capacity)
                except OSError:
                    self.forget(name)
                else:
                    with self._lock:
                        self._writers[name] = mapping
                    return name, mapping
        name = shm.new_name(session_id)
        try:
            mapping = shm.create(name, size)
        except ObjectStoreFullError:
            if not self._make_room(session_id, size):
                raise
            mapping = shm.create(name, size)
        with self._lock:
            self._capacity[name] = size
            self._writers[name] = mapping
        return name, mapping

    def reclaim(self, name: str) -> None:
        """The head says nobody maps ``name`` any more: keep it for reuse, or delete it."""
        if _space_is_short():
            self._evict_pool()
            self.forget(name)
            return
        with self._lock:
            capacity = self._capacity.get(name)
        if capacity is None or capacity < MIN_POOLED_BYTES:
            self.forget(name)
            return
        # Renamed before it is listed as ours to reuse: acquire() claims by renaming it back.
        try:
            shm.mark_free(name)
        except FileNotFoundError:  # swept already (shutdown)
            self._drop(name)
            return
        self._prune_evicted()
        with self._lock:
            self._free.append((capacity, name))
            self._free_bytes += capacity
            evicted = []
            # Keep at least the newest segment, however large: a model's weights synced every
            # step are one big value, and re-faulting its pages each time costs 5 memcpys.
            while self._free_bytes > POOL_LIMIT_BYTES and len(self._free) > 1:
                cap, old = self._free.pop(0)
                self._free_bytes -= cap
                evicted.append(old)
        for old in evicted:
            self._evict_pooled(old)

    def _make_room(self, session_id: str, size: int) -> bool:
        """The directory is full: delete pooled segments, ours and then other processes', until
        ``size`` bytes are free. False if there was none to delete."""
        evicted = self._evict_pool()
        for name in shm.list_free(session_id):
            if _has_room(size):
                return True
            # A name of ours here is one another thread of ours has just pooled: fair game too
            # (acquire() then fails to claim it and makes a new segment).
            evicted = shm.evict_free(name) or evicted
        return evicted

    def _evict_pool(self) -> bool:
        """Delete every pooled segment of ours; False if there was none."""
        with self._lock:
            evicted = [name for _cap, name in self._free]
            self._free.clear()
            self._free_bytes = 0
        for name in evicted:
            self._evict_pooled(name)
        return bool(evicted)

    def _evict_pooled(self, name: str) -> None:
        """Delete a pooled segment of ours, unless another process has evicted it already."""
        self._drop(name)
        shm.evict_free(name)

    def _prune_evicted(self) -> None:
        """Forget pooled segments of ours that other processes evicted (and close our
        mappings, which have no pages any more)."""
        with self._lock:
            gone = [
                e for e in self._free if not os.path.exists(shm.path_of(e[1] + shm.FREE_SUFFIX))
            ]
            for entry in gone:
                self._free.remove(entry)
                self._free_bytes -= entry[0]
        for _cap, name in gone:
            self._drop(name)

    def _drop(self, name: str) -> None:
        """Forget a segment of ours and close our mapping of it, leaving the file alone."""
        with self._lock:
            self._capacity.pop(name, None)
            mapping = self._writers.pop(name, None)
        if mapping is not None:
            mapping.close()

    def forget(self, name: str) -> None:
        """Delete a segment of ours that is not pooled (and nobody maps for a value)."""
        self._drop(name)
        shm.delete(name)

    def pooled_bytes(self) -> int:
        """Bytes of our pooled segments that no other process has evicted."""
        self._prune_evicted()
        return self._free_bytes

    def map_delivery(self, name: str, size: int) -> memoryview:
        """A copy-on-write view of the first ``size`` bytes of segment ``name``, which counts as
        a mapping of it until it and every view made from it are gone."""
        if size < MIN_KEPT_BYTES or size > KEPT_LIMIT_BYTES:
            mapping = shm.map_private(name, size)
            self.track_mapping(name, mapping)
            return memoryview(mapping)
        kept = self.kept.take(name, size)
        exporter = _exporter_type(size).from_buffer(kept.mapping)
        with self._lock:
            self._maps[name] = self._maps.get(name, 0) + 1
        weakref.finalize(exporter, self._on_unmap_kept, name, kept)
        return memoryview(exporter).cast("B")

    def track_mapping(self, name: str, mapping: mmap.mmap) -> None:
        with self._lock:
            self._maps[name] = self._maps.get(name, 0) + 1
        weakref.finalize(mapping, self._on_unmap, name)

    def _on_unmap_kept(self, name: str, kept: _Mapping) -> None:
        try:
            self.kept.put(name, kept)  # before the report: the next value may be on its way
        finally:  # a mapping not kept is only slower; a lost report would leak the segment
            self._on_unmap(name)

    def delivery_received(self, name: str) -> None:
        with self._lock:
            self._pending[name] = self._pending.get(name, 0) + 1

    def delivery_consumed(self, name: str) -> None:
        """A received delivery was deserialized (or dropped unread)."""
        with self._lock:
            left = self._pending.get(name, 0) - 1
            if left > 0:
                self._pending[name] = left
            else:
                self._pending.pop(name, None)
            self._consumed[name] = self._consumed.get(name, 0) + 1
        self._report_if_done(name)

    def _on_unmap(self, name: str) -> None:
        with self._lock:
            left = self._maps.get(name, 0) - 1
            if left > 0:
                self._maps[name] = left
                return
            self._maps.pop(name, None)
        self._report_if_done(name)

    def _report_if_done(self, name: str) -> None:
        with self._lock:
            if self._maps.get(name) or self._pending.get(name):
                return
            consumed = self._consumed.pop(name, 0)
            hook = self._unmapped_hook
        if hook is not None and consumed:
            hook(name, consumed)

    def local_maps(self, name: str) -> int:
        return self._maps.get(name, 0)

    def reset(self) -> None:
        """Forget everything (a new session in this process)."""
        with self._lock:
            for mapping in self._writers.values():
                # _close: another thread may still be copying a value into it (the copy
                # releases the GIL); the mapping then goes with that copy's buffer.
                _close(mapping)
            self._writers.clear()
            self._capacity.clear()
            self._free.clear()
            self._free_bytes = 0
            self._maps.clear()
            self._pending.clear()
            self._consumed.clear()
        self.kept.clear()


def _space_is_short() -> bool:
    """Is the segment directory half full or more? (Then pooled pages are better given back.)"""
    room = shm.space()
    return room is not None and room[1] * 2 < room[0]


def _has_room(size: int) -> bool:
    room = shm.space()
    return room is not None and room[1] >= size


# This process's pool, and its methods as the module's functions (serialization, the head and
# the workers call these; deserializing has nothing else to find it by).
POOL = SegmentPool()
set_unmapped_hook = POOL.set_unmapped_hook
acquire = POOL.acquire
reclaim = POOL.reclaim
forget = POOL.forget
pooled_bytes = POOL.pooled_bytes
track_mapping = POOL.track_mapping
map_delivery = POOL.map_delivery
kept_bytes = POOL.kept.kept_bytes
delivery_received = POOL.delivery_received
delivery_consumed = POOL.delivery_consumed
local_maps = POOL.local_maps
reset = POOL.reset
