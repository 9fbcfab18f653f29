"""Sliced reduction: the pieces every sliced round is made of, whoever runs them.

An elementwise strategy (``strategies.sliceable``) can reduce any slice of the flattened
parameters on its own. This module owns what that needs: where each parameter's result lives
in one flat buffer (``Layout``), cutting the parameters into byte-balanced slices
(``plan_slices``), reducing one slice of K workers' values into the buffer (``reduce_slice``),
and shared-memory mappings of the buffers (``Mapped``). Who runs the slices is elsewhere:
``miniray.ps.spread`` has the workers of a round reduce it through shared segments (the local
backend); ``reduce_alone`` here is the server reducing every slice itself, into a private
buffer (other backends, and the first round, before the layout is known).

Each slice is reduced in chunks of ``CHUNK_BYTES`` per input, so a chunk's K inputs, its
NaN/Inf checks and the strategy's temporaries stay in cache: memory sees each input byte read
once and each result byte written once, as a fused kernel would.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from miniray.ps.strategies import SyncStrategy
from miniray.runtime import context, shm

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

    @classmethod
    def like(cls, tensors: Sequence[torch.Tensor]) -> Layout:
        return cls.of([tuple(t.shape) for t in tensors], [t.dtype for t in tensors])

    def numels(self) -> list[int]:
        return [_numel(s) for s in self.shapes]

    def itemsizes(self) -> list[int]:
        return [_itemsize(d) for d in self.dtypes]

    def entries(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return list(zip(self.shapes, self.dtypes))

    def tracked_views(self, mapping: mmap.mmap) -> tuple[WeightList, list[weakref.ref]]:
        """Views of each parameter in ``mapping``, and weak references that stay alive while
        anything (a view of a view included) still uses one of them."""
        whole = memoryview(mapping)
        views, alive = [], []
        for shape, dtype, offset in zip(self.shapes, self.dtypes, self.offsets):
            nbytes = _numel(shape) * _itemsize(dtype)
            if nbytes == 0:
                views.append(torch.empty(shape, dtype=dtype))
                continue
            part = whole[offset : offset + nbytes]
            alive.append(weakref.ref(part))
            views.append(torch.frombuffer(part, dtype=torch.uint8).view(dtype).view(shape))
        return views, alive

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


def reduce_alone(
    strategy: SyncStrategy,
    layout: Layout,
    worker_ids: Sequence[int],
    values: Sequence[WeightList],
    *,
    upcast: Sequence[torch.dtype | None],
    check_inputs: bool,
) -> tuple[WeightList, dict[int, int]]:
    """Every slice reduced here, into a new private buffer: ``(result, NaN/Inf report)``."""
    buffer = torch.empty(layout.size, dtype=torch.uint8)
    (pieces,) = plan_slices(layout.numels(), layout.itemsizes(), 1)
    task = SliceTask(
        pieces=tuple(pieces),
        layout=layout,
        worker_ids=tuple(worker_ids),
        upcast=tuple(upcast),
        check_inputs=check_inputs,
        worker_weights=dict(strategy.worker_weights),
        threads=os.cpu_count() or 1,
    )
    nonfinite = reduce_slice(strategy, task, values, buffer)
    return layout.views(buffer), nonfinite


def reduce_slice(
    strategy: SyncStrategy,
    task: SliceTask,
    weight_lists: Sequence[WeightList],
    buffer: torch.Tensor,
) -> dict[int, int]:
    """Reduce ``task.pieces`` of ``weight_lists`` into ``buffer``; returns, for each worker
    with NaN/Inf in these pieces, the first such parameter index."""
    with threads(task.threads):
        return _reduce_pieces(strategy, task, weight_lists, buffer)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
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


@dataclass
class Mapped:
    """A writable shared mapping of a segment and a flat uint8 tensor over it."""

    name: str
    mapping: mmap.mmap | None
    flat: torch.Tensor

    @classmethod
    def open(cls, name: str, size: int) -> Mapped:
        mapping = shm.open_shared(name, size)
        return cls(name, mapping, torch.frombuffer(mapping, dtype=torch.uint8, count=size))

    @classmethod
    def create(cls, session_id: str, size: int) -> Mapped:
        name = shm.new_name(session_id)
        mapping = shm.create(name, size)
        return cls(name, mapping, torch.frombuffer(mapping, dtype=torch.uint8, count=size))

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
        if unlink:
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


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
