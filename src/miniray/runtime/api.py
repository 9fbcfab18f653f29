"""The public runtime API (Ray's names and semantics); it picks a backend and validates input.

Timeouts become one monotonic deadline here, at the public edge, so nested waits inside a
backend can never add up to more than the caller asked for. ``None``, ``inf`` and anything
longer than ``MAX_TIMEOUT_S`` mean no deadline at all; NaN and negative values are refused.
"""

from __future__ import annotations

import atexit
import math
import os
import time
from collections.abc import Callable
from typing import Any

from miniray.runtime import context, runtime_context
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ObjectRef,
    ObjectRefGenerator,
    RemoteFunction,
)

BACKENDS = ("local", "inline", "ray")
ENV_BACKEND = "MINIRAY_BACKEND"
# Longer timeouts mean "no deadline". The waits underneath cannot hold an arbitrary deadline:
# epoll takes milliseconds in a C int (24.8 days), a condition variable a time_t, Ray an int64
# of milliseconds; ``inf`` or ``1e10`` passed through raised OverflowError. 11.6 days is
# indistinguishable from forever for a blocking call, and stays below every one of those limits.
MAX_TIMEOUT_S = 1e6


def init(
    address: str | None = None,
    *,
    num_workers: int | None = None,
    num_cpus: int | None = None,
    backend: str | None = None,
    ignore_reinit_error: bool = False,
    namespace: str | None = None,
    **backend_options: Any,
) -> None:
    """Start the runtime.

    ``backend`` is 'local' (processes on this machine, the default), 'inline' (one process, for
    debugging) or 'ray'; without it ``$MINIRAY_BACKEND`` decides. An ``address`` means Ray.
    ``num_workers`` (alias ``num_cpus``) is the size of the task worker pool; 0 starts a
    driver-only session (put, get and actors work; a task fails at once, where Ray would keep it
    pending forever). ``namespace`` is where this driver's named actors live and ``get_actor``
    looks (default: an anonymous namespace of its own, as in Ray).
    """
    if context.current_or_none() is not None:
        if ignore_reinit_error:
            return
        raise RuntimeError(
            "miniray.init() was already called in this process; call miniray.shutdown() first "
            "or pass ignore_reinit_error=True"
        )
    if num_workers is not None and num_cpus is not None and num_workers != num_cpus:
        raise ValueError(
            f"num_workers={num_workers} and num_cpus={num_cpus} disagree; pass only one"
        )
    workers = num_workers if num_workers is not None else num_cpus
    if workers is not None and (
        not isinstance(workers, int) or isinstance(workers, bool) or workers < 0
    ):
        raise ValueError(
            f"num_workers={workers!r} must be an integer >= 0 (0: a driver-only session)"
        )
    name = backend or (None if address else os.environ.get(ENV_BACKEND)) or "local"
    if address and name != "ray":
        if backend is not None:
            raise ValueError(f"address={address!r} needs backend='ray', got backend={backend!r}")
        name = "ray"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; known backends are {list(BACKENDS)}")
    runtime_context.check_namespace(namespace, "init()")
    if namespace is not None:
        backend_options["namespace"] = namespace
    context.set_backend(_make_backend(name, address, workers, backend_options))


def _make_backend(
    name: str, address: str | None, num_workers: int | None, options: dict[str, Any]
) -> Any:
    if name == "inline":
        from miniray.runtime.inline import InlineBackend

        return InlineBackend(runs_tasks=num_workers != 0, **options)
    if name == "local":
        from miniray.runtime.local.head import LocalBackend

        if num_workers is None:
            num_workers = os.cpu_count() or 1
        return LocalBackend(num_workers=num_workers, **options)
    try:
        from miniray.runtime.ray_backend import RayBackend  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            "backend='ray' needs the optional Ray extra: pip install 'miniray[ray]'"
        ) from exc
    return RayBackend(address=address, num_workers=num_workers, **options)


# Like Ray, the first use without init() starts the default backend; context runs it, and cannot
# import this module for it (we import context).
context.set_auto_start(init)


def shutdown() -> None:
    """Stop every process and free every shared-memory segment this runtime started."""
    backend = context.current_or_none()
    if backend is None:
        return
    context.set_backend(None)
    backend.shutdown()


atexit.register(shutdown)


def is_initialized() -> bool:
    return context.current_or_none() is not None


def backend_name() -> str | None:
    backend = context.current_or_none()
    return None if backend is None else backend.name


def remote(*args: Any, **options: Any) -> Any:
    """``@remote`` or ``@remote(**options)`` on a function or a class."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError(
            "@remote takes a function or a class, or only keyword options as in "
            f"@remote(num_returns=2); got {args!r}"
        )
    return lambda target: _make_remote(target, options)


def _make_remote(target: Any, options: dict[str, Any]) -> Any:
    if isinstance(target, type):
        return ActorClass(target, options)
    if callable(target) and not isinstance(target, (RemoteFunction, ActorClass)):
        return RemoteFunction(target, options)
    raise TypeError(
        f"@remote needs a plain function or class, got {type(target).__name__}: {target!r}"
    )


def deadline_of(timeout: float | None, what: str) -> float | None:
    """The monotonic deadline of a ``timeout`` in seconds, or None for no deadline.

    ``what`` names the call in the error, e.g. "get()". Every public call that takes a timeout
    converts it here, so inf, huge values and NaN behave the same on every backend.
    """
    if timeout is None:
        return None
    rule = "must be None (or float('inf')) to wait forever, or a number of seconds >= 0"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"{what}: timeout={timeout!r} {rule}")
    if isinstance(timeout, float) and math.isnan(timeout):
        # NaN compares false with everything, so it used to slip past "< 0" and wait forever.
        raise ValueError(f"{what}: timeout={timeout!r} is not a number; it {rule}")
    if timeout < 0:
        raise ValueError(f"{what}: timeout={timeout!r} {rule}")
    if timeout > MAX_TIMEOUT_S:
        return None
    return time.monotonic() + timeout


def get(object_refs: ObjectRef | list[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) of a ref or a list of refs. Re-raises remote errors; ``timeout`` in s."""
    deadline = deadline_of(timeout, "get()")
    if isinstance(object_refs, ObjectRef):
        return context.current().get([object_refs], deadline)[0]
    if isinstance(object_refs, (list, tuple)):
        bad = [i for i, r in enumerate(object_refs) if not isinstance(r, ObjectRef)]
        if bad:
            raise ValueError(
                f"get() expects an ObjectRef or a list of ObjectRefs; item {bad[0]} is a "
                f"{type(object_refs[bad[0]]).__name__}: {object_refs[bad[0]]!r}"
            )
        if not object_refs:
            return []
        return context.current().get(list(object_refs), deadline)
    raise ValueError(
        "get() expects an ObjectRef or a list of ObjectRefs, got "
        f"{type(object_refs).__name__}: {object_refs!r}"
    )


def wait(
    object_refs: list[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
    fetch_local: bool = True,
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Split refs into (ready, not_ready) once ``num_returns`` are ready or time is up."""
    if isinstance(object_refs, ObjectRef):
        raise TypeError("wait() expects a list of ObjectRefs, not a single ObjectRef")
    if not isinstance(object_refs, (list, tuple)):
        raise TypeError(f"wait() expects a list of ObjectRefs, got {type(object_refs).__name__}")
    for i, ref in enumerate(object_refs):
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"wait(): item {i} is a {type(ref).__name__}, not an ObjectRef")
    if len(set(object_refs)) != len(object_refs):
        raise ValueError("wait() expects unique ObjectRefs; the list has duplicates")
    if not isinstance(num_returns, int) or isinstance(num_returns, bool) or num_returns < 0:
        raise ValueError(f"wait(): num_returns={num_returns!r} must be a positive integer")
    deadline = deadline_of(timeout, "wait()")
    if not object_refs:
        return [], []  # whatever num_returns asks for, as Ray 2.x does
    if num_returns == 0:
        raise ValueError("wait(): num_returns=0 must be a positive integer")
    if num_returns > len(object_refs):
        raise ValueError(
            f"wait(): num_returns={num_returns} exceeds the number of refs ({len(object_refs)})"
        )
    return context.current().wait(list(object_refs), num_returns, deadline)


def put(value: Any) -> ObjectRef:
    """Store a value in the runtime; pass the ref to many calls to ship it once."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself")
    return context.current().put(value)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kill an actor's process now; later calls raise ``ActorDiedError``."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() expects an ActorHandle, got {type(actor).__name__}")
    context.current().kill(actor, no_restart)


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the named actor in ``namespace`` (default: this job's); ``ValueError`` if
    no live actor has that name there, at once (as in Ray: a name is registered when
    ``.remote()`` returns, before the constructor has run)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_actor(): name={name!r} must be a non-empty string")
    runtime_context.check_namespace(namespace, "get_actor()")
    return context.current().get_actor(name, namespace)


def get_runtime_context() -> Any:
    """What is running here: ``get_job_id()``, ``get_task_id()``, ``get_actor_id()``,
    ``get_node_id()``, ``namespace``, ``current_actor``... (Ray's names and semantics)."""
    return context.current().runtime_context()


def cancel(object_ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel a task; its ``get`` and those of its dependents raise ``TaskCancelledError``.

    Not started yet: it never runs. Running: it sees a ``KeyboardInterrupt`` (user code may
    catch it and return); ``force=True`` kills its worker instead. Finished: nothing happens.
    ``recursive=True`` also cancels the tasks it submitted. An actor call's ``get`` raises
    ``TaskCancelledError`` (running sync code is not interrupted; an async call's coroutine is
    cancelled), and ``force=True`` on one is a ``ValueError``, as in Ray (docs/runtime.md).
    """
    if isinstance(object_ref, ObjectRefGenerator):
        raise TypeError(
            "cancel() of an ObjectRefGenerator (a streaming generator) is not supported by "
            "miniray yet: cancel the task that started it (recursive=True), kill its actor "
            "(miniray.kill), or stop reading it (docs/runtime.md, Generators)"
        )
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"cancel() expects an ObjectRef, got {type(object_ref).__name__}")
    for name, value in (("force", force), ("recursive", recursive)):
        if not isinstance(value, bool):
            raise TypeError(f"cancel(): {name}={value!r} must be a bool")
    context.current().cancel(object_ref, force, recursive)


def method(**options: Any) -> Callable[[Callable], Callable]:
    from miniray.runtime.refs import method as _method

    return _method(**options)
