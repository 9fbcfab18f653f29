"""The small value types users hold: ObjectRef, ActorHandle, RemoteFunction, ActorClass.

They carry ids and options only; every action goes to the backend of the current process
(``context.current()``), so a handle pickled into another process works there unchanged.

Every ``.remote()`` binds its arguments to the target's signature here, before any backend sees
the call: Ray raises ``TypeError`` at the call site for arguments that do not fit, and doing it
in these shared types keeps the inline, local and Ray backends alike.
"""

from __future__ import annotations

import itertools
import os
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from miniray.runtime import context
from miniray.runtime import options as opts

if TYPE_CHECKING:
    import asyncio
    import inspect
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

    def is_nil(self) -> bool:
        """Whether this is Ray's "no object" ref (``ObjectRefGenerator._next_sync`` timed out)."""
        return self._id == NIL_ID

    @property
    def id(self) -> str:
        return self._id

    def future(self) -> Future:
        """A ``concurrent.futures.Future`` completed with the value (or its error)."""
        return context.current().future(self)

    def as_future(self) -> asyncio.Future:
        """An ``asyncio.Future`` of the value, on the current event loop (as ``await ref``).

        Cancelling it does not cancel the task, as in Ray."""
        import asyncio  # lazily: workers start faster without it

        return asyncio.wrap_future(self.future())

    def __await__(self) -> Any:
        return self.as_future().__await__()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"ObjectRef({self._id})"

    def __reduce__(self) -> tuple[Any, ...]:
        # A ref that leaves its process can be used from anywhere: pin its object (or, in an
        # actor call's arguments on the local backend, lend it: see LocalBackend.pin).
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
    # A backend that counts the refs its processes hold (the local backend's children)
    # makes a counted one; elsewhere the object was pinned when the ref was pickled.
    backend = context.current_or_none()
    borrowed = getattr(backend, "borrowed_ref", None)
    if borrowed is not None:
        return borrowed(object_id)  # type: ignore[no-any-return]
    return ObjectRef(object_id, counted=False)


# Ray's id of "no object": what ObjectRefGenerator._next_sync returns when its timeout passes.
NIL_ID = "ff" * 28


def nil_ref() -> ObjectRef:
    return ObjectRef(NIL_ID, counted=False)


def is_nil(ref: ObjectRef) -> bool:
    return ref.id == NIL_ID


class ObjectRefGenerator:
    """What ``.remote()`` of a streaming generator task returns (Ray's class of that name).

    Iterating gives one ObjectRef per value the task yields, as soon as it is yielded; ``next``
    blocks until then (``_next_sync(timeout_s)`` returns a nil ref when its time is up, as
    Ray's does). An exception in the generator is stored in the ref after the last value, so
    ``get`` of that ref raises it; iteration then stops. ``source`` is the backend's end of the
    stream: ``next_ref(index, deadline)`` -> the index-th ref, None after the last, or a nil ref
    at the deadline; ``ready(index)``; ``finished(index)``; ``close(index)`` (drop the refs not
    taken: called from ``__del__``, so it must not block)."""

    def __init__(self, source: Any):
        self._source = source
        self._taken = 0

    def __iter__(self) -> ObjectRefGenerator:
        return self

    def __next__(self) -> ObjectRef:
        ref = self._next(None)
        assert not is_nil(ref)
        return ref

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next ref; a nil ref (``is_nil(ref)``) if none came within ``timeout_s``."""
        import time

        return self._next(None if timeout_s is None else time.monotonic() + timeout_s)

    def _next(self, deadline: float | None) -> ObjectRef:
        ref = self._source.next_ref(self._taken, deadline)
        if ref is None:
            raise StopIteration
        if not is_nil(ref):
            self._taken += 1
        return ref

    def next_ready(self) -> bool:
        """Whether ``next`` would return at once (a value, an error, or the end)."""
        return self._source.ready(self._taken)

    def is_finished(self) -> bool:
        """Whether the task has ended and every ref it yielded has been taken."""
        return self._source.finished(self._taken)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "An ObjectRefGenerator cannot be pickled or passed to another task (as in Ray): "
            "pass the ObjectRefs it yields instead"
        )

    def __del__(self) -> None:
        source = getattr(self, "_source", None)
        if source is not None:
            source.close(self._taken)

    def __repr__(self) -> str:
        return f"ObjectRefGenerator(taken={self._taken})"


class _HasDefault:
    """Stands for a parameter's default in the signatures we keep: only *having* one matters
    to ``bind``, and the user's value could be large or not picklable (handles carry these)."""

    def __repr__(self) -> str:
        return "..."

    def __reduce__(self) -> str:
        return "HAS_DEFAULT"  # pickled by reference: one marker in every process


HAS_DEFAULT = _HasDefault()


class ArgumentCheck:
    """A callable's signature, made once, that every ``.remote()`` binds its arguments to.

    Ray raises ``TypeError`` at the call site for arguments that do not fit; so do we, for the
    same reasons (``inspect.Signature.bind``'s messages). Per call, measured with timeit on the
    2-core dev machine (Python 3.11): ``bind`` alone is 1.9 µs for ``(a, b)`` and 3.4 µs for
    five parameters with keywords, 9% of a local-backend ``.remote()`` (22 µs; 85 µs inline).
    Calls with positional arguments only, the common case, skip ``bind`` when their count
    fits: 0.08 µs.
    """

    __slots__ = ("_fewest", "_most", "signature")

    def __init__(self, signature: inspect.Signature):
        import inspect  # lazily, as in call_signature

        self.signature = signature
        kinds = [p.kind for p in signature.parameters.values()]
        positional = [
            p
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        # Without keywords, n positional arguments bind exactly when n covers the positional
        # parameters without a default (they come first) and does not exceed all of them (any
        # number with *args), and no keyword-only parameter is required.
        self._fewest = sum(p.default is p.empty for p in positional)
        self._most = 1 << 62 if inspect.Parameter.VAR_POSITIONAL in kinds else len(positional)
        if any(
            p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in signature.parameters.values()
        ):
            self._most = -1  # always bind: it reports the missing keyword by name

    def check(self, label: str, args: tuple, kwargs: dict) -> None:
        if not kwargs and self._fewest <= len(args) <= self._most:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"{label}.remote(): {exc}; the signature is {label}{self.signature}"
            ) from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (ArgumentCheck, (self.signature,))


def call_signature(fn: Any, *, drop_first: bool = False) -> inspect.Signature | None:
    """The signature ``.remote()`` arguments are bound to, or None when it cannot be checked.

    Only names, kinds and whether a default exists are kept (annotations and default values
    dropped), so it pickles small and always. ``drop_first`` removes ``self`` of an instance
    method. None, and so no check, for callables inspect cannot read (C builtins such as
    ``max``) and for a method without a parameter for ``self``: the call then fails where it
    runs, as before.
    """
    import inspect  # lazily: 5-9 ms of a worker's start-up, and most workers never need it

    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if drop_first:
        if not parameters or parameters[0].kind is inspect.Parameter.KEYWORD_ONLY:
            return None
        if parameters[0].kind is not inspect.Parameter.VAR_POSITIONAL:  # (*args) takes self
            parameters = parameters[1:]
    return inspect.Signature(
        [
            p.replace(
                annotation=inspect.Parameter.empty,
                default=inspect.Parameter.empty if p.default is p.empty else HAS_DEFAULT,
            )
            for p in parameters
        ]
    )


def argument_check(fn: Any, *, drop_first: bool = False) -> ArgumentCheck | None:
    signature = call_signature(fn, drop_first=drop_first)
    return None if signature is None else ArgumentCheck(signature)


def check_arguments(check: ArgumentCheck | None, label: str, args: tuple, kwargs: dict) -> None:
    if check is not None:
        check.check(label, args, kwargs)


def method(**method_options: Any) -> Callable[[Callable], Callable]:
    """Decorate an actor method with options, e.g. ``@miniray.method(num_returns=2)``."""
    opts.validate("method", method_options)

    def decorate(fn: Callable) -> Callable:
        fn.__miniray_method_options__ = method_options  # type: ignore[attr-defined]
        return fn

    return decorate


class RemoteFunction:
    """``@remote`` on a function. Call ``.remote(...)``; the function runs in a worker."""

    def __init__(
        self,
        fn: Callable,
        task_options: dict[str, Any],
        function_id: str = "",
        _check: tuple[ArgumentCheck | None, bool] | None = None,
    ):
        self._function = fn
        self._options = opts.validate("task", dict(task_options))
        self._function_id = function_id or new_id("f")
        # (check, is a generator function) once the signature is read: at the first .remote(),
        # not at decoration, so a worker importing a module of remote functions does not pay.
        # .options() copies share it.
        self._check = _check
        self._resolved: dict[str, Any] | None = None  # task_options, made at the first .remote()
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
        """The options, defaults filled in; as in Ray a generator function's ``num_returns``
        defaults to "streaming", and "streaming" is refused for any other function."""
        options = opts.resolved("task", self._options)
        is_generator = self._argument_check()[1]
        if is_generator and "num_returns" not in self._options:
            options["num_returns"] = "streaming"
        elif options["num_returns"] == "streaming" and not is_generator:
            raise ValueError(
                f"num_returns='streaming' can only be used with generator functions (functions "
                f"that use 'yield'), as in Ray; {self.__qualname__} is not one"
            )
        return options

    def _argument_check(self) -> tuple[ArgumentCheck | None, bool]:
        if self._check is None:
            import inspect  # lazily, as in call_signature

            self._check = (
                argument_check(self._function),
                inspect.isgeneratorfunction(self._function),
            )
        return self._check

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        check_arguments(self._argument_check()[0], self.__name__, args, kwargs)
        options = self._resolved
        if options is None:
            options = self._resolved = self.task_options
        return context.current().submit_task(self, args, kwargs, options)

    def options(self, **overrides: Any) -> RemoteFunction:
        return RemoteFunction(
            self._function,
            opts.merged("task", self._options, overrides),
            self._function_id,
            self._argument_check(),
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Remote functions cannot be called directly. Instead of running "
            f"'{self.__name__}()', try '{self.__name__}.remote()'."
        )

    def __repr__(self) -> str:
        return f"RemoteFunction({self.__qualname__})"


def _actor_methods(cls: type) -> dict[str, dict[str, Any]]:
    """Each method's options, ``is_async`` and ``argument_check`` (the handle carries it: one
    passed to another process or found with ``get_actor`` checks its calls too)."""
    import inspect  # lazily: a worker process that never defines actors skips it

    methods: dict[str, dict[str, Any]] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") and name != "__call__":
            continue
        if not (inspect.isfunction(member) or inspect.ismethod(member)):
            continue
        declared = getattr(member, "__miniray_method_options__", {})
        method_options = opts.resolved("method", declared)
        is_async_generator = inspect.isasyncgenfunction(member)
        is_generator = is_async_generator or inspect.isgeneratorfunction(member)
        method_options["is_async"] = inspect.iscoroutinefunction(member) or is_async_generator
        method_options["is_generator"] = is_generator
        if is_generator and "num_returns" not in declared:  # as in Ray: a generator streams
            method_options["num_returns"] = "streaming"
        # As in Ray: a classmethod comes bound to the class and a staticmethod has no self, so
        # only a plain method loses its first parameter.
        stored = inspect.getattr_static(cls, name, None)
        plain = not isinstance(stored, (classmethod, staticmethod))
        method_options["argument_check"] = argument_check(member, drop_first=plain)
        methods[name] = method_options
    return methods


# Methods every actor has, as in Ray (``handle.__ray_ready__.remote()`` and the like); the
# executors run them (execution.actor_method) unless the user's class defines its own.
BUILTIN_METHODS: dict[str, dict[str, Any]] = {
    name: {**opts.METHOD_DEFAULTS, "is_async": False, "is_generator": False, "argument_check": None}
    for name in ("__ray_ready__", "__ray_call__", "__ray_terminate__")
}


class ActorClassInheritanceException(TypeError):
    """``class B(SomeActorClass)``: subclass the original class instead (Ray's rule and name)."""


class ActorClass:
    """``@remote`` on a class. ``.remote(...)`` starts an actor and returns its handle.

    Like Ray's, it reads as the class it wraps: class attributes, static and class methods are
    reachable through it (``Cls.LIMIT``, ``Cls.helper(...)``), ``Cls.__ray_actor_class__`` is
    the original class (subclass that one), and subclassing the actor class itself is a
    ``TypeError``.
    """

    def __init__(
        self,
        cls: type,
        actor_options: dict[str, Any],
        class_id: str = "",
        _described: tuple[dict[str, dict[str, Any]], ArgumentCheck | None] | None = None,
    ):
        self._cls = cls
        self._options = opts.validate("actor", dict(actor_options))
        self._class_id = class_id or new_id("c")
        # .options() copies reuse the parent's description instead of inspecting the class again.
        if _described is None:
            # The class's, as Python reads it: __init__ without self, () for a class without
            # one (Ray refuses arguments there too).
            _described = (_actor_methods(cls), argument_check(cls))
        self._methods, self._init_check = _described
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
        check_arguments(self._init_check, self.__name__, args, kwargs)
        return context.current().create_actor(self, args, kwargs, self.actor_options)

    def options(self, **overrides: Any) -> ActorClass:
        return ActorClass(
            self._cls,
            opts.merged("actor", self._options, overrides),
            self._class_id,
            (self._methods, self._init_check),
        )

    @property
    def __ray_actor_class__(self) -> type:
        return self._cls

    def __getattr__(self, name: str) -> Any:
        # Only called for names ActorClass itself lacks: the original class's attributes.
        cls = self.__dict__.get("_cls")
        if cls is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)  # unpickling or copying, before __init__ ran
        try:
            value = getattr(cls, name)
        except AttributeError:
            raise AttributeError(
                f"actor class {cls.__name__!r} has no attribute {name!r}"
            ) from None
        if isinstance(value, types.FunctionType):
            # A fresh wrapper, never the function itself: cloudpickle pickles a function by
            # reference when ``module.Qualname`` resolves to that very object, and through this
            # method ``module.Counter.read`` would, so the class's methods would travel by
            # name to processes that cannot import the module (Ray's workers and test modules).
            return _forwarding(value)
        return value

    def __mro_entries__(self, bases: tuple) -> tuple:
        raise ActorClassInheritanceException(
            f"cannot subclass the actor class {self.__name__!r}: subclass the original class "
            f"({self.__name__}.__ray_actor_class__) and decorate the subclass with "
            "@miniray.remote"
        )

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
        if methods is None:
            raise AttributeError(name)
        if name.startswith("__"):
            if name in methods:  # the user's own __call__ (or a __ray_*__ of theirs)
                return ActorMethod(self, name, methods[name])
            if name in BUILTIN_METHODS:
                return ActorMethod(self, name, BUILTIN_METHODS[name])
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
        label = f"{self._handle.class_name}.{self._name}"
        check_arguments(self._options.get("argument_check"), label, args, kwargs)
        if self._options["num_returns"] == "streaming" and not self._options.get("is_generator"):
            raise ValueError(
                f"num_returns='streaming' can only be used with generator methods (methods "
                f"that use 'yield'), as in Ray; {label} is not one"
            )
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


def _forwarding(fn: Callable) -> Callable:
    import functools  # lazily: only reading a function through an actor class needs it

    @functools.wraps(fn)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return forward


def returns_of(refs: list[ObjectRef], num_returns: int) -> Any:
    """What ``.remote()`` returns: one ref, or a list of ``num_returns`` refs."""
    if num_returns == 1:
        return refs[0]
    return refs
