"""What is running here: ``get_runtime_context()``, ``exit_actor()`` and namespaces.

The embedded backends (inline, local) answer from two sources:

* the backend's identity (job, node, namespace), fixed for a session and the same in the
  driver and every process it started;
* ``_executing``, a context variable the executor sets before user code runs: the id of the
  task or actor call and, in an actor, the actor. A context variable rather than a global
  because one process runs many calls at once (inline threads, a threaded actor's pool, an
  async actor's tasks) and each must see its own; it is unset in the driver, so ids are None
  there, as in Ray.

A local backend's actor process also records its actor once (``set_process_actor``), so threads
the user starts inside an actor still know which actor they belong to, as in Ray.

The Ray backend has its own context (``ray_values.RayRuntimeContext``) over Ray's.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from miniray.runtime.refs import ActorHandle


class ActorExit(SystemExit):
    """Raised by ``exit_actor()`` in an actor's method; the executor ends the actor.

    A SystemExit, as Ray's: user code that catches ``Exception`` does not swallow it."""


class ActorIdentity:
    """The actor a call runs in: enough to build its handle (``current_actor``)."""

    __slots__ = ("actor_id", "class_name", "methods", "name")

    def __init__(
        self, actor_id: str, class_name: str, methods: dict[str, dict[str, Any]], name: str | None
    ):
        self.actor_id = actor_id
        self.class_name = class_name
        self.methods = methods
        self.name = name

    def handle(self) -> ActorHandle:
        from miniray.runtime.refs import ActorHandle

        return ActorHandle(self.actor_id, self.class_name, self.methods)


class Executing:
    """The task or actor call running in this thread (or asyncio task)."""

    __slots__ = ("actor", "task_id")

    def __init__(self, task_id: str, actor: ActorIdentity | None):
        self.task_id = task_id
        self.actor = actor


_executing: ContextVar[Executing | None] = ContextVar("miniray_executing", default=None)
_process_actor: ActorIdentity | None = None


def set_executing(task_id: str, actor: ActorIdentity | None) -> None:
    """Called by executors right before user code runs (one ContextVar.set, ~50 ns)."""
    _executing.set(Executing(task_id, actor))


def set_process_actor(actor: ActorIdentity) -> None:
    """A local backend's actor process hosts exactly this actor from now on."""
    global _process_actor
    _process_actor = actor


def current_actor_identity() -> ActorIdentity | None:
    executing = _executing.get()
    if executing is not None and executing.actor is not None:
        return executing.actor
    return _process_actor


def exit_actor_here() -> None:
    """``exit_actor()`` on the embedded backends: raise ActorExit inside an actor only."""
    if current_actor_identity() is None:
        raise TypeError(
            "exit_actor() was called outside an actor (in the driver or a task); call it "
            "inside an actor's method, or use miniray.kill(handle) to end an actor from outside"
        )
    raise ActorExit("exit_actor() was called")


def anonymous_namespace() -> str:
    """A driver's namespace when ``init`` names none: its own, as Ray's anonymous one."""
    raw = os.urandom(16).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def node_id_of(session_id: str) -> str:
    """The one node of an embedded session, the same in the driver and in every child."""
    return f"node-{session_id}"


def check_namespace(namespace: Any, where: str) -> None:
    """None or a non-empty string, as Ray requires."""
    if namespace is None:
        return
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(
            f"{where}: namespace={namespace!r} must be None (the driver's namespace) or a "
            "non-empty string"
        )


class RuntimeContext:
    """``miniray.get_runtime_context()`` on the inline and local backends (Ray's names).

    Ids are strings; the task and actor ids are None where Ray's are (the driver; a task for
    the actor id). ``get_assigned_resources`` is refused: these backends do not assign
    resources, and an empty answer would look like "no GPU" to code that asks.
    """

    def __init__(self, backend_name: str, job_id: str, node_id: str, namespace: str):
        self._backend_name = backend_name
        self._job_id = job_id
        self._node_id = node_id
        self._namespace = namespace

    @property
    def namespace(self) -> str:
        return self._namespace

    def get_job_id(self) -> str:
        return self._job_id

    def get_node_id(self) -> str:
        return self._node_id

    def get_task_id(self) -> str | None:
        executing = _executing.get()
        return None if executing is None else executing.task_id

    def get_actor_id(self) -> str | None:
        actor = current_actor_identity()
        return None if actor is None else actor.actor_id

    def get_actor_name(self) -> str | None:
        actor = current_actor_identity()
        if actor is None:
            return None
        return actor.name or ""

    @property
    def current_actor(self) -> ActorHandle:
        actor = current_actor_identity()
        if actor is None:
            raise RuntimeError("current_actor is only available inside an actor")
        return actor.handle()

    def get_assigned_resources(self) -> dict[str, float]:
        raise NotImplementedError(
            f"get_assigned_resources() is not supported by the {self._backend_name} backend: it "
            "accepts resource options but does not assign resources; use backend='ray'"
        )

    def __repr__(self) -> str:
        return (
            f"RuntimeContext(backend={self._backend_name!r}, job_id={self._job_id!r}, "
            f"namespace={self._namespace!r})"
        )
