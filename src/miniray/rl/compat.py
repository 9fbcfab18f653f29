"""The seeds' names and forms of the RL layer, kept working on top of the one implementation.

* ``actor_constructor``: ``Cls.remote(...)`` on a plain class. Seed 000 constructs the
  synchronizer directly (``UnifiedParameterSynchronizer(config)``) while seed 001 writes
  ``ParameterSynchronizer.remote(config, ...)`` and ``MessageQueueClient.remote(max_staleness=3)``.
  ``@miniray.remote`` would turn the class into an ``ActorClass`` that cannot be constructed
  directly, so instead the class gets two descriptors, ``remote`` and ``options``, that start it
  as an actor on demand.
* ``SeedSyncModes``: the seed's three ways of driving a weight sync, all one
  ``UnifiedParameterSynchronizer.sync``:

  * async mode: ``UnifiedParameterSynchronizer(config, trainer, rollouter)``,
    ``sync_to_rollouter(new_version) -> bool``, ``get_current_version()``;
  * actor mode: ``ParameterSyncManager.remote(config)``, ``register_workers(actors, rollouts)``,
    ``sync_parameters()``;
  * classic mode: ``initialize_sync_group(actors, rollouts)``, ``sync_weights(actors, rollouts)``.

* The seed's class names (``ParameterSynchronizer``, ``AsyncParameterSynchronizer``,
  ``ParameterSyncManager``): the old classes were merged into the unified one. They resolve on
  first access, because ``param_sync`` imports this module for the two above.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

import miniray
from miniray.rl.errors import ParameterSyncError, ParameterSyncTimeoutError
from miniray.rl.types import SyncResult

__all__ = [
    # resolved by __getattr__ below, on first access
    "AsyncParameterSynchronizer",  # noqa: F822
    "ParameterSyncManager",  # noqa: F822
    "ParameterSynchronizer",  # noqa: F822
    "SeedSyncModes",
    "actor_constructor",
    "raise_unless_ok",
]

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
        # functools.partial objects, not functions or bound methods: miniray.remote(cls) would
        # take those for actor methods.
        target = self._actor_class or owner
        if self._kind == "remote":
            return functools.partial(_start, target, self._options)
        return functools.partial(_with_options, target, self._options)


class SeedSyncModes:
    """The seed's sync methods, for a class that offers ``sync(version=None, *, trainers,
    rollouters) -> SyncResult`` and ``register_workers(actors, rollouts)``."""

    if TYPE_CHECKING:  # what the class using these modes provides

        def sync(
            self, version: int | None = None, *, trainers: Any = (), rollouters: Any = ()
        ) -> SyncResult: ...

        def register_workers(self, actor_workers: Any, rollout_workers: Any) -> bool: ...

    # -- async mode -------------------------------------------------------------------------
    def sync_to_rollouter(self, new_version: int) -> bool:
        """Publish the trainer's weights as ``new_version``.

        ``True`` on success; ``False`` when ``new_version`` is not newer than the current
        version (a duplicate or late call: nothing happens). A sync that fails after its
        retries raises ``ParameterSyncError`` (``ParameterSyncTimeoutError`` on timeout); the
        version stays the old one and the rollouter has been resumed.
        """
        return raise_unless_ok(self.sync(new_version))

    # -- actor mode -------------------------------------------------------------------------
    def sync_parameters(self) -> bool:
        """Publish the registered trainer's weights as the next version (current + 1)."""
        return raise_unless_ok(self.sync())

    # -- classic mode -----------------------------------------------------------------------
    def initialize_sync_group(self, actor_workers: Any, rollout_workers: Any) -> bool:
        """Set up the group of workers that later ``sync_weights`` calls use."""
        return self.register_workers(actor_workers, rollout_workers)

    def sync_weights(self, actor_workers: Any = None, rollout_workers: Any = None) -> bool:
        """Publish the next version; workers default to the registered ones."""
        return raise_unless_ok(self.sync(trainers=actor_workers, rollouters=rollout_workers))


def raise_unless_ok(result: SyncResult) -> bool:
    """The seed's answer to a sync: True when done, False when refused (not newer), else raise
    ``ParameterSyncError`` (``ParameterSyncTimeoutError`` on timeout) with the result."""
    if result.status == "ok":
        return True
    if result.status == "refused":
        return False
    message = (
        f"weight sync to version {result.version} failed after {result.attempts} attempt(s) "
        f"({result.status}); the version stays {result.current_version}: {result.error}"
    )
    if result.status == "timeout":
        raise ParameterSyncTimeoutError(message, result)
    raise ParameterSyncError(message, result)


def _unified() -> Any:
    return importlib.import_module("miniray.rl.param_sync").UnifiedParameterSynchronizer


# alias -> how to build it from param_sync's class
_ALIASES = {
    "ParameterSynchronizer": _unified,
    "AsyncParameterSynchronizer": _unified,
    # The threaded actor form (``UnifiedParameterSynchronizer.options`` has its options).
    "ParameterSyncManager": lambda: _unified().options(),
}


def __getattr__(name: str) -> Any:
    build = _ALIASES.get(name)
    if build is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = build()
    globals()[name] = value  # one object per name, and later lookups skip this function
    return value
