"""The Ray backend: the public runtime API on a Ray cluster. It and the other ``ray_*``
modules are the only ones that import ray.

``ray`` is imported inside functions, never at module level: ``import miniray`` must work (and
stay fast) without Ray installed, and api.py imports this module only for ``backend='ray'``.

What users hold stays ours: ``RayObjectRef`` and ``RayActorHandle`` subclass ``ObjectRef`` and
``ActorHandle`` and carry the Ray object inside, so a ref or handle pickled into a task travels as
Ray's own ref/handle (Ray's reference counting and ownership apply) and comes out as ours again.

    driver / worker code --miniray.get--> RayBackend.get --ray.get--> Ray
                                  errors <-- _map_error <-- ray.exceptions.*
    Ray worker: _task_function / generated actor subclass --> _enter_worker() (attach context,
                register the numpy reducer) --> user code --> errors wrapped as ours

The parts: ``ray_values`` (our refs, handles, generators and runtime context around Ray's, and
numpy's serializer), ``ray_errors`` (Ray's errors mapped to ours), ``ray_worker`` (what Ray runs
for our functions and actor classes); the backend here starts or attaches to Ray and submits.

Semantics that Ray does differently and this backend restores, so a script prints the same
results on every backend:

* numpy arrays received (``get``, task and method arguments) are writable private copies, not
  Ray's read-only views of the object store (one memcpy per receive);
* remote errors are our dual-class ``RayTaskError`` with the traceback starting at user code;
* actors live until ``kill`` or ``shutdown``, not until their last handle is dropped: the backend
  keeps a handle of every actor it created.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from typing import Any

import miniray.errors as errors  # the module, not the package: runtime sits below it
from miniray.runtime import execution, futures
from miniray.runtime.ray_errors import _map_error, _raise_mapped
from miniray.runtime.ray_values import (
    RayActorHandle,
    RayObjectRef,
    RayRuntimeContext,
    _deregister_serializers,
    _metadata_of,
    _ray_handle,
    _ray_ref,
    _RayStream,
    _register_serializers,
    _unwrap_arg,
    _wrap_refs,
)
from miniray.runtime.ray_worker import _actor_subclass, _retry_exceptions, _task_function
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ObjectRef,
    ObjectRefGenerator,
    RemoteFunction,
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


def worker_backend_or_none() -> RayBackend | None:
    """A backend attached to Ray when this process is a Ray worker (called by ``context``)."""
    import ray

    if not ray.is_initialized():
        return None
    worker = ray._private.worker.global_worker
    if worker.mode != ray._private.worker.WORKER_MODE:
        return None
    return RayBackend.attached(in_worker=True)


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


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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
