"""Running one call in whatever process executes it: arguments in, results or error out.

Shared by every backend that executes Python itself (inline and local), so that argument
resolution, error wrapping and ``num_returns`` behave the same everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from miniray.errors import ObjectStoreFullError, RaySystemError, RayTaskError
from miniray.runtime import serialization
from miniray.runtime.refs import ObjectRef


class Dep:
    """Stands in for a top-level ObjectRef argument until its value is known.

    (A plain class, not a dataclass: importing dataclasses pulls in inspect, and every worker
    process imports this module at start-up.)"""

    __slots__ = ("object_id",)

    def __init__(self, object_id: str):
        self.object_id = object_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (Dep, (self.object_id,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dep) and other.object_id == self.object_id

    def __hash__(self) -> int:
        return hash(self.object_id)


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
    """Wrap an exception raised by user code, keeping its traceback as text.

    Frames of the runtime itself are dropped from the top so the text starts at user code.
    """
    import traceback  # lazily: workers start faster, and only failures pay for it

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_runtime_frame(tb):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return RayTaskError(function_name, text, cause, pid=os.getpid())


_RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_runtime_frame(tb: Any) -> bool:
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_RUNTIME_DIR)


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


def retries_after(
    exc: BaseException, retries_left: int, retry_exceptions: Any, *, crashed: bool = False
) -> int | None:
    """The retry policy of every runner (task or actor call, sync or async, on every embedded
    backend): after an attempt failed with ``exc`` while ``retries_left`` retries remained (-1:
    no limit), the retries left once the next attempt starts, or None: the call ends here.

    ``crashed`` means the process running the call ended under it (``sys.exit``, or an actor
    that was restarted): Ray retries that whatever ``retry_exceptions`` says. Both kinds of
    failure spend the one budget, so a call never gets more attempts than asked."""
    if retries_left == 0:
        return None
    if not crashed and not should_retry_exception(exc, retry_exceptions):
        return None
    return retries_left - 1 if retries_left > 0 else -1


def should_retry_exception(exc: BaseException, retry_exceptions: Any) -> bool:
    if retry_exceptions is True:
        return True
    if isinstance(retry_exceptions, (list, tuple)):
        cause = exc.cause if isinstance(exc, RayTaskError) else exc
        return isinstance(cause, tuple(retry_exceptions))
    return False


def serialize_args(args: tuple, kwargs: dict, label: str, session_id: str | None) -> Any:
    """Serialize call arguments; an unpicklable one is a TypeError naming which one."""
    try:
        return serialization.serialize((args, kwargs), session_id=session_id)
    except ObjectStoreFullError:
        raise  # the arguments pickle fine; shared memory has no room for them
    except Exception as exc:
        culprit = _unpicklable_argument(args, kwargs)
        raise TypeError(
            f"Could not serialize {culprit} of {label}.remote(): {type(exc).__name__}: {exc}. "
            "Arguments must be picklable (cloudpickle); pass state that cannot be pickled "
            "(locks, sockets, open files) by creating it inside the remote function or actor."
        ) from exc


def _unpicklable_argument(args: tuple, kwargs: dict) -> str:
    for i, value in enumerate(args):
        if not _picklable(value):
            return f"argument {i} ({type(value).__name__})"
    for key, value in kwargs.items():
        if not _picklable(value):
            return f"keyword argument {key!r} ({type(value).__name__})"
    return "the arguments"


def _picklable(value: Any) -> bool:
    try:
        serialization.dumps(value)
    except Exception:
        return False
    return True


def no_cpus_error(task_name: str) -> RaySystemError:
    """Why a task of a driver-only session (``init(num_cpus=0)``) fails: Ray would leave it
    pending forever, and a ``get`` without a timeout would hang."""
    return RaySystemError(
        f"task {task_name}() cannot run: miniray.init(num_cpus=0) started a driver-only session "
        "with no CPU for tasks (put, get and actors work); pass num_cpus >= 1 to run tasks"
    )


# Ray's limit on a pickled remote function or actor class, under Ray's name for it (in bytes):
# what is bigger almost always captured a large object by accident, and would be copied to
# every process that runs it.
FUNCTION_SIZE_ERROR_THRESHOLD = int(os.environ.get("FUNCTION_SIZE_ERROR_THRESHOLD", 10**8))


def pickled_definition(target: Any, kind: str, name: str) -> bytes:
    """``target`` (a function or class) pickled by value; a ``ValueError`` as Ray raises when
    it is over ``FUNCTION_SIZE_ERROR_THRESHOLD``. ``kind`` is "remote function" or "actor"."""
    pickled = serialization.dumps(target)
    if len(pickled) >= FUNCTION_SIZE_ERROR_THRESHOLD:
        mib = 1024 * 1024
        raise ValueError(
            f"The {kind} {name} is too large to ship: it pickles to {len(pickled) // mib} MiB, over "
            f"FUNCTION_SIZE_ERROR_THRESHOLD={FUNCTION_SIZE_ERROR_THRESHOLD // mib} MiB (Ray's "
            "limit). It probably captures a large object from its scope (a global or a "
            "closure variable): pass it as an argument or through put() instead."
        )
    return pickled


def _ray_ready(instance: Any) -> bool:
    return True


def _ray_call(instance: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(instance, *args, **kwargs)


def _ray_terminate(instance: Any) -> None:
    from miniray.runtime.runtime_context import exit_actor_here

    exit_actor_here()


# refs.BUILTIN_METHODS: what handles offer; these run them.
_BUILTIN_METHODS: dict[str, Callable[..., Any]] = {
    "__ray_ready__": _ray_ready,
    "__ray_call__": _ray_call,
    "__ray_terminate__": _ray_terminate,
}


def actor_method(instance: Any, name: str) -> Any:
    """``instance.name``, or the built-in method of that name every actor has (as in Ray).

    The built-ins are looked up only when the attribute is missing: user methods pay nothing."""
    try:
        return getattr(instance, name)
    except AttributeError:
        builtin = _BUILTIN_METHODS.get(name)
        if builtin is None:
            raise
        return lambda *args, **kwargs: builtin(instance, *args, **kwargs)
