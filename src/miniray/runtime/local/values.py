"""Stored values of the local backend: ``(is_error, Serialized)`` and how to make and read them."""

from __future__ import annotations

from typing import Any

from miniray.errors import RayTaskError
from miniray.runtime import execution, serialization
from miniray.runtime.local.protocol import Stored


def value_of(stored: Stored) -> Any:
    return serialization.deserialize(stored[1])


def raise_if_error(stored: Stored) -> None:
    if stored[0]:
        raise error_of(stored)


def error_of(stored: Stored) -> BaseException:
    """The exception a failed value raises, decoded in the process (and thread) that asks.

    Only callers decode errors, never the head's router thread: unpickling runs user code, and
    a user's exception that does not unpickle decodes as a ``RayTaskError`` naming it (see
    ``RayTaskError.__reduce__``)."""
    error = serialization.deserialize(stored[1])
    if isinstance(error, RayTaskError):
        return error.as_instanceof_cause()
    return error


def stored_value(value: Any, session_id: str, label: str) -> Stored:
    try:
        return (False, serialization.serialize(value, session_id=session_id))
    except serialization.Rejected as rejected:  # a Verified value's check: the call's error
        return stored_error(execution.task_error(label, rejected.cause), session_id)
    except Exception as exc:
        error = TypeError(
            f"Could not serialize the return value of {label}() "
            f"({type(value).__name__}): {type(exc).__name__}: {exc}"
        )
        return stored_error(error, session_id)


def stored_error(error: BaseException, session_id: str) -> Stored:
    try:
        return (True, serialization.serialize(error, session_id=session_id))
    except Exception:
        # The user's exception cannot be pickled: keep its type name, message and traceback.
        substitute: BaseException
        if isinstance(error, RayTaskError):
            substitute = RayTaskError(
                error.function_name,
                error.traceback_str,
                RuntimeError(f"{type(error.cause).__name__}: {error.cause}"),
                pid=error.pid,
            )
        else:
            substitute = RuntimeError(f"{type(error).__name__}: {error}")
        return (True, serialization.serialize(substitute, session_id=None))
