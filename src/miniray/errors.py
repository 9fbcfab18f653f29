"""Every public exception of miniray, one class per thing a caller can do about it.

Names follow Ray's ``ray.exceptions`` so that ``except ray.exceptions.X`` code keeps working with
``import miniray as ray``. Two properties are load-bearing and tested:

* ``GetTimeoutError`` is also a builtin ``TimeoutError``.
* ``RayTaskError.as_instanceof_cause()`` builds an instance that is *both* a ``RayTaskError`` and
  the remote exception's own class, so ``except ValueError`` catches a remote ``ValueError`` and
  its message carries the remote traceback.
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = [
    "ActorAlreadyExistsError",
    "ActorDiedError",
    "ActorUnavailableError",
    "GetTimeoutError",
    "ObjectLostError",
    "ObjectStoreFullError",
    "PendingCallsLimitExceeded",
    "RayActorError",
    "RayError",
    "RaySystemError",
    "RayTaskError",
    "TaskCancelledError",
    "WorkerCrashedError",
]


class RayError(Exception):
    """Base of every error raised by the runtime itself."""


class RaySystemError(RayError):
    """The runtime failed (a broken internal channel, a process that would not start)."""


class GetTimeoutError(RayError, TimeoutError):
    """``get``/``wait`` or another blocking call ran out of time. Also a ``TimeoutError``."""


class TaskCancelledError(RayError):
    """The task was cancelled with ``miniray.cancel`` before it produced a result."""


class WorkerCrashedError(RayError):
    """The process running a task died and the task has no retries left."""


class ObjectLostError(RayError):
    """An object's value is gone (its process died before storing it, or it was freed)."""


class ObjectStoreFullError(RayError):
    """A value does not fit in the shared-memory directory (/dev/shm or $MINIRAY_SHM_DIR)."""


class PendingCallsLimitExceeded(RayError):
    """An actor handle already has ``max_pending_calls`` calls waiting; back off and retry."""


class RayActorError(RayError):
    """The actor could not run the call: it died, failed to start, or is restarting."""

    def __init__(self, message: str = "The actor died unexpectedly.", *, actor_id: str = ""):
        super().__init__(message)
        self.actor_id = actor_id


class ActorDiedError(RayActorError):
    """The actor is dead for good: killed, out of restarts, or its ``__init__`` raised."""


class ActorUnavailableError(RayActorError):
    """The actor died while this call was in flight and is being restarted."""


class ActorAlreadyExistsError(ValueError, RayError):
    """An actor with this name already exists (use ``get_if_exists=True`` to reuse it)."""


class RayTaskError(RayError):
    """A task or actor method raised; ``cause`` is the original exception.

    ``get`` never raises this plain class for a picklable user error: it raises
    ``as_instanceof_cause()``, which is also an instance of the user's exception class.
    """

    def __init__(
        self,
        function_name: str,
        traceback_str: str,
        cause: BaseException,
        *,
        pid: int = 0,
    ):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.pid = pid
        super().__init__(self._message())

    def _message(self) -> str:
        header = f"{type(self.cause).__name__}: {self.cause}"
        return (
            f"{header}\n\nThe remote call {self.function_name}() (pid={self.pid}) raised; "
            f"remote traceback:\n{self.traceback_str.rstrip()}"
        )

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        # The cause travels as a pickle of its own, next to its type name and message: a user's
        # exception can pickle and yet fail to unpickle (an ``__init__`` whose arguments differ
        # from those it passes to ``Exception``), and whoever decodes it must then still learn
        # what was raised and where. It is pickled in-band, so an error never owns a shared-
        # memory segment (errors are copied to every dependent of the call that failed).
        import cloudpickle  # lazily: only failures pay for it

        return (
            _rebuild_task_error,
            (
                self.function_name,
                self.traceback_str,
                cloudpickle.dumps(self.cause, protocol=5),
                self.pid,
                type(self.cause).__name__,
                str(self.cause),
                type(self)
                is not RayTaskError,  # a dual instance unpickles as one, a plain one plain
            ),
        )

    def as_instanceof_cause(self) -> RayTaskError:
        """An error that is both a ``RayTaskError`` and an instance of ``type(cause)``; this
        error itself when the cause's class cannot be subclassed (as Ray does)."""
        if isinstance(self.cause, RayTaskError):
            return self.cause
        if not isinstance(self.cause, Exception):
            return self
        try:
            return self.make_dual_exception_instance()
        except TypeError:  # final classes, or an incompatible C layout
            return self

    def make_dual_exception_instance(self) -> RayTaskError:
        """A new instance of the class deriving from ``RayTaskError`` and ``type(cause)``, with
        this error's fields; ``TypeError`` when that class cannot be made (as in Ray)."""
        dual = _dual_class(type(self.cause))
        err = dual.__new__(dual)  # type: ignore[call-overload]
        err.function_name = self.function_name
        err.traceback_str = self.traceback_str
        err.cause = self.cause
        err.pid = self.pid
        err.args = (err._message(),)
        err.__dict__.update(getattr(self.cause, "__dict__", {}))
        return err


_DUAL_CLASSES: dict[type, type] = {}


def _dual_class(cause_cls: type) -> type:
    cls = _DUAL_CLASSES.get(cause_cls)
    if cls is None:
        cls = type(
            f"RayTaskError({cause_cls.__name__})",
            (RayTaskError, cause_cls),
            {"__init__": _no_init, "__str__": RayTaskError.__str__},
        )
        cls.__module__ = __name__
        _DUAL_CLASSES[cause_cls] = cls
    return cls


def _no_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """Dual classes are built field by field, never through the user's ``__init__``."""


def _rebuild_task_error(
    function_name: str,
    traceback_str: str,
    cause_pickle: bytes,
    pid: int,
    cause_type: str,
    cause_message: str,
    dual: bool = True,
) -> RayTaskError:
    """Unpickle a ``RayTaskError``; a cause that does not unpickle here becomes a RuntimeError
    with its type name and message, and the traceback text says why."""
    cause: BaseException
    try:
        cause = pickle.loads(cause_pickle)
    except Exception as exc:
        cause = RuntimeError(f"{cause_type}: {cause_message}")
        traceback_str = (
            f"{traceback_str.rstrip()}\n\n(The {cause_type} raised remotely could not be "
            f"unpickled here ({type(exc).__name__}: {exc}); it stands in as a RuntimeError "
            "with its message. Exceptions must unpickle as well as pickle: see "
            "BaseException.__reduce__.)"
        )
    error = RayTaskError(function_name, traceback_str, cause, pid=pid)
    return error.as_instanceof_cause() if dual else error
