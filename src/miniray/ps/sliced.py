"""Sliced reduction: several processes each reduce one slice of every worker's parameters.

The gather path funnels K x model bytes through the server process. Here the arithmetic is
spread instead; on the local backend the workers' results already sit in /dev/shm segments
that any process maps copy-on-write at no cost, so nothing is copied to hand them around:

    server: plan P byte-balanced slices of the flattened parameters (``plan_slices``)
       | helper k = 1..P-1 <-- reduce(task k, *worker refs)   maps the workers' segments
       | server            <-- slice 0 itself, from the values it already maps
       | every element of the result segment is written by exactly one process
       +-- wait for the helpers (deadline) -> views of the result segment, per parameter

Each slice is reduced in chunks of ``CHUNK_BYTES`` per input, so a chunk's K inputs, its
NaN/Inf checks and the strategy's temporaries stay in cache: memory sees each input byte read
once and each result byte written once, as a fused kernel would.

A helper that raises, dies or misses the deadline is killed and dropped, the result segment it
may still be writing into is retired (unlinked; its mapping dies with it) and the server reduces
every slice itself into a fresh segment, so the round still completes; ``run`` reports the
helper, and the next round starts a replacement.

The result segment is created by the server process under the session's name prefix
(``miniray_<session>_<pid>_<n>``), so the runtime removes it at shutdown and when the server
process dies; ``close`` removes it earlier. On backends without session segments (inline, Ray)
the result is a private buffer and the server reduces alone (``num_slices`` is 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import mmap
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import miniray
from miniray.ps import gather
from miniray.ps.strategies import SyncStrategy
from miniray.runtime import context, shm

log = logging.getLogger(__name__)

WeightList = list[torch.Tensor]

CHUNK_BYTES = 1 << 20  # per input; K inputs of 1 MiB + temporaries fit a core's L2/L3
ALIGN_ELEMENTS = 64  # slice boundaries inside a parameter fall on multiples of this


@dataclass(frozen=True)
class Layout:
    """Where each parameter's result lives in the result buffer (byte offsets, 64-aligned)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype]) -> Layout:
        offsets, offset = [], 0
        for shape, dtype in zip(shapes, dtypes):
            offsets.append(offset)
            offset = shm.aligned(offset + _numel(shape) * _itemsize(dtype))
        return cls(tuple(tuple(s) for s in shapes), tuple(dtypes), tuple(offsets), max(offset, 1))

    def numels(self) -> list[int]:
        return [_numel(s) for s in self.shapes]

    def views(self, buffer: torch.Tensor) -> WeightList:
        """Each parameter's result as a tensor of its shape over ``buffer`` (flat uint8)."""
        out = []
        for shape, dtype, offset in zip(self.shapes, self.dtypes, self.offsets):
            nbytes = _numel(shape) * _itemsize(dtype)
            out.append(buffer.narrow(0, offset, nbytes).view(dtype).view(shape))
        return out


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of the flattened parameter ``param``."""

    param: int
    start: int
    stop: int


@dataclass(frozen=True)
class SliceTask:
    """What one participant reduces: its pieces, into which buffer, and how."""

    pieces: tuple[Piece, ...]
    layout: Layout
    worker_ids: tuple[int, ...]
    # Floating inputs are cast to this dtype per parameter first (gradients mode upcasts to
    # the global weights' accumulation dtype); None: used as they are.
    upcast: tuple[torch.dtype | None, ...]
    # True: every input chunk is checked for NaN/Inf. False (a strategy through which NaN
    # always reaches the result): only a non-finite result chunk has its inputs checked.
    check_inputs: bool
    worker_weights: dict[int, float] = field(default_factory=dict)
    segment: str | None = None  # the shared result segment (helpers map it by name)
    # torch intra-op threads per participant: the CPUs divided among the P processes, so that
    # they do not oversubscribe the machine (spinning OpenMP threads on a busy core are slow).
    threads: int = 1


def plan_slices(
    numels: Sequence[int], itemsizes: Sequence[int], num_slices: int
) -> list[list[Piece]]:
    """Cut the parameters, laid end to end, into ``num_slices`` runs of about equal bytes.

    A cut inside a parameter falls on a multiple of ``ALIGN_ELEMENTS``; a slice may be empty
    when the model is smaller than the number of slices.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices!r} must be >= 1")
    starts, total = [], 0
    for n, size in zip(numels, itemsizes):
        starts.append(total)
        total += n * size

    def locate(cut: int) -> tuple[int, int]:
        for p, (n, size) in enumerate(zip(numels, itemsizes)):
            if cut < starts[p] + n * size:
                element = (cut - starts[p]) // size
                return p, element - element % ALIGN_ELEMENTS
        return len(numels), 0

    bounds = [locate(total * k // num_slices) for k in range(num_slices)] + [(len(numels), 0)]
    bounds[0] = (0, 0)
    slices = []
    for (p0, e0), (p1, e1) in itertools.pairwise(bounds):
        pieces = []
        for p in range(p0, min(p1, len(numels) - 1) + 1):
            start = e0 if p == p0 else 0
            stop = e1 if p == p1 else numels[p]
            if stop > start:
                pieces.append(Piece(p, start, stop))
        slices.append(pieces)
    return slices


def reduce_slice(
    strategy: SyncStrategy,
    task: SliceTask,
    weight_lists: Sequence[WeightList],
    buffer: torch.Tensor,
) -> dict[int, int]:
    """Reduce ``task.pieces`` of ``weight_lists`` into ``buffer``; returns, for each worker
    with NaN/Inf in these pieces, the first such parameter index."""
    with _threads(task.threads):
        return _reduce_pieces(strategy, task, weight_lists, buffer)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


def _reduce_pieces(
    strategy: SyncStrategy,
    task: SliceTask,
    weight_lists: Sequence[WeightList],
    buffer: torch.Tensor,
) -> dict[int, int]:
    outs = [v.reshape(-1) for v in task.layout.views(buffer)]
    bad: dict[int, int] = {}
    for piece in task.pieces:
        p = piece.param
        inputs = [w[p].reshape(-1) for w in weight_lists]
        out = outs[p]
        floating = out.is_floating_point()
        step = max(ALIGN_ELEMENTS, CHUNK_BYTES // max(1, inputs[0].element_size()))
        for a in range(piece.start, piece.stop, step):
            b = min(a + step, piece.stop)
            chunk = [t[a:b] for t in inputs]
            if floating and task.upcast[p] is not None:
                chunk = [c.to(task.upcast[p]) for c in chunk]
            if floating and task.check_inputs:
                _note_nonfinite(chunk, task.worker_ids, p, bad)
            strategy.reduce_into([out[a:b]], [[c] for c in chunk], task.worker_ids)
            if floating and not task.check_inputs and not _finite(out[a:b]):
                _note_nonfinite(chunk, task.worker_ids, p, bad)
    return bad


def _finite(t: torch.Tensor) -> bool:
    # A finite sum proves every element finite (see validation.first_nonfinite).
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _note_nonfinite(
    chunk: Sequence[torch.Tensor], worker_ids: Sequence[int], param: int, bad: dict[int, int]
) -> None:
    for wid, c in zip(worker_ids, chunk):
        if wid not in bad and not _finite(c):
            bad[wid] = param


class SliceReducer:
    """A helper process of the sliced path (an actor the server starts and owns)."""

    def __init__(self, strategy_cls: type[SyncStrategy], strategy_kwargs: dict[str, Any]):
        # Parallelism comes from the processes (SliceTask.threads sets each call's share).
        torch.set_num_threads(1)
        self.strategy = strategy_cls(**strategy_kwargs)
        if not hasattr(self.strategy, "worker_weights"):
            self.strategy.worker_weights = {}
        self.segment: _Mapped | None = None

    def reduce(self, task: SliceTask, *weight_lists: WeightList) -> dict[int, int]:
        assert task.segment is not None, "a helper needs the shared result segment"
        _set_worker_weights(self.strategy, task.worker_weights)
        if self.segment is None or self.segment.name != task.segment:
            if self.segment is not None:
                self.segment.close()
            self.segment = _Mapped.open(task.segment, task.layout.size)
        return reduce_slice(self.strategy, task, weight_lists, self.segment.flat)

    def ready(self) -> bool:
        return True


SliceReducerActor = miniray.remote(SliceReducer)


def _set_worker_weights(strategy: SyncStrategy, weights: dict[int, float]) -> None:
    # In place: OuterOptimizerStrategy shares this dict with its reducer.
    strategy.worker_weights.clear()
    strategy.worker_weights.update(weights)


@dataclass
class _Mapped:
    """A writable shared mapping of a segment and a flat uint8 tensor over it."""

    name: str | None
    mapping: mmap.mmap | None
    flat: torch.Tensor

    @classmethod
    def open(cls, name: str, size: int) -> _Mapped:
        mapping = shm.open_shared(name, size)
        return cls(name, mapping, torch.frombuffer(mapping, dtype=torch.uint8, count=size))

    @classmethod
    def create(cls, session_id: str, size: int) -> _Mapped:
        name = shm.new_name(session_id)
        mapping = shm.create(name, size)
        return cls(name, mapping, torch.frombuffer(mapping, dtype=torch.uint8, count=size))

    @classmethod
    def private(cls, size: int) -> _Mapped:
        return cls(None, None, torch.empty(size, dtype=torch.uint8))

    @property
    def size(self) -> int:
        return self.flat.numel()

    def close(self, *, unlink: bool = False) -> None:
        self.flat = torch.empty(0, dtype=torch.uint8)
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:  # a view still exists somewhere: the mapping goes with it
                pass
            self.mapping = None
        if unlink and self.name is not None:
            shm.unlink(self.name)


def session_id() -> str | None:
    """The local backend's session, whose segment names the runtime sweeps; else None.

    The runtime has no public accessor for it: the driver's backend has ``session_id``, a
    child's ``_session_id``, and a child also has it in ``$MINIRAY_SESSION``.
    """
    backend = context.current_or_none()
    if backend is None or getattr(backend, "name", None) != "local":
        return None
    found = getattr(backend, "session_id", None) or getattr(backend, "_session_id", None)
    return found or os.environ.get("MINIRAY_SESSION")


@dataclass(frozen=True)
class RunResult:
    """What one sliced reduction produced."""

    reduced: WeightList  # views of the result buffer, valid until the next run
    nonfinite: dict[int, int]  # worker id -> first parameter index holding NaN/Inf
    failed: dict[int, str]  # slice index -> why its helper was dropped


class SlicedReduction:
    """The server's side: helpers, the result buffer, and one ``run`` per reduction."""

    def __init__(
        self,
        strategy_cls: type[SyncStrategy],
        strategy_kwargs: dict[str, Any],
        num_processes: int | None,
        timeout_s: float,
    ):
        self.strategy_cls = strategy_cls
        self.strategy_kwargs = strategy_kwargs
        self.num_processes = num_processes
        self.timeout_s = timeout_s
        self.helpers: list[Any] = []
        self.buffer: _Mapped | None = None

    def num_slices(self, num_workers: int) -> int:
        if session_id() is None:
            return 1
        if self.num_processes is not None:
            return self.num_processes
        return max(1, min(num_workers, os.cpu_count() or 1))

    def run(
        self,
        strategy: SyncStrategy,
        layout: Layout,
        worker_ids: Sequence[int],
        values: Sequence[WeightList],
        refs: Sequence[Any],
        *,
        upcast: Sequence[torch.dtype | None],
        check_inputs: bool,
    ) -> RunResult:
        """Reduce ``values`` (one weight list per worker; ``refs`` the same as object refs)."""
        num = self.num_slices(len(worker_ids))
        buffer = self._buffer(layout.size)
        sizes = [_itemsize(d) for d in layout.dtypes]
        slices = plan_slices(layout.numels(), sizes, num)
        base = SliceTask(
            pieces=(),
            layout=layout,
            worker_ids=tuple(worker_ids),
            upcast=tuple(upcast),
            check_inputs=check_inputs,
            worker_weights=dict(strategy.worker_weights),
            segment=buffer.name,
            threads=max(1, (os.cpu_count() or 1) // num),
        )
        tasks = [dataclasses.replace(base, pieces=tuple(pieces)) for pieces in slices]
        self._ensure_helpers(num - 1)
        calls = {
            k: self.helpers[k - 1].reduce.remote(tasks[k], *refs)
            for k in range(1, num)
            if tasks[k].pieces
        }
        nonfinite = reduce_slice(strategy, tasks[0], values, buffer.flat)
        answers, _, failed = gather.collect(
            calls, time.monotonic() + self.timeout_s, "a sliced reduction", "reducer of slice"
        )
        if failed:
            buffer = self._recover(failed)
            everything = tuple(p for pieces in slices for p in pieces)
            whole = dataclasses.replace(
                base, pieces=everything, segment=buffer.name, threads=os.cpu_count() or 1
            )
            nonfinite = reduce_slice(strategy, whole, values, buffer.flat)
        else:
            for report in answers.values():
                for wid, p in report.items():
                    nonfinite[wid] = min(p, nonfinite.get(wid, p))
        return RunResult(layout.views(buffer.flat), nonfinite, failed)

    def _buffer(self, size: int) -> _Mapped:
        if self.buffer is not None and self.buffer.size == size:
            return self.buffer
        self._retire_buffer()
        sid = session_id()
        self.buffer = _Mapped.private(size) if sid is None else _Mapped.create(sid, size)
        return self.buffer

    def _retire_buffer(self) -> None:
        if self.buffer is not None:
            self.buffer.close(unlink=True)
            self.buffer = None

    def _ensure_helpers(self, count: int) -> None:
        while len(self.helpers) < count:
            self.helpers.append(SliceReducerActor.remote(self.strategy_cls, self.strategy_kwargs))

    def _recover(self, failed: dict[int, str]) -> _Mapped:
        """Drop the failed helpers and the segment they may still write into; a fresh one."""
        for k in sorted(failed, reverse=True):
            helper = self.helpers.pop(k - 1)
            try:
                miniray.kill(helper)
            except Exception as exc:  # already dead: nothing left to stop
                log.debug("killing the reducer of slice %s: %s", k, exc)
        size = self.buffer.size if self.buffer is not None else 1
        self._retire_buffer()
        return self._buffer(size)

    def close(self) -> None:
        """Stop the helpers and remove the result segment."""
        for helper in self.helpers:
            try:
                miniray.kill(helper)
            except Exception as exc:
                log.debug("killing a reducer: %s", exc)
        self.helpers = []
        self._retire_buffer()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
