"""Turning values into bytes and back, with large tensor/array buffers out of band.

A value is pickled with protocol 5 (cloudpickle, so lambdas and ``__main__`` classes work).
A value whose numpy/torch buffers of at least ``OUT_OF_BAND_MIN`` bytes total ``INLINE_LIMIT``
or more does not copy them into the pickle stream: they are written once into one shared-memory
segment per value, and the consumer maps that segment copy-on-write. Moving 100 MB therefore
costs about one memcpy, not a pickle. The rule is the total, not each buffer's size: a model's
state dict has many tensors under any per-buffer limit (Qwen2.5-0.5B: 48 k/v projections of
224 KiB each), and in band they went through the socket with every delivery of the object.

Torch tensors do not support pickle's out-of-band buffers themselves, so ``_reduce_tensor``
presents their bytes as a ``PickleBuffer`` (any dtype, bf16 included, travels as raw bytes).
Tensor objects that are the same view of the same memory travel once and arrive as one tensor,
shared as they were: ``model.state_dict()`` detaches a tied weight into a new object under
each name, and each would otherwise copy its bytes again (Qwen2.5-0.5B's tied embedding: 272 MB
more per put of its state dict, 1.26 GB for 0.99 GB of weights).

These bytes only ever travel over socketpairs between a driver and the processes it started;
network protocols of miniray use msgpack framing instead (see docs/design.md).
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import sys
import threading
from typing import Any

from miniray.runtime import segments, shm

INLINE_LIMIT = 256 * 1024  # a value's out-of-band buffers below this in total stay in band
OUT_OF_BAND_MIN = 4 * 1024  # smaller buffers always stay in band (no segment entry for them)


class Serialized:
    """A value as it travels: a pickle stream plus where its large buffers live.

    An instance unpickled from a message is a *delivery* of its segment: ``segments`` counts it
    until it is deserialized, so the segment is not reused while this copy is still to be read.
    """

    __slots__ = ("buffers", "pending", "pickled", "segment", "segment_size")

    def __init__(
        self,
        pickled: bytes,
        segment: str | None = None,
        segment_size: int = 0,
        buffers: tuple[tuple[int, int], ...] = (),  # (offset, size) in the segment
    ):
        self.pickled = pickled
        self.segment = segment
        self.segment_size = segment_size
        self.buffers = buffers
        self.pending = False

    @property
    def nbytes(self) -> int:
        return len(self.pickled) + self.segment_size

    def __reduce__(self) -> tuple[Any, ...]:
        return (_delivered, (self.pickled, self.segment, self.segment_size, self.buffers))

    def discard(self) -> None:
        """This delivery will never be read (e.g. a reply nobody waits for any more)."""
        if self.pending:
            self.pending = False
            assert self.segment is not None
            segments.delivery_consumed(self.segment)


def _delivered(pickled: bytes, segment: str | None, size: int, buffers: tuple) -> Serialized:
    ser = Serialized(pickled, segment, size, buffers)
    if segment is not None:
        ser.pending = True
        segments.delivery_received(segment)
    return ser


_pickler_class: Any = None


def _pickler() -> Any:
    """cloudpickle's Pickler plus tensors as out-of-band buffers (cloudpickle loads lazily:
    a worker that only runs tasks never pays for importing it)."""
    global _pickler_class
    if _pickler_class is None:
        import cloudpickle

        class Pickler(cloudpickle.Pickler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                # The first tensor object pickled for each view of memory (kept alive, so its
                # id, which pickle's memo refers to, is not reused while this pickler runs).
                self._views: dict[tuple, Any] = {}
                # While pickling the value of a Verified: each tensor buffer and its dtype,
                # by the buffer's id.
                self.dtypes: dict[int, tuple[Any, Any]] | None = None

            def reducer_override(self, obj: Any) -> Any:
                torch = sys.modules.get("torch")
                if torch is not None and isinstance(obj, torch.Tensor):
                    key = _view_key(torch, obj)
                    if key is not None:
                        first = self._views.setdefault(key, obj)
                        if first is not obj:  # pickled already: the memo makes it a reference
                            return (_same, (first,))
                    reduced = _reduce_tensor(torch, obj)
                    if reduced is not None:
                        if self.dtypes is not None:  # a Verified value: its pieces' dtype
                            buffer = reduced[1][0]  # kept: its id is not reused meanwhile
                            self.dtypes[id(buffer)] = (buffer, obj.dtype)
                        return reduced
                return super().reducer_override(obj)

        _pickler_class = Pickler
    return _pickler_class


def _plain(torch: Any, tensor: Any) -> bool:
    """A dense tensor whose bytes we ship; torch's own pickling handles the exotic layouts."""
    return not (tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested)


def _view_key(torch: Any, tensor: Any) -> tuple | None:
    """What makes two tensor objects interchangeable: the same memory seen the same way (and
    the same kind of tensor); None for what is never shared (empty, exotic layouts)."""
    if not _plain(torch, tensor) or tensor.numel() == 0:
        return None
    return (
        tensor.device,
        tensor.data_ptr(),
        tensor.dtype,
        tuple(tensor.shape),
        tensor.stride(),
        type(tensor),
        tensor.requires_grad,
    )


def _same(value: Any) -> Any:
    """Unpickles to the object already rebuilt for an earlier name of the same view."""
    return value


def _reduce_tensor(torch: Any, tensor: Any) -> Any:
    if not _plain(torch, tensor):
        return None
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.element_size() != 1 else flat
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    buffer = pickle.PickleBuffer(raw.numpy())
    is_param = isinstance(tensor, torch.nn.Parameter)
    return (
        _rebuild_tensor,
        (buffer, tensor.dtype, tuple(tensor.shape), tensor.requires_grad, is_param),
    )


def _rebuild_tensor(
    buffer: Any, dtype: Any, shape: tuple[int, ...], requires_grad: bool, is_param: bool
) -> Any:
    import torch

    view = memoryview(buffer)
    if view.nbytes == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        t = torch.frombuffer(view, dtype=torch.uint8)
        if dtype != torch.uint8:
            t = t.view(dtype)
        t = t.reshape(shape)
    if is_param:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    if requires_grad:
        t.requires_grad_(True)
    return t


_PLAIN_TYPES = frozenset({int, float, bool, str, type(None), complex})
_PLAIN_CONTAINERS = frozenset({tuple, list, dict})


def _is_plain(value: Any, budget: int = 64) -> bool:
    """Small builtin values that C pickle handles alone (the hot path of small calls)."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return True
    if kind is bytes:
        return len(value) < INLINE_LIMIT
    if kind not in _PLAIN_CONTAINERS or len(value) > budget:
        return False
    # The budget halves at each level and reaches 0, so the walk ends: a value that contains
    # itself (``a = []; a.append(a)``) is not plain, and pickle's memo handles it.
    items = value.items() if kind is dict else ((None, v) for v in value)
    return all(type(k) in _PLAIN_TYPES and _is_plain(v, budget // 2) for k, v in items)


class Verified:
    """``value``, whose tensors are checked where the serializer copies them anyway, in the
    same pass: the serializer hands each stretch of a tensor's bytes to
    ``piece(source, dtype, target) -> bool``, which copies ``source`` (a flat uint8 array, a
    whole number of ``dtype`` entries) into ``target`` and answers whether it passed; with
    ``target`` None (a small buffer kept in the pickle stream) it only checks. When a stretch
    fails (or a buffer is not a tensor's), ``full()`` checks the whole value and raises what
    the caller should see (or returns: the value stands, a cheap check's false alarm cleared
    by the exact one). The value is stored only once verified; a raise from ``full()`` becomes
    the error of the call whose answer this is (``Rejected``). Only at the top of a value: any
    other pickler (Ray's, a nested one) runs ``full()`` and pickles ``value`` itself.

    Measured at Qwen2.5-0.5B size (0.99 GB, bf16) on the 2-core machine: the finiteness check
    beside the copy, each reading memory, took the rank's answer ~113 ms (the copy alone
    ~65-80 ms); copying 1 MiB pieces and checking each from the cache, 95-108 ms; one loop
    that copies and checks (``rl.finite``), as fast as the copy (benchmarks/weight_sync.py,
    docs/benchmarks.md)."""

    __slots__ = ("full", "piece", "value")

    def __init__(self, value: Any, piece: Any, full: Any):
        self.value, self.piece, self.full = value, piece, full

    def __reduce__(self) -> tuple[Any, ...]:
        self.full()
        return (_same, (self.value,))


class Rejected(Exception):
    """``Verified.full()`` raised ``cause``: the value is not stored, ``cause`` is the error."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


def serialize(value: Any, *, session_id: str | None) -> Serialized:
    """Pickle ``value``; with a ``session_id``, large buffers go to a shared-memory segment.
    A ``Verified`` value is checked on the way (``Rejected`` when it fails)."""
    verified = value if type(value) is Verified else None
    if verified is not None:
        value = verified.value
    elif _is_plain(value):
        return Serialized(pickle.dumps(value, protocol=5))
    large: list[pickle.PickleBuffer] = []
    dtypes: dict[int, tuple[Any, Any]] = {}  # a Verified value's tensor buffers (Pickler)

    def keep_in_band(buf: pickle.PickleBuffer) -> bool:
        if session_id is None or buf.raw().nbytes < OUT_OF_BAND_MIN:
            if verified is not None:
                _verify_whole(verified, buf, dtypes.get(id(buf), (None, None))[1])
            return True
        large.append(buf)
        return False

    stream = io.BytesIO()
    pickler = _pickler()(stream, protocol=5, buffer_callback=keep_in_band)
    if verified is not None:
        pickler.dtypes = dtypes
    pickler.dump(value)
    del pickler
    large_dtypes = [dtypes.get(id(buf), (None, None))[1] for buf in large]
    dtypes.clear()
    if not large:
        return Serialized(stream.getvalue())
    if sum(buf.raw().nbytes for buf in large) < INLINE_LIMIT:
        # Small after all: pickled again in band, cheaper than a segment. Measured on
        # Qwen2.5-0.5B's bf16 state dict (291 tensors): with a per-buffer limit of 256 KiB
        # the pickle stream held 11 MB; each delivery took ~10 ms more to reach a reader.
        if verified is not None:
            for buf, dtype in zip(large, large_dtypes):
                _verify_whole(verified, buf, dtype)
        stream = io.BytesIO()
        _pickler()(stream, protocol=5).dump(value)
        return Serialized(stream.getvalue())
    assert session_id is not None
    layout = []
    offset = 0
    for buf in large:
        size = buf.raw().nbytes
        layout.append((offset, size))
        offset = shm.aligned(offset + size)
    # The mapping stays open (segments keeps it for the next value written into this segment).
    name, mapping = segments.acquire(session_id, max(offset, 1))
    numpy = sys.modules.get("numpy")  # loaded with any tensor or array; never imported here
    if numpy is None:  # no tensor either: a Verified value without one is checked whole
        for buf, (off, size) in zip(large, layout):
            mapping[off : off + size] = buf.raw()
        if verified is not None:
            _full(verified)
    else:
        checks = None if verified is None else (verified, large_dtypes)
        try:
            _write_buffers(numpy, mapping, [buf.raw() for buf in large], layout, checks)
        except BaseException:
            segments.reclaim(name)  # never delivered: nobody maps it, ours to reuse
            raise
    return Serialized(stream.getvalue(), name, max(offset, 1), tuple(layout))


def _full(verified: Verified) -> None:
    try:
        verified.full()
    except Exception as exc:
        raise Rejected(exc) from exc


def _verify_whole(verified: Verified, buf: pickle.PickleBuffer, dtype: Any) -> None:
    """A buffer kept in band: checked whole (small; an empty one holds nothing to check), or
    the value whole if not a tensor's."""
    raw = buf.raw()
    if not raw.nbytes:
        return
    # A tensor's buffer comes with numpy loaded (the tensor reducer made it an array).
    source = raw if dtype is None else sys.modules["numpy"].frombuffer(raw, "uint8")
    if not _piece_ok(verified, source, dtype):
        _full(verified)


def _piece_ok(verified: Verified, source: Any, dtype: Any, target: Any = None) -> bool:
    """``verified.piece`` of the bytes ``source`` (copied into ``target`` if given); a buffer
    that is not a tensor's (``dtype`` None) is only copied and fails, so ``full()`` decides."""
    if dtype is None:
        if target is not None:
            target[:] = source
        return False
    return bool(verified.piece(source, dtype, target))


def _copy_threads() -> int:
    """``$MINIRAY_COPY_THREADS``, else this process's cores, at most 4 (one core: 1)."""
    raw = os.environ.get("MINIRAY_COPY_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"$MINIRAY_COPY_THREADS={raw!r}: expected a whole number, 1 or more")
        return int(raw)
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


COPY_THREADS = _copy_threads()
# A value at least this large is copied into its segment by COPY_THREADS threads at once. One
# core's copy does not reach the memory's bandwidth: 0.5 GB took 45 ms on one thread and 31-34
# ms on two on the 2-core development machine (11.2-11.4 vs 15.5-16.5 GB/s); below a few MiB
# handing the parts to the threads costs more than it saves.
PARALLEL_COPY_MIN = 8 << 20
COPY_CHUNK = 16 << 20  # what a copying thread takes at a time: ~2 ms of copying, a multiple of 64
_copier: Any = None  # the threads beside the caller's, started with the first large value
_copier_lock = threading.Lock()


def _forget_copier() -> None:
    global _copier, _copier_lock
    # A forked child has none of its parent's threads (nor a lock one of them held).
    _copier, _copier_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_copier)


def _stretches(layout: list, chunk: int | None) -> list[tuple[int, int, int]]:
    """(buffer index, start, size) covering every buffer once, each at most ``chunk`` bytes
    (None: whole buffers). ``chunk`` is a multiple of 64, so every split falls between whole
    elements of any dtype."""
    return [
        (index, start, min(chunk or size, size - start))
        for index, (_, size) in enumerate(layout)
        for start in range(0, size, chunk or max(size, 1))
    ]


def _stretch_bytes(total: int, threads: int, *, checked: bool) -> int | None:
    """The most bytes a copying thread takes at a time (None: whole buffers, one thread). A
    checked value's loop stores through the cache at any size: COPY_CHUNK, which keeps the
    threads within ~2 ms of each other. A plain value's: about a thread's share, since a
    memcpy that large stores past the cache (glibc's non-temporal stores): a 1 GB put took 58
    ms in two halves against 84 ms in 16 MiB stretches on the 2-core machine, and a value of
    many buffers is still shared out buffer by buffer."""
    if threads == 1:
        return None
    if checked:
        return COPY_CHUNK
    return max(COPY_CHUNK, -(-total // (threads * 64)) * 64)


def _write_buffers(
    numpy: Any,
    mapping: Any,
    raws: list[memoryview],
    layout: list,
    checks: tuple[Verified, list[Any]] | None = None,
) -> None:
    """Copy each buffer to its (offset, size) in ``mapping``; a large total by COPY_THREADS
    threads, the caller one of them, each taking the next stretch (``_stretch_bytes``) until
    none are left: equal halves fixed in advance finished up to 15 ms apart at 1 GB on the
    2-core machine (one thread's source copied slower than the other's, or its core was lent
    to another process for a while). numpy's copy releases the GIL (an mmap slice assignment
    holds it for the whole memcpy), and so must a Verified value's ``piece``, so the threads
    run side by side. ``checks``: a Verified value and each buffer's dtype (None: not a
    tensor's), whose ``piece`` copies each stretch."""
    global _copier
    verified, dtypes = checks if checks is not None else (None, [None] * len(raws))
    total = sum(size for _, size in layout)
    threads = COPY_THREADS if total >= PARALLEL_COPY_MIN else 1
    stretches = _stretches(layout, _stretch_bytes(total, threads, checked=verified is not None))
    taken = itertools.count()  # next() is atomic under the GIL: each stretch goes to one thread
    failed: list[int] = []  # buffers whose check failed (appended from several threads)

    def copy() -> None:
        for i in taken:
            if i >= len(stretches):
                return
            index, start, size = stretches[i]
            source = numpy.frombuffer(raws[index], numpy.uint8, size, start)
            target = numpy.frombuffer(mapping, numpy.uint8, size, layout[index][0] + start)
            if verified is None or failed:  # after a failure only copied: full() decides
                target[:] = source
            elif not _piece_ok(verified, source, dtypes[index], target):
                failed.append(index)

    if threads == 1:
        copy()
    else:
        with _copier_lock:  # two threads storing values at once start one pool
            if _copier is None:
                from concurrent.futures import ThreadPoolExecutor

                _copier = ThreadPoolExecutor(COPY_THREADS - 1, thread_name_prefix="miniray-copy")
            copier = _copier
        helpers = [copier.submit(copy) for _ in range(threads - 1)]
        try:
            copy()
        finally:
            for helper in helpers:  # every stretch done (or failed) before the caller goes on
                helper.result()
    if failed and checks is not None:
        _full(checks[0])


def deserialize(ser: Serialized) -> Any:
    if ser.segment is None:
        return pickle.loads(ser.pickled)
    try:
        whole = segments.map_delivery(ser.segment, ser.segment_size)
    except BaseException:
        ser.discard()
        raise
    ser.discard()  # consumed: from here on the tracked mapping holds the segment
    buffers = [whole[off : off + size] for off, size in ser.buffers]
    return pickle.loads(ser.pickled, buffers=buffers)


def dumps(value: Any) -> bytes:
    """Plain in-band pickling (functions, classes, control messages)."""
    import cloudpickle

    return cloudpickle.dumps(value, protocol=5)


def loads(data: bytes) -> Any:
    return pickle.loads(data)
