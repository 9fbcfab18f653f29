"""The small value types users hold: ObjectRef, ActorHandle, RemoteFunction, ActorClass.

They carry ids and options only; every action goes to the backend of the current process
(``context.current()``), so a handle pickled into another process works there unchanged.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from miniray.runtime import context
from miniray.runtime import options as opts

if TYPE_CHECKING:
    from concurrent.futures import Future

_ids = itertools.count()
_ID_PREFIX = os.urandom(4).hex()


def new_id(kind: str) -> str:
    """A process-unique id; the pid and a random prefix make it unique across processes."""
    return f"{kind}{_ID_PREFIX}{os.getpid():x}.{next(_ids):x}"


class ObjectRef:
    """A future value living in the runtime. ``get`` it, ``wait`` on it, pass it to calls."""

    __slots__ = ("__weakref__", "_counted", "_id")

    def __init__(self, object_id: str, *, counted: bool = True):
        self._id = object_id
        self._counted = counted

    def hex(self) -> str:
        return self._id

    @property
    def id(self) -> str:
        return self._id

    def future(self) -> Future:
        """A ``concurrent.futures.Future`` completed with the value (or its error)."""
        return context.current().future(self)

    def __await__(self) -> Any:
        import asyncio  # lazily: workers start faster without it

        return asyncio.wrap_future(self.future()).__await__()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"ObjectRef({self._id})"

    def __reduce__(self) -> tuple[Any, ...]:
        # A ref that leaves its process can be used from anywhere: pin its object.
        backend = context.current_or_none()
        if backend is not None:
            backend.pin(self._id)
        return (_rebuild_ref, (self._id,))

    def __del__(self) -> None:
        if self._counted:
            backend = context.current_or_none()
            if backend is not None:
                backend.release(self._id)


def _rebuild_ref(object_id: str) -> ObjectRef:
    return ObjectRef(object_id, counted=False)


def method(**method_options: Any) -> Callable[[Callable], Callable]:
    """Decorate an actor method with options, e.g. ``@miniray.method(num_returns=2)``."""
    opts.validate("method", method_options)

    def decorate(fn: Callable) -> Callable:
        fn.__miniray_method_options__ = method_options  # type: ignore[attr-defined]
        return fn

    return decorate


class RemoteFunction:
    """``@remote`` on a function. Call ``.remote(...)``; the function runs in a worker."""

    def __init__(self, fn: Callable, task_options: dict[str, Any], function_id: str = ""):
        self._function = fn
        self._options = opts.validate("task", dict(task_options))
        self._function_id = function_id or new_id("f")
        self.__name__ = getattr(fn, "__name__", "remote_function")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    @property
    def function(self) -> Callable:
        return self._function

    @property
    def function_id(self) -> str:
        return self._function_id

    @property
    def task_options(self) -> dict[str, Any]:
        return opts.resolved("task", self._options)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return context.current().submit_task(self, args, kwargs, self.task_options)

    def options(self, **overrides: Any) -> RemoteFunction:
        return RemoteFunction(
            self._function, opts.merged("task", self._options, overrides), self._function_id
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Remote functions cannot be called directly. Instead of running "
            f"'{self.__name__}()', try '{self.__name__}.remote()'."
        )

    def __repr__(self) -> str:
        return f"RemoteFunction({self.__qualname__})"


def _actor_methods(cls: type) -> dict[str, dict[str, Any]]:
    import inspect  # lazily: a worker process that never defines actors skips it

    methods: dict[str, dict[str, Any]] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") and name != "__call__":
            continue
        if not (inspect.isfunction(member) or inspect.ismethod(member)):
            continue
        method_options = opts.resolved("method", getattr(member, "__miniray_method_options__", {}))
        method_options["is_async"] = inspect.iscoroutinefunction(
            member
        ) or inspect.isasyncgenfunction(member)
        methods[name] = method_options
    return methods


class ActorClass:
    """``@remote`` on a class. ``.remote(...)`` starts an actor and returns its handle."""

    def __init__(self, cls: type, actor_options: dict[str, Any], class_id: str = ""):
        self._cls = cls
        self._options = opts.validate("actor", dict(actor_options))
        self._class_id = class_id or new_id("c")
        self._methods = _actor_methods(cls)
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__wrapped__ = cls

    @property
    def cls(self) -> type:
        return self._cls

    @property
    def class_id(self) -> str:
        return self._class_id

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        return self._methods

    @property
    def is_async(self) -> bool:
        return any(m["is_async"] for m in self._methods.values())

    @property
    def actor_options(self) -> dict[str, Any]:
        resolved = opts.resolved("actor", self._options)
        if resolved["max_concurrency"] is None:
            resolved["max_concurrency"] = 1000 if self.is_async else 1
        return resolved

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        return context.current().create_actor(self, args, kwargs, self.actor_options)

    def options(self, **overrides: Any) -> ActorClass:
        return ActorClass(self._cls, opts.merged("actor", self._options, overrides), self._class_id)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Actors cannot be instantiated directly. Instead of '{self.__name__}()', "
            f"use '{self.__name__}.remote()'."
        )

    def __repr__(self) -> str:
        return f"ActorClass({self.__qualname__})"


class ActorHandle:
    """A reference to a running actor. Picklable: pass it to tasks and other actors."""

    def __init__(self, actor_id: str, class_name: str, methods: dict[str, dict[str, Any]]):
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods

    @property
    def actor_id(self) -> str:
        return self._actor_id

    @property
    def class_name(self) -> str:
        return self._class_name

    def __getattr__(self, name: str) -> ActorMethod:
        methods = self.__dict__.get("_methods")
        if methods is None or name.startswith("__"):
            raise AttributeError(name)
        if name not in methods:
            raise AttributeError(
                f"actor class {self._class_name!r} has no method {name!r}; "
                f"its methods are {sorted(methods)}"
            )
        return ActorMethod(self, name, methods[name])

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorHandle, (self._actor_id, self._class_name, self._methods))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __repr__(self) -> str:
        return f"ActorHandle({self._class_name}, {self._actor_id})"


class ActorMethod:
    """``handle.method``: call ``.remote(...)`` to run it in the actor."""

    def __init__(self, handle: ActorHandle, name: str, method_options: dict[str, Any]):
        self._handle = handle
        self._name = name
        self._options = method_options

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return context.current().submit_actor_call(
            self._handle, self._name, args, kwargs, self._options
        )

    def options(self, **overrides: Any) -> ActorMethod:
        return ActorMethod(
            self._handle, self._name, opts.merged("method", self._options, overrides)
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Actor methods cannot be called directly. Instead of running "
            f"'{self._name}()', try '{self._name}.remote()'."
        )


def returns_of(refs: list[ObjectRef], num_returns: int) -> Any:
    """What ``.remote()`` returns: one ref, or a list of ``num_returns`` refs."""
    if num_returns == 1:
        return refs[0]
    return refs
