"""What users hold on the Ray backend, and how values cross to Ray and back.

``RayObjectRef`` and ``RayActorHandle`` subclass ``ObjectRef`` and ``ActorHandle`` and carry the
Ray object inside; ``_RayStream`` is Ray's generator as the source of our ``ObjectRefGenerator``;
``RayRuntimeContext`` is Ray's context with our handle types. Numpy arrays travel as writable
copies (``_register_serializers``). ``ray`` is imported inside functions only (see ray_backend).
"""

from __future__ import annotations

import inspect
import pickle
import threading
import time
from typing import Any

from miniray.runtime.refs import ActorHandle, ArgumentCheck, ObjectRef, nil_ref


class RayObjectRef(ObjectRef):
    """Our ``ObjectRef`` carrying a ``ray.ObjectRef``; Ray counts references, so no pinning."""

    __slots__ = ("_ray_ref",)

    def __init__(self, ray_ref: Any):
        super().__init__(ray_ref.hex(), counted=False)
        self._ray_ref = ray_ref

    @property
    def ray_ref(self) -> Any:
        return self._ray_ref

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled inside Ray's serializer, the inner ray.ObjectRef is recorded as a borrowed ref.
        return (RayObjectRef, (self._ray_ref,))


class RayActorHandle(ActorHandle):
    """Our ``ActorHandle`` carrying Ray's handle; pickles as Ray's handle plus our metadata."""

    def __init__(self, ray_handle: Any, class_name: str, methods: dict[str, dict[str, Any]]):
        super().__init__(ray_handle._actor_id.hex(), class_name, methods)
        self._ray_handle = ray_handle

    @property
    def ray_handle(self) -> Any:
        return self._ray_handle

    def __reduce__(self) -> tuple[Any, ...]:
        return (RayActorHandle, (self._ray_handle, self._class_name, self._methods))


def _reduce_ndarray(array: Any) -> tuple[Any, ...]:
    """Serializer for numpy arrays: raw bytes out of band (zero-copy into Ray's store)."""
    if array.dtype.hasobject:
        return ("objects", array.shape, array.dtype, array.ravel().tolist())
    contiguous = array if array.flags.c_contiguous else array.copy(order="C")
    flat = contiguous.reshape(-1).view("uint8")
    return ("buffer", array.shape, array.dtype, pickle.PickleBuffer(flat))


def _rebuild_ndarray(state: tuple[Any, ...]) -> Any:
    """Deserializer: a writable copy. Ray would hand out a read-only view of its store, and
    code that updates a received array in place (``w -= lr * g``) would fail only on Ray."""
    import numpy as np

    kind, shape, dtype, data = state
    if kind == "objects":
        out = np.empty(len(data), dtype=dtype)
        for i, item in enumerate(data):
            out[i] = item
        return out.reshape(shape)
    return np.frombuffer(data, dtype=np.uint8).view(dtype).reshape(shape).copy()


_registered_lock = threading.Lock()
_numpy_registered = False


def _register_serializers() -> None:
    """Make numpy arrays travel as writable copies in this process (driver or Ray worker)."""
    global _numpy_registered
    with _registered_lock:
        if _numpy_registered:
            return
        try:
            import numpy as np
        except ImportError:  # no numpy, no arrays to fix
            _numpy_registered = True
            return
        import ray.util

        ray.util.register_serializer(
            np.ndarray, serializer=_reduce_ndarray, deserializer=_rebuild_ndarray
        )
        _numpy_registered = True


def _deregister_serializers() -> None:
    global _numpy_registered
    with _registered_lock:
        if not _numpy_registered:
            return
        _numpy_registered = False
        try:
            import numpy as np
        except ImportError:
            return
        import ray.util

        ray.util.deregister_serializer(np.ndarray)


def _ray_ref(ref: ObjectRef) -> Any:
    if not isinstance(ref, RayObjectRef):
        raise ValueError(
            f"{ref!r} is unknown to the Ray backend: it was made by another backend "
            "(refs do not survive miniray.shutdown() or a change of backend)"
        )
    return ref.ray_ref


def _ray_handle(handle: ActorHandle) -> Any:
    if not isinstance(handle, RayActorHandle):
        raise ValueError(
            f"{handle!r} is unknown to the Ray backend: it was made by another backend "
            "(handles do not survive miniray.shutdown() or a change of backend)"
        )
    return handle.ray_handle


def _unwrap_arg(value: Any) -> Any:
    # Top-level refs become Ray's own, so Ray resolves them before the call (Ray semantics);
    # nested refs stay ours and are pickled with the Ray ref inside.
    return value.ray_ref if isinstance(value, RayObjectRef) else value


class _RayStream:
    """Ray's ObjectRefGenerator as the source of ours (refs.ObjectRefGenerator), its refs ours."""

    def __init__(self, ray_generator: Any):
        self._generator = ray_generator

    def next_ref(self, index: int, deadline: float | None) -> ObjectRef | None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            ref = self._generator._next_sync(timeout_s=timeout)
        except StopIteration:
            return None
        return nil_ref() if ref.is_nil() else RayObjectRef(ref)

    def ready(self, index: int) -> bool:
        return self._generator.next_ready()

    def finished(self, index: int) -> bool:
        return self._generator.is_finished()

    def close(self, index: int) -> None:
        self._generator = None  # Ray frees what was not taken when its generator goes


def _wrap_refs(out: Any, num_returns: int) -> list[ObjectRef]:
    if out is None or num_returns == 0:
        return []
    if num_returns == 1:
        return [RayObjectRef(out)]
    return [RayObjectRef(r) for r in out]


class RayRuntimeContext:
    """``miniray.get_runtime_context()`` on Ray: Ray's answers, with our handle types."""

    def __init__(self, ray_context: Any):
        self._ray_context = ray_context

    @property
    def namespace(self) -> str:
        return self._ray_context.namespace

    def get_job_id(self) -> str:
        return self._ray_context.get_job_id()

    def get_node_id(self) -> str:
        return self._ray_context.get_node_id()

    def get_task_id(self) -> str | None:
        return self._ray_context.get_task_id()

    def get_actor_id(self) -> str | None:
        return self._ray_context.get_actor_id()

    def get_actor_name(self) -> str | None:
        return self._ray_context.get_actor_name()

    @property
    def current_actor(self) -> ActorHandle:
        ray_handle = self._ray_context.current_actor
        class_name, methods = _metadata_of(ray_handle)
        return RayActorHandle(ray_handle, class_name, methods)

    def get_assigned_resources(self) -> dict[str, float]:
        return self._ray_context.get_assigned_resources()

    def __getattr__(self, name: str) -> Any:
        # Ray's other accessors (get_worker_id, get_accelerator_ids, ...) unchanged.
        return getattr(self._ray_context, name)


def _metadata_of(ray_handle: Any) -> tuple[str, dict[str, dict[str, Any]]]:
    """Class name and method options of an actor found by name, read from Ray's handle.

    Ray's handle knows the methods and the options we declared with ``ray.method`` when we made
    the class; asking the actor instead would queue behind its running calls (and deadlock an
    actor that looks itself up). These attributes are private to Ray 2.60 (pinned in the extra);
    tests/runtime/test_ray_backend.py fails if they move.
    """
    descriptor = ray_handle._ray_actor_creation_function_descriptor
    class_name = getattr(descriptor, "class_name", "Actor").rsplit(".", 1)[-1]
    num_returns = ray_handle._ray_method_num_returns
    retry = ray_handle._ray_method_retry_exceptions
    methods = {}
    for name, parameters in ray_handle._ray_method_signatures.items():
        if name.startswith("__") and name != "__call__":  # Ray's own __ray_*__ methods
            continue
        returns = num_returns.get(name)
        methods[name] = {
            "num_returns": 1 if returns is None else returns,
            "max_task_retries": None,  # None: the class's own declaration applies
            "retry_exceptions": retry.get(name) or False,
            "concurrency_group": None,
            "is_async": False,
            "is_generator": returns == "streaming",
            # The user's parameters, which _wrap_method gave Ray (a list of inspect.Parameter).
            "argument_check": ArgumentCheck(inspect.Signature(parameters)),
        }
    return class_name, methods
