"""What Ray runs for our remote functions and actor classes, in its workers: wrappers that
first make the worker a miniray process (``_enter_worker``), then call the user's code and wrap
its errors as ours; and the options they declare to Ray (``ray.method``).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

from miniray.runtime import context
from miniray.runtime.ray_errors import _is_ray_control_flow, _user_error
from miniray.runtime.ray_values import _register_serializers
from miniray.runtime.refs import ActorClass

_worker_lock = threading.Lock()
_worker_entered = False


def _enter_worker() -> None:
    """First thing every task and actor runs in a Ray worker: become a miniray process."""
    global _worker_entered
    if _worker_entered:
        return
    with _worker_lock:
        if _worker_entered:
            return
        if context.current_or_none() is None:
            # Imported here: ray_backend imports this module (a circle at module level).
            from miniray.runtime.ray_backend import RayBackend

            context.set_backend(RayBackend.attached(in_worker=True))
        _register_serializers()
        _worker_entered = True


def _task_function(fn: Any, label: str) -> Any:
    """The function Ray runs for a remote function: enter the worker, call, wrap errors."""

    # *args: RemoteFunction.remote (refs.py) has already bound the arguments to fn's signature.
    def run(*args: Any, **kwargs: Any) -> Any:
        _enter_worker()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _is_ray_control_flow(exc):
                raise
            raise _user_error(label, exc) from None

    def run_stream(*args: Any, **kwargs: Any) -> Any:
        # A generator itself: Ray makes a streaming task only of a generator function.
        _enter_worker()
        try:
            for value in fn(*args, **kwargs):  # noqa: UP028 (not `yield from`: see _wrap_method)
                yield value
        except Exception as exc:
            if _is_ray_control_flow(exc):
                raise
            raise _user_error(label, exc) from None

    if inspect.isgeneratorfunction(fn):
        run = run_stream
    # Ray names the task (and its log lines) after these.
    run.__name__ = getattr(fn, "__name__", "remote_function")
    run.__qualname__ = getattr(fn, "__qualname__", run.__name__)
    run.__module__ = getattr(fn, "__module__", __name__)
    return run


def _actor_subclass(actor_class: ActorClass) -> type:
    """A subclass of the user's class whose methods enter the worker and wrap errors as ours.

    A subclass (not a wrapper object) keeps ``self`` the user's instance, so ``isinstance`` and
    ``super()`` inside methods work, and Ray sees ``async def`` methods and makes an async actor.
    """
    import ray

    user_cls = actor_class.cls
    class_name = actor_class.__name__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _enter_worker()
        try:
            user_cls.__init__(self, *args, **kwargs)  # type: ignore[misc]
        except Exception as exc:
            raise _user_error(f"{class_name}.__init__", exc) from None

    namespace: dict[str, Any] = {"__init__": __init__}
    for name, method_options in actor_class.methods.items():
        method = _wrap_method(user_cls, name, class_name, method_options)
        namespace[name] = ray.method(**_declared_method_options(method_options))(method)
    generated = type(class_name, (user_cls,), namespace)
    generated.__qualname__ = getattr(user_cls, "__qualname__", class_name)
    generated.__module__ = getattr(user_cls, "__module__", __name__)
    return generated


def _wrap_method(user_cls: type, name: str, class_name: str, method_options: dict) -> Any:
    # The user's attribute as stored (function, staticmethod or classmethod), bound per call
    # through its own __get__: exactly what `instance.name` would have given.
    attribute = inspect.getattr_static(user_cls, name)
    label = f"{class_name}.{name}"
    generator_kind = _generator_kind(attribute)

    # A generator method's wrapper is a generator itself: Ray streams only those.
    if generator_kind == "async":

        async def async_generator_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                async for value in attribute.__get__(self, type(self))(*args, **kwargs):
                    yield value
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method: Any = async_generator_method
    elif generator_kind == "sync":

        def generator_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                # Not `yield from`: Ray sends values into the generator, which a user's own
                # `yield from range(...)` would pass on to an iterator without send().
                for value in attribute.__get__(self, type(self))(*args, **kwargs):  # noqa: UP028
                    yield value
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method = generator_method
    elif method_options["is_async"]:

        async def async_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                result = attribute.__get__(self, type(self))(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method = async_method
    else:

        def sync_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            _enter_worker()
            try:
                return attribute.__get__(self, type(self))(*args, **kwargs)
            except Exception as exc:
                if _is_ray_control_flow(exc):
                    raise
                raise _user_error(label, exc) from None

        method = sync_method
    method.__name__ = name
    method.__qualname__ = label
    check = method_options.get("argument_check")
    if check is not None:
        # Ray reads each method's signature (dropping the first parameter) when it makes the
        # class and keeps it in every handle of the actor: with the user's parameters instead of
        # our *args, a handle found by get_actor carries them too (see _metadata_of).
        receiver = inspect.Parameter("_miniray_self", inspect.Parameter.POSITIONAL_ONLY)
        method.__signature__ = check.signature.replace(
            parameters=[receiver, *check.signature.parameters.values()]
        )
    return method


def _generator_kind(attribute: Any) -> str | None:
    """ "sync" or "async" for a generator method as stored in the class, else None."""
    function = getattr(attribute, "__func__", attribute)  # a staticmethod's or classmethod's
    if inspect.isasyncgenfunction(function):
        return "async"
    return "sync" if inspect.isgeneratorfunction(function) else None


def _declared_method_options(method_options: dict[str, Any]) -> dict[str, Any]:
    """What ``@miniray.method`` declared, as ``ray.method`` options: Ray's handle then carries
    them, also to processes that find the actor with ``get_actor``."""
    declared: dict[str, Any] = {"num_returns": method_options["num_returns"]}
    if method_options["retry_exceptions"]:
        declared["retry_exceptions"] = _retry_exceptions(method_options["retry_exceptions"])
    for key in ("max_task_retries", "concurrency_group"):
        if method_options.get(key) is not None:
            declared[key] = method_options[key]
    return declared


def _retry_exceptions(value: Any) -> Any:
    # Ray wants a list; our validated option may be a tuple.
    return list(value) if isinstance(value, tuple) else value
