"""Running one call in whatever process executes it: arguments in, results or error out.

Shared by every backend that executes Python itself (inline and local), so that argument
resolution, error wrapping and ``num_returns`` behave the same everywhere.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any

from miniray.errors import RayTaskError
from miniray.runtime.refs import ObjectRef


@dataclass(frozen=True)
class Dep:
    """Stands in for a top-level ObjectRef argument until its value is known."""

    object_id: str


def encode_args(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str]]:
    """Replace top-level refs by ``Dep`` markers (nested refs stay refs, as in Ray)."""
    deps: list[str] = []

    def swap(value: Any) -> Any:
        if isinstance(value, ObjectRef):
            deps.append(value.id)
            return Dep(value.id)
        return value

    new_args = tuple(swap(a) for a in args)
    new_kwargs = {k: swap(v) for k, v in kwargs.items()}
    return new_args, new_kwargs, deps


def decode_args(args: tuple, kwargs: dict, values: dict[str, Any]) -> tuple[tuple, dict]:
    def fill(value: Any) -> Any:
        return values[value.object_id] if isinstance(value, Dep) else value

    return tuple(fill(a) for a in args), {k: fill(v) for k, v in kwargs.items()}


def task_error(function_name: str, exc: BaseException) -> RayTaskError:
    """Wrap an exception raised by user code, keeping its traceback as text."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RayTaskError(function_name, text, cause, pid=os.getpid())


def split_returns(value: Any, num_returns: int, function_name: str) -> list[Any]:
    """The list of return values for ``num_returns`` refs."""
    if num_returns == 1:
        return [value]
    if num_returns == 0:
        return []
    try:
        values = list(value)
    except TypeError:
        values = None
    if values is None or len(values) != num_returns:
        got = "a non-sequence" if values is None else f"{len(values)} values"
        raise ValueError(
            f"{function_name}() was declared with num_returns={num_returns} but returned {got}"
        )
    return values


def should_retry_exception(exc: BaseException, retry_exceptions: Any) -> bool:
    if retry_exceptions is True:
        return True
    if isinstance(retry_exceptions, (list, tuple)):
        cause = exc.cause if isinstance(exc, RayTaskError) else exc
        return isinstance(cause, tuple(retry_exceptions))
    return False
