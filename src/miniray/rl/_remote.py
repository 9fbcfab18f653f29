"""``Cls.remote(...)`` on a plain class, so one class serves both ways the seeds use it.

Seed 000 constructs the synchronizer directly (``UnifiedParameterSynchronizer(config)``) while
seed 001 writes ``ParameterSynchronizer.remote(config, ...)`` and
``MessageQueueClient.remote(max_staleness=3)``. ``@miniray.remote`` would turn the class into
an ``ActorClass`` that cannot be constructed directly, so instead the class gets two
descriptors, ``remote`` and ``options``, that start it as an actor on demand.

The descriptors hand out ``functools.partial`` objects, not functions or bound methods, so that
``miniray.remote(cls)`` does not mistake them for actor methods.
"""

from __future__ import annotations

import functools
from typing import Any

import miniray

_ACTOR_CLASSES: dict[tuple[type, tuple], Any] = {}


def _actor_class(cls: type, options: dict[str, Any]) -> Any:
    key = (cls, tuple(sorted(options.items())))
    actor_class = _ACTOR_CLASSES.get(key)
    if actor_class is None:
        actor_class = miniray.remote(**options)(cls) if options else miniray.remote(cls)
        _ACTOR_CLASSES[key] = actor_class
    return actor_class


def _start(cls: type, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    return _actor_class(cls, options).remote(*args, **kwargs)


def _with_options(cls: type, options: dict[str, Any], **overrides: Any) -> Any:
    return _actor_class(cls, {**options, **overrides})


class actor_constructor:
    """``Cls.remote(*a)`` starts ``actor_class or Cls`` as an actor with ``options``.

    ``Cls.options(**o)`` returns the ``ActorClass`` with ``o`` merged in, as Ray's does.
    """

    def __init__(self, *, kind: str, actor_class: type | None = None, **options: Any):
        if kind not in ("remote", "options"):
            raise ValueError(f"kind={kind!r} must be 'remote' or 'options'")
        self._kind = kind
        self._actor_class = actor_class
        self._options = options

    def __get__(self, instance: Any, owner: type) -> Any:
        target = self._actor_class or owner
        if self._kind == "remote":
            return functools.partial(_start, target, self._options)
        return functools.partial(_with_options, target, self._options)
