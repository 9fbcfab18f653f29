"""The local head's actors: one process each, a queue of calls, restarts, deaths, names.

    create --spawn--> STARTING --Ready + arguments stored: CreateActor--> CREATING
    CREATING --Created(ok)--> ALIVE: queued calls go (pump)
             --Created(failure)--> DEAD
    ALIVE --its process died, restarts left--> RESTARTING --a new process--> CREATING ...
          --killed / exit_actor() / sys.exit(0) / no restarts left--> DEAD: calls fail

As in Ray, a sync actor runs one caller's calls in submission order (a call whose arguments are
not stored yet holds the ones behind it); a threaded or async one runs each as soon as its
arguments are ready. Every method runs under the head lock; results are stored through
``store_results`` (the head's); the processes are ``Processes``'.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

from miniray.errors import (
    ActorAlreadyExistsError,
    ActorDiedError,
    ActorUnavailableError,
    PendingCallsLimitExceeded,
    TaskCancelledError,
)
from miniray.runtime import serialization, streaming
from miniray.runtime.local import protocol
from miniray.runtime.local.ledger import SegmentLedger
from miniray.runtime.local.objects import ObjectTable
from miniray.runtime.local.processes import Child, Processes
from miniray.runtime.local.protocol import Stored
from miniray.runtime.local.scheduler import StoreResults, every_return
from miniray.runtime.local.values import stored_error
from miniray.runtime.refs import ActorHandle, new_id


class ActorState(enum.Enum):
    STARTING = "starting"  # its process starting, or __init__'s arguments not stored yet
    CREATING = "creating"  # __init__ sent
    ALIVE = "alive"  # takes calls
    RESTARTING = "restarting"  # its process died; a new one is starting
    DEAD = "dead"  # for good: every call fails with death_reason


WAITING_TO_CREATE = (ActorState.STARTING, ActorState.RESTARTING)


class Call:
    def __init__(
        self,
        call_id: str,
        method: str,
        payload: serialization.Serialized,
        deps: list[str],
        return_ids: list[str],
        options: dict[str, Any],
        *,
        lent: list[str] | None = None,
    ):
        self.call_id = call_id
        self.method = method
        self.payload = payload
        self.deps = deps
        # Refs inside the arguments: kept alive by the call (not resolved), then by the
        # process that unpickled them (its holds).
        self.lent = lent or []
        self.return_ids = return_ids
        self.options = options
        retries = options.get("max_task_retries")
        self.retries_left: int = 0 if retries is None else retries
        self.stream: streaming.Stream | None = None  # a generator method's (no return_ids)
        self.cancelled = False

    @classmethod
    def submitted(cls, message: protocol.SubmitCall) -> Call:
        """A call a child submitted (a nested call)."""
        return cls(
            message.call_id,
            message.method,
            message.payload,
            message.deps,
            message.return_ids,
            message.options,
        )


class Actor:
    def __init__(
        self,
        actor_id: str,
        class_name: str,
        methods: dict[str, Any],
        class_bytes: bytes,
        payload: serialization.Serialized,
        deps: list[str],
        options: dict[str, Any],
    ):
        self.actor_id = actor_id
        self.class_name = class_name
        self.methods = methods
        self.class_bytes = class_bytes
        self.payload = payload
        self.deps = deps
        self.options = options
        self.restarts_left: int = options["max_restarts"]
        # As in Ray: a sync actor runs one caller's calls in submission order, a threaded or
        # async one runs a call as soon as its arguments are ready (see Actors.pump).
        self.out_of_order = options["max_concurrency"] > 1 or any(
            m.get("is_async") for m in methods.values()
        )
        self.state = ActorState.STARTING
        self.child: Child | None = None
        self.pending: deque[Call] = deque()
        self.inflight: dict[str, Call] = {}
        self.death_reason = ""
        self.name_key: tuple[str, str] | None = None  # (namespace, name) of a named actor

    def handle(self) -> ActorHandle:
        return ActorHandle(self.actor_id, self.class_name, self.methods)


class Actors:
    def __init__(
        self,
        session_id: str,
        namespace: str,
        objects: ObjectTable,
        ledger: SegmentLedger,
        processes: Processes,
        store_results: StoreResults,
    ):
        self._session_id = session_id
        self._namespace = namespace  # the driver's: where unqualified names live
        self._objects = objects
        self._ledger = ledger
        self._processes = processes
        self._store_results = store_results
        self.actors: dict[str, Actor] = {}
        self._names: dict[tuple[str, str], str] = {}  # (namespace, name) -> actor id
        # object id -> actors whose next step (create or the head-of-line call) waits on it
        self._waiting: dict[str, list[Actor]] = {}

    # -- creating -----------------------------------------------------------------------------
    def create(
        self,
        class_name: str,
        methods: dict[str, Any],
        class_bytes: bytes,
        payload: serialization.Serialized,
        deps: list[str],
        options: dict[str, Any],
    ) -> ActorHandle:
        # Check and register in one step under the lock: of concurrent get_if_exists=True
        # creations (threads, tasks) exactly one constructs, the others get its handle.
        key = self._name_key(options.get("name"), options.get("namespace"))
        if key is not None and key in self._names:
            if options.get("get_if_exists"):
                return self.actors[self._names[key]].handle()
            raise ActorAlreadyExistsError(
                f"an actor named {key[1]!r} already exists in namespace {key[0]!r}; pass "
                "get_if_exists=True to reuse it, or another name or namespace"
            )
        actor = Actor(new_id("a"), class_name, methods, class_bytes, payload, deps, options)
        self._objects.take_uses(deps)
        self.actors[actor.actor_id] = actor
        if key is not None:
            actor.name_key = key
            self._names[key] = actor.actor_id
        self._start(actor)
        return actor.handle()

    def create_for_child(self, message: protocol.NewActor) -> tuple[str, Any]:
        """A child's create: the Reply's payload, ("ok", (actor id, class name, methods)) or
        ("error", the exception) for the child to raise."""
        try:
            handle = self.create(
                message.class_name,
                message.methods,
                message.class_bytes,
                message.payload,
                message.deps,
                message.options,
            )
        except Exception as exc:
            return ("error", exc)
        return ("ok", (handle.actor_id, handle.class_name, handle._methods))

    def lookup_for_child(self, message: protocol.GetActor) -> tuple[str, Any]:
        """A child's get_actor: the Reply's payload, as ``create_for_child``'s."""
        try:
            return ("ok", self.lookup(message.name, message.namespace))
        except ValueError as exc:
            return ("error", exc)

    def _start(self, actor: Actor) -> None:
        child = self._processes.spawn("actor")
        child.actor = actor
        actor.child = child

    def send_create(self, actor: Actor) -> None:
        """Ask a started actor process to run ``__init__`` once its arguments exist."""
        child = actor.child
        # A dead child (its exit status not known yet) gets nothing: the death restarts or ends
        # the actor.
        if child is None or child.dead or not child.ready or actor.state not in WAITING_TO_CREATE:
            return
        deps = self._objects.stored_of(actor.deps)
        failed = self._objects.failed(actor.deps)
        payload: serialization.Serialized | None
        if failed is not None:
            # The actor's process gets the failed argument alone and reports it as its __init__
            # failing: unpickling a user's exception here, in the router thread, runs user code
            # under the lock (and one that does not unpickle would kill the router).
            payload, dep_values = None, {"failed": failed}  # the process reads nothing else
            self._ledger.deliver(child.key, failed)
        else:
            missing = next((oid for oid, s in zip(actor.deps, deps) if s is None), None)
            if missing is not None:
                self._waiting.setdefault(missing, []).append(actor)
                return  # dep_stored() calls us again when that argument arrives
            payload, dep_values = actor.payload, self._objects.values_of(actor.deps)
            self._ledger.deliver(child.key, actor.payload, *deps)
        options = {
            "max_concurrency": actor.options["max_concurrency"],
            "methods": actor.methods,  # for get_runtime_context().current_actor
            "name": actor.options.get("name"),
        }
        self._processes.send(
            child,
            protocol.CreateActor(
                actor.actor_id, actor.class_name, actor.class_bytes, payload, dep_values, options
            ),
        )
        actor.state = ActorState.CREATING

    def on_created(self, child: Child, actor_id: str, failure: str | None) -> None:
        """``failure``: why ``__init__`` failed, as text the actor's process made (the router
        never decodes a user's exception)."""
        actor = self.actors.get(actor_id)
        if actor is None or actor.child is not child:
            return
        if failure is not None:
            self._dead(actor, failure)
            self._processes.send(child, protocol.Exit())
            return
        actor.state = ActorState.ALIVE
        self.pump(actor)

    def dep_stored(self, oid: str) -> None:
        """``oid`` was stored: actors waiting on it take their next step."""
        for actor in self._waiting.pop(oid, ()):
            if actor.state in WAITING_TO_CREATE:
                self.send_create(actor)
            else:
                self.pump(actor)

    # -- calls --------------------------------------------------------------------------------
    def check_pending_limit(self, actor_id: str) -> None:
        actor = self.actors.get(actor_id)
        if actor is None:
            return
        limit = actor.options.get("max_pending_calls", -1)
        waiting = len(actor.pending) + len(actor.inflight)
        if limit > 0 and waiting >= limit:
            raise PendingCallsLimitExceeded(
                f"actor {actor.class_name} already has {waiting} calls pending "
                f"(max_pending_calls={limit}); wait for some results before submitting more"
            )

    def submit(self, actor_id: str, call: Call, owner: int | None) -> None:
        actor = self.actors.get(actor_id)
        label = f"{actor.class_name if actor else 'actor'}.{call.method}()"
        for oid in call.return_ids:
            self._objects.new(oid, label, owner=owner)
        if actor is None:
            self._fail_dead(call, None, actor_id, "is not known to this runtime")
            return
        if call.retries_left == 0 and call.options.get("max_task_retries") is None:
            call.retries_left = actor.options["max_task_retries"]
        # The actor's process retries listed exceptions itself: tell it the resolved budget.
        call.options["max_task_retries"] = call.retries_left
        self._objects.take_uses(call.deps)
        call.lent = self._objects.lend(call.lent)
        if actor.state is ActorState.DEAD:
            self._fail_dead(call, actor, actor_id, actor.death_reason)
            return
        actor.pending.append(call)
        self.pump(actor)

    def pump(self, actor: Actor) -> None:
        """Send queued calls whose arguments are ready: in submission order, stopping at the
        first that waits (a sync actor), or each as soon as it can go (``out_of_order``)."""
        # A call sent to a dead child whose exit status is not known yet would fail as in
        # flight; queued, it goes to the restarted process or fails as the actor's death says.
        if actor.state is not ActorState.ALIVE or actor.child is None or actor.child.dead:
            return
        held: list[Call] = []  # out-of-order calls still waiting, in submission order
        while actor.pending:
            call = actor.pending.popleft()
            deps = self._objects.stored_of(call.deps)
            failed = self._objects.failed(call.deps)
            if failed is not None:
                self._finish(call, every_return(call, failed))
                continue
            missing = next((oid for oid, s in zip(call.deps, deps) if s is None), None)
            if missing is not None:
                waiting = self._waiting.setdefault(missing, [])
                if actor not in waiting:
                    waiting.append(actor)
                if not actor.out_of_order:
                    actor.pending.appendleft(call)
                    break
                held.append(call)
                continue
            actor.inflight[call.call_id] = call
            self._ledger.deliver(actor.child.key, call.payload, *deps)
            self._processes.send(
                actor.child,
                protocol.RunCall(
                    call.call_id,
                    call.method,
                    call.payload,
                    self._objects.values_of(call.deps),
                    call.return_ids,
                    call.options,
                ),
            )
        if held:
            actor.pending.extendleft(reversed(held))

    def on_result(self, child: Child, call_id: str, stored: list[Stored]) -> None:
        actor = child.actor
        if actor is None:
            return
        call = actor.inflight.pop(call_id, None)
        if call is not None:
            self._finish(call, stored)

    def stream_of(self, child: Child, call_id: str) -> tuple[streaming.Stream, str] | None:
        """The stream of the generator call ``call_id`` in flight on ``child``, and its label."""
        actor = child.actor
        call = actor.inflight.get(call_id) if actor is not None else None
        if actor is None or call is None or call.stream is None:
            return None
        return call.stream, f"{actor.class_name}.{call.method}()"

    def on_retried(self, child: Child, call_id: str) -> None:
        """The process re-ran a call after a listed exception: one retry fewer if it dies."""
        call = child.actor.inflight.get(call_id) if child.actor is not None else None
        if call is not None and call.retries_left > 0:
            call.retries_left -= 1

    def _finish(self, call: Call, stored: list[Stored]) -> None:
        self._objects.release_uses(call.deps)
        self._objects.release_uses(call.lent)
        self._ledger.free(call.payload)
        self._store_results(call.return_ids, stored, call.stream, f"actor call {call.method}()")

    def _fail_dead(
        self,
        call: Call,
        actor: Actor | None,
        actor_id: str,
        reason: str,
        *,
        unavailable: bool = False,
    ) -> None:
        name = actor.class_name if actor else "actor"
        cls = ActorUnavailableError if unavailable else ActorDiedError
        error = cls(f"The actor {name} ({actor_id}) {reason}", actor_id=actor_id)
        self._finish(call, every_return(call, stored_error(error, self._session_id)))

    # -- cancelling ---------------------------------------------------------------------------
    def cancel_producing(self, oid: str, force: bool) -> None:
        """Cancel the actor call that returns ``oid``, if any. As in Ray 2.60 its result is
        TaskCancelledError: one still queued here never runs; the actor's process decides for
        one sent to it (worker.py)."""
        for actor in self.actors.values():
            for call in (*actor.pending, *actor.inflight.values()):
                if oid in call.return_ids:
                    if force:
                        raise ValueError("force=True is not supported for actor tasks.")  # Ray's
                    self._cancel(actor, call)
                    return

    def _cancel(self, actor: Actor, call: Call) -> None:
        if call in actor.pending:
            actor.pending.remove(call)
            error = TaskCancelledError(
                f"actor call {actor.class_name}.{call.method}() was cancelled"
            )
            self._finish(call, every_return(call, stored_error(error, self._session_id)))
        elif not call.cancelled and actor.child is not None:
            call.cancelled = True
            self._processes.send(actor.child, protocol.CancelCall(call.call_id))

    # -- deaths -------------------------------------------------------------------------------
    def _dead(self, actor: Actor, reason: str) -> None:
        actor.state = ActorState.DEAD
        actor.death_reason = reason
        key = actor.name_key
        if key is not None and self._names.get(key) == actor.actor_id:
            del self._names[key]
        calls = list(actor.inflight.values()) + list(actor.pending)
        actor.inflight.clear()
        actor.pending.clear()
        for call in calls:
            self._fail_dead(call, actor, actor.actor_id, reason)
        self._objects.release_uses(actor.deps)
        actor.deps = []
        self._ledger.free(actor.payload)

    def kill(self, actor_id: str, no_restart: bool) -> None:
        actor = self.actors.get(actor_id)
        if actor is None or actor.state is ActorState.DEAD:
            return
        child = actor.child
        if no_restart or actor.restarts_left == 0:
            self._dead(actor, "was killed with miniray.kill()")
        if child is not None and not child.dead:
            child.popen.kill()

    def on_exit_actor(self, child: Child, call_id: str) -> None:
        """A method of the actor called exit_actor(): it is dead for good (no restart)."""
        actor = child.actor
        if actor is None or actor.child is not child or actor.state is ActorState.DEAD:
            return
        call = actor.inflight.get(call_id)
        method = call.method if call is not None else "a method"
        self._dead(actor, f"exited: {method}() called exit_actor()")

    def process_exited(self, child: Child, reason: str) -> None:
        """The process of ``child.actor`` ended: restart the actor (``max_restarts``) or end it."""
        actor = child.actor
        if actor is None or actor.child is not child or actor.state is ActorState.DEAD:
            return
        if child.popen.returncode == 0:  # sys.exit(0) in a method: an intended exit, as in Ray
            self._dead(actor, f"exited (pid {child.popen.pid}): a method called sys.exit()")
            return
        text = f"died unexpectedly (pid {child.popen.pid}, {reason})"
        if actor.restarts_left == 0:
            self._dead(actor, text)
            return
        if actor.restarts_left > 0:
            actor.restarts_left -= 1
        actor.state = ActorState.RESTARTING
        # In-flight calls either run again on the new process or fail as Ray's do.
        retry = []
        for call in actor.inflight.values():
            if call.retries_left != 0 and not call.cancelled:
                call.retries_left -= 1
                call.options["max_task_retries"] = call.retries_left
                if call.stream is not None:  # the next attempt skips the values the caller has
                    call.options["streamed"] = len(call.stream.ids)
                retry.append(call)
            else:
                self._fail_dead(
                    call,
                    actor,
                    actor.actor_id,
                    f"{text} while running this call; it is restarting",
                    unavailable=True,
                )
        actor.inflight.clear()
        actor.pending.extendleft(reversed(retry))
        self._start(actor)

    # -- names --------------------------------------------------------------------------------
    def _name_key(self, name: str | None, namespace: str | None) -> tuple[str, str] | None:
        return None if name is None else (namespace or self._namespace, name)

    def lookup(self, name: str, namespace: str | None) -> tuple[str, str, dict]:
        key = self._name_key(name, namespace)
        assert key is not None
        actor_id = self._names.get(key)
        if actor_id is None:
            names = sorted(n for ns, n in self._names if ns == key[0])
            raise ValueError(
                f"Failed to look up actor with name {name!r} in namespace {key[0]!r}: no live "
                f"actor has that name there (named actors in it: {names})"
            )
        actor = self.actors[actor_id]
        return actor.actor_id, actor.class_name, actor.methods

    def segments_in_use(self) -> set[str | None]:
        in_use: set[str | None] = set()
        for actor in self.actors.values():
            in_use.add(actor.payload.segment)
            in_use |= {c.payload.segment for c in (*actor.pending, *actor.inflight.values())}
        return in_use
