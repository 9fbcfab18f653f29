"""Stored values of the local backend: ``(is_error, Serialized)`` and how to make and read them."""

from __future__ import annotations

from typing import Any

from miniray.errors import RayTaskError
from miniray.runtime import serialization
from miniray.runtime.local.protocol import Stored


def value_of(stored: Stored) -> Any:
    return serialization.deserialize(stored[1])


def raise_if_error(stored: Stored) -> None:
    is_error, ser = stored
    if not is_error:
        return
    error = serialization.deserialize(ser)
    if isinstance(error, RayTaskError):
        raise error.as_instanceof_cause()
    raise error


def stored_value(value: Any, session_id: str, label: str) -> Stored:
    try:
        return (False, serialization.serialize(value, session_id=session_id))
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
