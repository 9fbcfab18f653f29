"""Ray's ``ray.actor`` module: ``exit_actor()`` and the actor types.

import miniray as ray
ray.actor.exit_actor()   # inside an actor's method: end this actor, for good
"""

from __future__ import annotations

from miniray.runtime import context
from miniray.runtime.refs import (
    ActorClass,
    ActorClassInheritanceException,
    ActorHandle,
    ActorMethod,
)

__all__ = [
    "ActorClass",
    "ActorClassInheritanceException",
    "ActorHandle",
    "ActorMethod",
    "exit_actor",
]


def exit_actor() -> None:
    """End the current actor from inside one of its methods, as Ray's ``exit_actor``.

    The call that exits, the calls queued behind it and every later call raise
    ``ActorDiedError``; the actor is not restarted whatever its ``max_restarts``, and its name
    is free again. Calls running alongside it (threaded or async actors) run to their end.
    Outside an actor (the driver, a task) it is a ``TypeError``.
    """
    backend = context.current_or_none()
    if backend is None:  # no runtime at all: certainly not inside an actor
        raise TypeError("exit_actor() was called outside an actor (no miniray runtime runs)")
    backend.exit_actor()
