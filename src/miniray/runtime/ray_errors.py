"""Errors on the Ray backend: Ray's exceptions mapped to ours (``_map_error``), and user errors
inside a Ray worker wrapped as our ``RayTaskError`` (``_user_error``)."""

from __future__ import annotations

import re
from typing import NoReturn

import miniray.errors as errors  # the module, not the package: runtime sits below it
from miniray.runtime import execution


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
        # Raised while Ray pickled a result (a Verified value's check): Ray's dual class of
        # the cause, without the wrapper's attributes.
        return errors.RayTaskError(
            getattr(exc, "function_name", "a task"),
            str(exc),
            cause,
            pid=getattr(exc, "pid", 0) or 0,
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
