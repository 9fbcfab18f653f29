"""The Ray backend: the public runtime API on a Ray cluster. The only module that imports ray.

``ray`` is imported inside functions, never at module level: ``import miniray`` must work (and
stay fast) without Ray installed, and api.py imports this module only for ``backend='ray'``.

What users hold stays ours: ``RayObjectRef`` and ``RayActorHandle`` subclass ``ObjectRef`` and
``ActorHandle`` and carry the Ray object inside, so a ref or handle pickled into a task travels as
Ray's own ref/handle (Ray's reference counting and ownership apply) and comes out as ours again.

    driver / worker code --miniray.get--> RayBackend.get --ray.get--> Ray
                                  errors <-- _map_error <-- ray.exceptions.*
    Ray worker: _task_function / generated actor subclass --> _enter_worker() (attach context,
                register the numpy reducer) --> user code --> errors wrapped as ours

Semantics that Ray does differently and this backend restores, so a script prints the same
results on every backend:

* numpy arrays received (``get``, task and method arguments) are writable private copies, not
  Ray's read-only views of the object store (one memcpy per receive);
* remote errors are our dual-class ``RayTaskError`` with the traceback starting at user code;
* actors live until ``kill`` or ``shutdown``, not until their last handle is dropped: the backend
  keeps a handle of every actor it created.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from typing import Any, NoReturn

import miniray.errors as errors  # the module, not the package: runtime sits below it
from miniray.runtime import context, execution, futures
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ArgumentCheck,
    ObjectRef,
    ObjectRefGenerator,
    RemoteFunction,
    nil_ref,
    returns_of,
)

ENV_RAY_ADDRESS = "RAY_ADDRESS"

# ray.kill only asks the GCS to kill the actor; kill() waits this long to see it dead.
_KILL_CONFIRM_S = 30.0

# Options that go to Ray unchanged when they are set (None means "Ray's default").
_TASK_PASSTHROUGH = (
    "num_cpus",
    "num_gpus",
    "resources",
    "memory",
    "accelerator_type",
    "scheduling_strategy",
    "runtime_env",
    "label_selector",
    "name",
)
_ACTOR_PASSTHROUGH = (*_TASK_PASSTHROUGH, "namespace", "lifetime", "concurrency_groups")


# ------------------------------------------------------------------------------- values


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


# ------------------------------------------------------------------------------- errors


def _map_error(exc: BaseException) -> BaseException:
    """Ray's exception -> the one of ``miniray.errors`` a caller catches (same on every backend)."""
    import ray.exceptions as rex

    # Ray's wrapper first: Ray's dual class around our error is an instance of both.
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        if isinstance(cause, errors.RayTaskError):  # raised by our worker-side wrapper
            return cause.as_instanceof_cause()
        if isinstance(cause, rex.TaskCancelledError):
            return errors.TaskCancelledError(str(exc))
        if isinstance(cause, rex.RayError):
            return _map_error(cause)
        # Raised outside our wrappers (e.g. Ray checking num_returns): Ray's text is the traceback.
        return errors.RayTaskError(
            exc.function_name, str(exc), cause, pid=exc.pid or 0
        ).as_instanceof_cause()
    if isinstance(exc, errors.RayError):
        return exc.as_instanceof_cause() if isinstance(exc, errors.RayTaskError) else exc
    message = str(exc)
    if isinstance(exc, rex.GetTimeoutError):
        return errors.GetTimeoutError(message)
    if isinstance(exc, rex.ActorAlreadyExistsError):
        return errors.ActorAlreadyExistsError(message)
    if isinstance(exc, rex.RayActorError):
        actor_id = getattr(exc, "actor_id", None) or ""
        if isinstance(exc, rex.ActorUnavailableError):
            return errors.ActorUnavailableError(message, actor_id=actor_id)
        return errors.ActorDiedError(message, actor_id=actor_id)
    if isinstance(exc, rex.TaskCancelledError):
        return errors.TaskCancelledError(message)
    if isinstance(exc, rex.PendingCallsLimitExceeded):
        # Name the option as the other backends do: Ray's text says only "more than N tasks".
        limit = re.search(r"more than (\d+) tasks", message)
        suffix = f" (max_pending_calls={limit.group(1)})" if limit else ""
        return errors.PendingCallsLimitExceeded(message + suffix)
    if isinstance(exc, (rex.WorkerCrashedError, rex.OutOfMemoryError)):
        return errors.WorkerCrashedError(message)
    if isinstance(exc, rex.ObjectLostError):
        return errors.ObjectLostError(message)
    if isinstance(exc, rex.RayError):
        return errors.RaySystemError(f"{type(exc).__name__}: {message}")
    return exc


def _wait_until_dead(ray_handle: Any, handle: ActorHandle) -> None:
    """Return once the killed actor refuses calls, so that later calls raise ``ActorDiedError``.

    ``ray.kill`` is asynchronous: a call made just after it may still run on the live actor
    (seen on a busy 2-core machine). A ready-probe fails once the actor is dead.
    """
    import ray

    deadline = time.monotonic() + _KILL_CONFIRM_S
    while time.monotonic() < deadline:
        try:
            ray.get(ray_handle.__ray_ready__.remote(), timeout=1.0)
        except ray.exceptions.GetTimeoutError:
            continue
        except ray.exceptions.RayError:
            return  # dead (or unreachable, which later calls report the same way)
        time.sleep(0.01)
    raise errors.GetTimeoutError(
        f"kill({handle!r}): Ray had not killed the actor after {_KILL_CONFIRM_S:.0f} s; "
        "the node may be overloaded: check `ray status` and the actor's logs"
    )


def _raise_mapped(exc: BaseException) -> NoReturn:
    mapped = _map_error(exc)
    if mapped is exc:
        raise exc
    # Our error carries the remote traceback already; Ray's wrapper around it is noise.
    raise mapped from None


def _user_error(label: str, exc: Exception) -> BaseException:
    """Wrap an exception of user code inside a Ray worker as our ``RayTaskError``.

    The dual class keeps ``retry_exceptions=[SomeError]`` working (Ray checks isinstance). A cause
    that cannot be pickled becomes a RuntimeError with its type and message, as on local.
    """
    import ray.cloudpickle

    error = execution.task_error(label, exc)
    try:
        # Ray's pickler, as Ray will use: classes from the driver's __main__ travel by value.
        ray.cloudpickle.dumps(error.cause)
    except Exception:
        error = errors.RayTaskError(
            label,
            error.traceback_str,
            RuntimeError(f"{type(error.cause).__name__}: {error.cause}"),
            pid=error.pid,
        )
    return error.as_instanceof_cause()


def _is_ray_control_flow(exc: BaseException) -> bool:
    """Exceptions Ray uses to steer an actor (``exit_actor`` in an async actor): never wrap."""
    import ray.exceptions as rex

    return isinstance(exc, rex.AsyncioActorExit)


# ------------------------------------------------------------------------------- worker side

_worker_lock = threading.Lock()
_worker_entered = False


def _enter_worker() -> None:
    """First thing every task and actor runs in a Ray worker: become a miniray process."""
    global _worker_entered
    if _worker_entered:
        return
    with _worker_lock:
        if _worker_entered:
            return
        if context.current_or_none() is None:
            context.set_backend(RayBackend.attached(in_worker=True))
        _register_serializers()
        _worker_entered = True


def worker_backend_or_none() -> RayBackend | None:
    """A backend attached to Ray when this process is a Ray worker (called by ``context``)."""
    import ray

    if not ray.is_initialized():
        return None
    worker = ray._private.worker.global_worker
    if worker.mode != ray._private.worker.WORKER_MODE:
        return None
    return RayBackend.attached(in_worker=True)


def _task_function(fn: Any, label: str) -> Any:
    """The function Ray runs for a remote function: enter the worker, call, wrap errors."""

    # *args: RemoteFunction.remote (refs.py) has already bound the arguments to fn's signature.
    def run(*args: Any, **kwargs: Any) -> Any:
        _enter_worker()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _is_ray_control_flow(exc):
                raise
            raise _user_error(label, exc) from None

    def run_stream(*args: Any, **kwargs: Any) -> Any:
        # A generator itself: Ray makes a streaming task only of a generator function.
        _enter_worker()
        try:
            for value in fn(*args, **kwargs):  # noqa: UP028 (not `yield from`: see _wrap_method)
                yield value
        except Exception as exc:
            if _is_ray_control_flow(exc):
                raise
            raise _user_error(label, exc) from None

    if inspect.isgeneratorfunction(fn):
        run = run_stream
    # Ray names the task (and its log lines) after these.
    run.__name__ = getattr(fn, "__name__", "remote_function")
    run.__qualname__ = getattr(fn, "__qualname__", run.__name__)
    run.__module__ = getattr(fn, "__module__", __name__)
    return run


def _actor_subclass(actor_class: ActorClass) -> type:
    """A subclass of the user's class whose methods enter the worker and wrap errors as ours.

    A subclass (not a wrapper object) keeps ``self`` the user's instance, so ``isinstance`` and
    ``super()`` inside methods work, and Ray sees ``async def`` methods and makes an async actor.
    """
    import ray

    user_cls = actor_class.cls
    class_name = actor_class.__name__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _enter_worker()
        try:
            user_cls.__init__(self, *args, **kwargs)  # type: ignore[misc]
        except Exception as exc:
            raise _user_error(f"{class_name}.__init__", exc) from None

    namespace: dict[str, Any] = {"__init__": __init__}
    for name, method_options in actor_class.methods.items():
        method = _wrap_method(user_cls, name, class_name, method_options)
        namespace[name] = ray.method(**_declared_method_options(method_options))(method)
    generated = type(class_name, (user_cls,), namespace)
    generated.__qualname__ = getattr(user_cls, "__qualname__", class_name)
    generated.__module__ = getattr(user_cls, "__module__", __name__)
    return generated


def _wrap_method(user_cls: type, name: str, class_name: str, method_options: dict) -> Any:
    # The user's attribute as stored (function, staticmethod or classmethod), bound per call
    # through its own __get__: exactly what `instance.name` would have given.
    attribute = inspect.getattr_static(user_cls, name)
    label = f"{class_name}.{name}"
    generator_kind = _generator_kind(attribute)

    # A generator method's wrapper is a generator itself: Ray streams only those.
    if generator_kind == "async":

        async def async_generator_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                async for value in attribute.__get__(self, type(self))(*args, **kwargs):
                    yield value
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method: Any = async_generator_method
    elif generator_kind == "sync":

        def generator_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                # Not `yield from`: Ray sends values into the generator, which a user's own
                # `yield from range(...)` would pass on to an iterator without send().
                for value in attribute.__get__(self, type(self))(*args, **kwargs):  # noqa: UP028
                    yield value
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method = generator_method
    elif method_options["is_async"]:

        async def async_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                result = attribute.__get__(self, type(self))(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method = async_method
    else:

        def sync_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                return attribute.__get__(self, type(self))(*args, **kwargs)
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method = sync_method
    method.__name__ = name
    method.__qualname__ = label
    check = method_options.get("argument_check")
    if check is not None:
        # Ray reads each method's signature (dropping the first parameter) when it makes the
        # class and keeps it in every handle of the actor: with the user's parameters instead of
        # our *args, a handle found by get_actor carries them too (see _metadata_of).
        receiver = inspect.Parameter("_miniray_self", inspect.Parameter.POSITIONAL_ONLY)
        method.__signature__ = check.signature.replace(
            parameters=[receiver, *check.signature.parameters.values()]
        )
    return method


def _generator_kind(attribute: Any) -> str | None:
    """ "sync" or "async" for a generator method as stored in the class, else None."""
    function = getattr(attribute, "__func__", attribute)  # a staticmethod's or classmethod's
    if inspect.isasyncgenfunction(function):
        return "async"
    return "sync" if inspect.isgeneratorfunction(function) else None


def _declared_method_options(method_options: dict[str, Any]) -> dict[str, Any]:
    """What ``@miniray.method`` declared, as ``ray.method`` options: Ray's handle then carries
    them, also to processes that find the actor with ``get_actor``."""
    declared: dict[str, Any] = {"num_returns": method_options["num_returns"]}
    if method_options["retry_exceptions"]:
        declared["retry_exceptions"] = _retry_exceptions(method_options["retry_exceptions"])
    for key in ("max_task_retries", "concurrency_group"):
        if method_options.get(key) is not None:
            declared[key] = method_options[key]
    return declared


# ------------------------------------------------------------------------------- the backend


class RayBackend:
    """The ``Backend`` protocol on Ray. Starts Ray, connects to a cluster, or attaches.

    * Ray already initialised in this process (a Ray worker, or a driver that called
      ``ray.init`` itself): attach; ``shutdown`` kills what miniray created and leaves Ray up.
    * ``address`` (or ``$RAY_ADDRESS``): connect to that cluster; ``shutdown`` disconnects.
    * otherwise: start a new local Ray instance (never silently join another cluster running
      on this host) with ``num_workers`` CPUs; ``shutdown`` stops it.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None, **options: Any):
        import ray

        if ray.is_initialized():
            if address is not None or options:
                raise ValueError(
                    f"Ray is already initialised in this process, so miniray attaches to it and "
                    f"cannot apply address={address!r} or options {sorted(options)}; call "
                    "miniray.init(backend='ray') without them, or ray.shutdown() first"
                )
            _ignore_num_workers(num_workers, "the Ray instance already running in this process")
            self._setup(owns_ray=False, in_worker=False)
            return
        init_kwargs = dict(options)
        if address is None and not os.environ.get(ENV_RAY_ADDRESS):
            init_kwargs.setdefault("include_dashboard", False)
            if num_workers is not None:
                init_kwargs["num_cpus"] = num_workers
            ray.init(address="local", **init_kwargs)
        elif address is not None:
            if num_workers is not None:
                raise ValueError(
                    f"num_workers={num_workers} sizes a Ray instance that miniray starts; the "
                    f"cluster at address={address!r} has its own resources: leave it out"
                )
            ray.init(address=address, **init_kwargs)
        else:
            # $RAY_ADDRESS points an unchanged script at a cluster: its num_workers was meant
            # for the embedded pool, so it is not an error here.
            _ignore_num_workers(num_workers, f"the cluster at ${ENV_RAY_ADDRESS}")
            ray.init(**init_kwargs)
        self._setup(owns_ray=True, in_worker=False)

    @classmethod
    def attached(cls, *, in_worker: bool) -> RayBackend:
        """A backend on the Ray already initialised in this process."""
        backend = cls.__new__(cls)
        backend._setup(owns_ray=False, in_worker=in_worker)
        return backend

    def _setup(self, *, owns_ray: bool, in_worker: bool) -> None:
        self._owns_ray = owns_ray
        self._in_worker = in_worker
        self._lock = threading.Lock()
        self._functions: dict[tuple[str, int], Any] = {}  # (function_id, max_calls) -> Ray's
        self._classes: dict[str, Any] = {}  # class_id -> ray ActorClass
        # Every actor this backend created, kept alive until kill/shutdown (local semantics).
        self._actors: dict[str, Any] = {}
        # Refs of tasks still held by the user: shutdown cancels the unfinished ones.
        self._task_refs: weakref.WeakSet[ObjectRef] = weakref.WeakSet()
        self._closed = False
        _register_serializers()

    # -- tasks -----------------------------------------------------------------------------
    def _ray_function(self, fn: RemoteFunction, max_calls: int) -> Any:
        # Ray takes max_calls only when the function is defined, not in .options().
        key = (fn.function_id, max_calls)
        with self._lock:
            remote_fn = self._functions.get(key)
            if remote_fn is None:
                import ray

                run = _task_function(fn.function, fn.__qualname__)
                remote_fn = ray.remote(max_calls=max_calls)(run) if max_calls else ray.remote(run)
                self._functions[key] = remote_fn
        return remote_fn

    def submit_task(
        self, fn: RemoteFunction, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        ray_options = _passthrough(options, _TASK_PASSTHROUGH)
        ray_options.update(
            num_returns=options["num_returns"],
            max_retries=options["max_retries"],
            retry_exceptions=_retry_exceptions(options["retry_exceptions"]),
        )
        remote_fn = self._ray_function(fn, options["max_calls"]).options(**ray_options)
        out = _call_remote(remote_fn, args, kwargs, fn.__qualname__)
        if options["num_returns"] == "streaming":
            return ObjectRefGenerator(_RayStream(out))
        refs = _wrap_refs(out, options["num_returns"])
        if refs:
            with self._lock:
                self._task_refs.add(refs[0])
        return returns_of(refs, options["num_returns"]) if refs else None

    # -- actors ----------------------------------------------------------------------------
    def _ray_class(self, cls: ActorClass) -> Any:
        with self._lock:
            ray_cls = self._classes.get(cls.class_id)
            if ray_cls is None:
                import ray

                ray_cls = ray.remote(_actor_subclass(cls))
                self._classes[cls.class_id] = ray_cls
        return ray_cls

    def create_actor(
        self, cls: ActorClass, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> ActorHandle:
        ray_options = _passthrough(options, _ACTOR_PASSTHROUGH)
        ray_options.update(
            max_restarts=options["max_restarts"],
            max_task_retries=options["max_task_retries"],
            max_concurrency=options["max_concurrency"],
            max_pending_calls=options["max_pending_calls"],
        )
        if options["get_if_exists"]:
            ray_options["get_if_exists"] = True
        ray_cls = self._ray_class(cls).options(**ray_options)
        ray_handle = _call_remote(ray_cls, args, kwargs, cls.__name__)
        handle = RayActorHandle(ray_handle, cls.__name__, cls.methods)
        with self._lock:
            self._actors.setdefault(handle.actor_id, ray_handle)
        return handle

    def submit_actor_call(
        self, handle: ActorHandle, method: str, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        ray_handle = _ray_handle(handle)
        call_options: dict[str, Any] = {
            "num_returns": options["num_returns"],
            "retry_exceptions": _retry_exceptions(options["retry_exceptions"]),
        }
        for key in ("max_task_retries", "concurrency_group"):
            if options.get(key) is not None:
                call_options[key] = options[key]
        ray_method = getattr(ray_handle, method).options(**call_options)
        out = _call_remote(ray_method, args, kwargs, f"{handle.class_name}.{method}")
        if options["num_returns"] == "streaming":
            return ObjectRefGenerator(_RayStream(out))
        refs = _wrap_refs(out, options["num_returns"])
        return returns_of(refs, options["num_returns"]) if refs else None

    def kill(self, handle: ActorHandle, no_restart: bool) -> None:
        import ray

        ray_handle = _ray_handle(handle)
        ray.kill(ray_handle, no_restart=no_restart)
        if no_restart:
            with self._lock:
                self._actors.pop(handle.actor_id, None)
            _wait_until_dead(ray_handle, handle)

    def get_actor(self, name: str, namespace: str | None) -> ActorHandle:
        import ray

        try:
            ray_handle = ray.get_actor(name, namespace=namespace)
        except ValueError as exc:
            raise ValueError(f"{exc} (miniray.get_actor(name={name!r}))") from None
        class_name, methods = _metadata_of(ray_handle)
        return RayActorHandle(ray_handle, class_name, methods)

    def runtime_context(self) -> RayRuntimeContext:
        import ray

        return RayRuntimeContext(ray.get_runtime_context())

    def exit_actor(self) -> None:
        import ray

        worker = ray._private.worker.global_worker
        if worker.mode != ray._private.worker.WORKER_MODE or worker.actor_id.is_nil():
            # Ray's own TypeError, in the words the embedded backends use.
            raise TypeError(
                "exit_actor() was called outside an actor (in the driver or a task); call it "
                "inside an actor's method, or use miniray.kill(handle) to end an actor from "
                "outside"
            )
        ray.actor.exit_actor()

    # -- objects ---------------------------------------------------------------------------
    def get(self, refs: list[ObjectRef], deadline: float | None) -> list[Any]:
        import ray

        ray_refs = [_ray_ref(r) for r in refs]
        try:
            return ray.get(ray_refs, timeout=_remaining(deadline))
        except ray.exceptions.RayError as exc:
            _raise_mapped(exc)

    def wait(
        self, refs: list[ObjectRef], num_returns: int, deadline: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        import ray

        ray_refs = [_ray_ref(r) for r in refs]
        ready, _ = ray.wait(ray_refs, num_returns=num_returns, timeout=_remaining(deadline))
        done = set(ready)
        # Ray keeps input order too; rebuilding from the input keeps the caller's own objects.
        ready_refs = [r for r, rr in zip(refs, ray_refs) if rr in done]
        return ready_refs, [r for r, rr in zip(refs, ray_refs) if rr not in done]

    def put(self, value: Any) -> ObjectRef:
        import ray

        return RayObjectRef(ray.put(value))

    def future(self, ref: ObjectRef) -> Future:
        ray_future = _ray_ref(ref).future()
        fut: Future = Future()

        def read(done: Future) -> Any:
            try:
                return done.result()
            except BaseException as exc:
                raise _map_error(exc) from None

        # Ray calls this on the thread that receives its replies, where a user's callback that
        # blocks would stall every later get(): only queue (futures.py).
        ray_future.add_done_callback(lambda done: futures.settle(fut, lambda: read(done)))
        return fut

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        import ray

        ray.cancel(_ray_ref(ref), force=force, recursive=recursive)

    def release(self, object_id: str) -> None:
        """Nothing to do: Ray counts references of the ray.ObjectRef inside our ref."""

    def pin(self, object_id: str) -> None:
        """Nothing to do: Ray tracks refs pickled into other values (borrowing)."""

    # -- lifecycle -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill our actors and cancel our unfinished tasks; stop Ray only if we started it.

        In a Ray worker this is a no-op: the worker belongs to Ray, and the actors it created
        may still be used by the driver.
        """
        if self._closed or self._in_worker:
            return
        self._closed = True
        import ray

        if not ray.is_initialized():
            return
        with self._lock:
            actors = list(self._actors.values())
            self._actors.clear()
            task_refs = [_ray_ref(r) for r in list(self._task_refs)]
        for ray_handle in actors:
            ray.kill(ray_handle, no_restart=True)
        if task_refs:
            _, pending = ray.wait(
                task_refs, num_returns=len(task_refs), timeout=0, fetch_local=False
            )
            for ray_ref in pending:
                ray.cancel(ray_ref, force=False)
        _deregister_serializers()  # leave Ray's serialization as miniray found it
        if self._owns_ray:
            ray.shutdown()


# ------------------------------------------------------------------------------- helpers


def _ignore_num_workers(num_workers: int | None, where: str) -> None:
    if num_workers is not None:
        warnings.warn(
            f"miniray.init(num_workers={num_workers}) is ignored on Ray: {where} has its own "
            "CPUs and schedules tasks on them",
            RuntimeWarning,
            stacklevel=4,
        )


def _passthrough(options: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: options[k] for k in keys if options.get(k) is not None}


def _retry_exceptions(value: Any) -> Any:
    # Ray wants a list; our validated option may be a tuple.
    return list(value) if isinstance(value, tuple) else value


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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


def _call_remote(target: Any, args: tuple, kwargs: dict, label: str) -> Any:
    import ray

    call_args = [_unwrap_arg(a) for a in args]
    call_kwargs = {k: _unwrap_arg(v) for k, v in kwargs.items()}
    try:
        return target.remote(*call_args, **call_kwargs)
    except TypeError as exc:
        if "serialize" not in str(exc):
            raise
        culprit = execution._unpicklable_argument(args, kwargs)
        raise TypeError(
            f"Could not serialize {culprit} of {label}.remote(): {str(exc).splitlines()[0]}. "
            "Arguments must be picklable (cloudpickle); pass state that cannot be pickled "
            "(locks, sockets, open files) by creating it inside the remote function or actor."
        ) from None
    except ray.exceptions.RayError as exc:
        _raise_mapped(exc)


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
