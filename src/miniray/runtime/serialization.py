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
import pickle
import sys
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


def serialize(value: Any, *, session_id: str | None) -> Serialized:
    """Pickle ``value``; with a ``session_id``, large buffers go to a shared-memory segment."""
    if _is_plain(value):
        return Serialized(pickle.dumps(value, protocol=5))
    large: list[pickle.PickleBuffer] = []

    def keep_in_band(buf: pickle.PickleBuffer) -> bool:
        if session_id is None or buf.raw().nbytes < OUT_OF_BAND_MIN:
            return True
        large.append(buf)
        return False

    stream = io.BytesIO()
    _pickler()(stream, protocol=5, buffer_callback=keep_in_band).dump(value)
    if not large:
        return Serialized(stream.getvalue())
    if sum(buf.raw().nbytes for buf in large) < INLINE_LIMIT:
        # Small after all: pickled again in band, cheaper than a segment. Measured on
        # Qwen2.5-0.5B's bf16 state dict (291 tensors): with a per-buffer limit of 256 KiB
        # the pickle stream held 11 MB; each delivery took ~10 ms more to reach a reader.
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
    for buf, (off, size) in zip(large, layout):
        if numpy is None:
            mapping[off : off + size] = buf.raw()
        else:
            # numpy's copy releases the GIL (an mmap slice assignment holds it for the whole
            # memcpy), so another thread of this process runs beside it: a trainer rank checks
            # the weights it publishes while they are copied (TrainerRank.publishable_weights).
            numpy.frombuffer(mapping, numpy.uint8, size, off)[:] = numpy.frombuffer(
                buf.raw(), numpy.uint8
            )
    return Serialized(stream.getvalue(), name, max(offset, 1), tuple(layout))


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
