"""The local backend's head, living in the driver: the facade over its rooms, and the lock.

    driver threads --(lock)--> LocalBackend --> objects.py    object table: counts, freeing
          ^                         |       --> ledger.py     segment reuse
          | Condition.notify_all    |       --> scheduler.py  tasks: queue, dispatch, retries
          |                         |       --> actors.py     actors: states, queues, restarts
          |                         |       --> child_requests.py  a child's get/wait
          |                         +-------> processes.py    children, router thread --send-->
          +-- router thread: handle(child, message) under the lock <--recv-- child processes

One lock guards every table. Driver threads submit and send while holding it; the router thread
(processes.py) receives from all children and calls ``handle`` here, which turns each message
kind (protocol.py) into a call on the room that owns it, then wakes waiters. Children always
drain their socket on a dedicated receiver thread, so a send under the lock cannot block forever.

Lifetimes: an object is freed (its shared-memory segment unlinked) when no ObjectRef counts it,
no pending call needs it, and it was never pickled into another value (then it is pinned until
shutdown). A child whose socket reaches EOF is dead: it gets no more work, and once a reaper
thread has its exit status (reaper.py: nothing waits for a process under the lock) its running
task is retried or fails with ``WorkerCrashedError``; an actor restarts (``max_restarts``) or
fails its calls with ``ActorDiedError``. ``shutdown`` kills every child and sweeps the session's
segments.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from miniray.errors import GetTimeoutError, RaySystemError
from miniray.runtime import (
    execution,
    futures,
    runtime_context,
    segments,
    serialization,
    shm,
    streaming,
)
from miniray.runtime import options as opts
from miniray.runtime.execution import serialize_args
from miniray.runtime.local import protocol
from miniray.runtime.local.actors import Actors, Call
from miniray.runtime.local.child_requests import ChildRequests
from miniray.runtime.local.ledger import SegmentLedger
from miniray.runtime.local.objects import ObjectEntry, ObjectTable
from miniray.runtime.local.processes import Child, Processes
from miniray.runtime.local.protocol import Stored
from miniray.runtime.local.scheduler import Scheduler, Task
from miniray.runtime.local.values import raise_if_error, value_of
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ObjectRef,
    ObjectRefGenerator,
    RemoteFunction,
    new_id,
    returns_of,
)

START_TIMEOUT_S = 60.0
# Every session started in this process, so that a test suite can check none left anything.
SESSIONS: list[str] = []


class LocalBackend:
    name = "local"

    def __init__(
        self,
        num_workers: int,
        start_timeout_s: float = START_TIMEOUT_S,
        namespace: str | None = None,
    ):
        self.session_id = f"{os.getpid():x}{os.urandom(3).hex()}"
        SESSIONS.append(self.session_id)
        self.num_workers = num_workers
        # Named actors are found by (namespace, name); the driver's own namespace is an
        # anonymous one unless init() names it, and every child gets it (ENV_NAMESPACE).
        self.namespace = namespace or runtime_context.anonymous_namespace()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # Per thread: the refs pickled into the actor call being serialized (``pin``).
        self._lending = threading.local()
        self._processes = Processes(self.session_id, self.namespace, self._cond)
        # Segment reuse (see segments.py and ledger.py).
        self._ledger = SegmentLedger(self._processes.send_reclaim, self._processes.wake)
        self._objects = ObjectTable(lambda stored: self._ledger.free(stored[1]))
        rooms = (self._objects, self._ledger, self._processes, self._store_results)
        self._scheduler = Scheduler(num_workers, self.session_id, *rooms)
        self._actors = Actors(self.session_id, self.namespace, *rooms)
        self._requests = ChildRequests(
            self.session_id, self._objects, self._ledger, self._processes
        )
        segments.reset()
        segments.set_unmapped_hook(self._ledger.on_local_unmap)
        self._processes.start_router(self)
        with self._lock:
            for _ in range(num_workers):
                self._processes.spawn("worker")
        self._await_workers(start_timeout_s)
        with self._lock:
            self._processes.start_janitor()

    @property
    def _tasks(self) -> dict[str, Task]:
        """Tasks not finished yet (tests check that none is left)."""
        return self._scheduler.tasks

    def _await_workers(self, timeout_s: float) -> None:
        failure = self._processes.await_workers(self.num_workers, timeout_s)
        if failure is not None:
            self.shutdown()
            raise RaySystemError(
                f"miniray.init() failed: {failure} (python: {sys.executable}); "
                "see the worker's error output above"
            )

    # ======================================================================= the router's calls
    def handle(self, child: Child, message: protocol.ToHead) -> None:
        """One message from ``child``: a call on the room that owns its kind."""
        match message:
            case protocol.Result(call_id, stored):
                if child.kind == "worker":
                    self._scheduler.on_result(child, call_id, stored)
                else:
                    self._actors.on_result(child, call_id, stored)
            case protocol.Yield(call_id, stored_value):
                self._on_yield(child, call_id, stored_value)
            case protocol.Ready():
                child.ready = True
                if child.kind == "worker":
                    self._scheduler.worker_idle(child)
                elif child.actor is not None:
                    self._actors.send_create(child.actor)
            case protocol.Created(actor_id, failure):
                self._actors.on_created(child, actor_id, failure)
            case protocol.Retried(call_id):
                if child.actor is not None:
                    self._actors.on_retried(child, call_id)
                else:
                    self._scheduler.on_retried(child, call_id)
            case protocol.ActorExit(call_id):
                self._actors.on_exit_actor(child, call_id)
            case protocol.Submit():
                if message.fn_bytes is not None:
                    self._scheduler.functions[message.fn_id] = message.fn_bytes
                self._scheduler.submit(Task.submitted(message, child))
            case protocol.SubmitCall():
                call = Call.submitted(message)
                self._actors.submit(message.actor_id, call, owner=child.key)
            case protocol.NewActor():
                answer = self._actors.create_for_child(message)
                self._processes.send(child, protocol.Reply(message.request_id, answer))
            case protocol.Kill(request_id, actor_id, no_restart):
                self._actors.kill(actor_id, no_restart)
                self._processes.send(child, protocol.Reply(request_id, None))
            case protocol.GetActor():
                answer = self._actors.lookup_for_child(message)
                self._processes.send(child, protocol.Reply(message.request_id, answer))
            case protocol.CancelRef(oid, force, recursive):
                try:
                    self._cancel(oid, force, recursive)
                except ValueError:  # force=True on an actor call: ignored inside a task (docs)
                    pass
            case protocol.Put(oid, ser):
                self._objects.new(oid, "put()", owner=child.key)
                self._store(oid, (False, ser))
            case protocol.Get() | protocol.Wait():
                if self._requests.add(child, message):
                    self._scheduler.dispatch()  # it blocks: its slot may go to an extra worker
            case protocol.CancelRequest(request_id):
                self._requests.cancel(child, request_id)
            case protocol.Release(ids):
                self._objects.release_held(child.key, ids)
            case protocol.Unmapped(reports):
                self._ledger.on_unmapped(child.key, reports)
            case protocol.Hold(ids):
                self._objects.hold(child.key, ids)
            case protocol.Pin(ids):
                self._objects.pin(ids)
            case _:
                raise RaySystemError(f"unknown message {message!r} from pid {child.popen.pid}")

    def died(self, child: Child) -> None:
        """Its socket reached EOF: it gets no more work now, and its death is handled once its
        exit status is known (``_on_child_exited``), which may take up to ``EXIT_GRACE_S``."""
        self._retire(child)
        if child.dead and child.kind == "worker" and child.task is None:
            return  # dismissed (max_calls, an idle extra worker): reaped already
        child.dead = True
        self._processes.await_exit(child)

    def tick(self) -> list[Callable[[], None]]:
        """The router's every turn: queued work in, waiting requests answered; the callbacks
        of futures whose objects were stored (run outside the lock)."""
        for child, reason in self._processes.drain_exits():
            self._on_child_exited(child, reason)
        self._objects.drain_releases()
        self._ledger.drain_local_unmaps()
        self._requests.answer_ready()
        return self._objects.take_callbacks()

    def next_deadline_in(self) -> float | None:
        return self._requests.next_deadline_in()

    # ======================================================================= results
    def _store(self, oid: str, stored: Stored) -> None:
        entry = self._objects.store(oid, stored)
        if entry is None:  # nobody wants it any more (its segment is freed)
            return
        # A waiter that fails with this value as its error releases its use of it, which may
        # free the entry before we get to the maybe_free below (that one is then a no-op).
        self._scheduler.dep_stored(oid, stored)
        self._actors.dep_stored(oid)
        self._objects.maybe_free(oid, entry)

    def _store_results(
        self,
        return_ids: list[str],
        stored: list[Stored],
        stream: streaming.Stream | None,
        label: str,
    ) -> None:
        """A task or actor call ended: one stored value per return (a stream's error ends it)."""
        for oid, item in zip(return_ids, stored):
            self._store(oid, item)
        if stream is not None:
            if stored and stored[0][0]:  # an error: the stream's last value
                self._stream_value(stream, stored[0], label)
            stream.end()

    def _on_yield(self, child: Child, call_id: str, stored: Stored) -> None:
        """A streaming task or actor call running on ``child`` yielded a value: a new object,
        its ref handed to the caller's ObjectRefGenerator at once."""
        room = self._scheduler if child.kind == "worker" else self._actors
        stream = room.stream_of(child, call_id)
        if stream is None:
            self._ledger.free(stored[1])  # (cancelled with force=True, say)
        else:
            self._stream_value(stream[0], stored, stream[1])

    def _stream_value(self, stream: streaming.Stream, stored: Stored, label: str) -> None:
        oid = new_id("o")
        self._objects.new(oid, label, owner=None)  # the generator's reference
        self._store(oid, stored)
        stream.append(oid)

    # ======================================================================= objects
    def release(self, object_id: str) -> None:
        # Called from ObjectRef.__del__, possibly inside the garbage collector while this very
        # thread holds the lock: only queued, and for a value in shared memory the router woken
        # to count it (without a child's message it would not turn: a driver that put and
        # dropped 1 GB values in a loop kept every one of them, a new segment each, until
        # shutdown).
        if self._objects.queue_release(object_id):
            self._processes.wake()

    def pin(self, object_id: str) -> None:
        lent = getattr(self._lending, "ids", None)
        if lent is not None:  # an actor call's arguments: lent for the call (submit_actor_call)
            lent.append(object_id)
            return
        self._objects.pin([object_id])

    def put(self, value: Any) -> ObjectRef:
        with self._cond:  # a value dropped just before gives its segment back for this one
            self._objects.drain_releases()
        ser = serialization.serialize(value, session_id=self.session_id)
        oid = new_id("o")
        with self._cond:
            self._check_open()
            self._objects.new(oid, "put()", owner=None)
            self._store(oid, (False, ser))
        return ObjectRef(oid)

    def get(self, refs: list[ObjectRef], deadline: float | None) -> list[Any]:
        with self._cond:
            while True:
                self._check_open()
                self._objects.drain_releases()
                entries = self._objects.require(r.id for r in refs)
                failed = next((e for e in entries if e.stored is not None and e.stored[0]), None)
                if failed is not None or all(e.stored is not None for e in entries):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    waiting = [(r, e) for r, e in zip(refs, entries) if e.stored is None]
                    ref, entry = waiting[0]
                    raise GetTimeoutError(
                        f"get() timed out: {len(waiting)} of {len(refs)} object(s) not ready, "
                        f"e.g. {ref!r} from {entry.producer}"
                    )
                self._cond.wait(remaining)
            stored = [e.stored for e in entries]
        if failed is not None:
            assert failed.stored is not None
            raise_if_error(failed.stored)
        return [value_of(s) for s in stored]  # type: ignore[arg-type]

    def wait(
        self, refs: list[ObjectRef], num_returns: int, deadline: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        with self._cond:
            while True:
                self._check_open()
                entries = self._objects.require(r.id for r in refs)
                ready = [r for r, e in zip(refs, entries) if e.stored is not None]
                remaining = None if deadline is None else deadline - time.monotonic()
                if len(ready) >= num_returns or (remaining is not None and remaining <= 0):
                    break
                self._cond.wait(remaining)
        ready = ready[:num_returns]
        taken = set(ready)
        return ready, [r for r in refs if r not in taken]

    def future(self, ref: ObjectRef) -> Any:
        from concurrent.futures import Future  # lazily: it imports logging

        fut: Future = Future()
        oid = ref.id
        with self._lock:
            self._check_open()
            entry = self._objects.require([oid])[0]
            if entry.stored is None:
                # Called by the router once stored, with a use taken for it (take_callbacks).
                def complete() -> None:
                    futures.settle(fut, lambda: _decoded(entry), lambda: self._release_use(oid))

                self._objects.watch(oid, entry, complete)
                return fut
        futures.settle_now(fut, lambda: _decoded(entry))  # our caller's ref keeps it stored
        return fut

    def _release_use(self, oid: str) -> None:
        with self._lock:
            self._objects.release_uses([oid])

    # ======================================================================= tasks
    def submit_task(
        self, fn: RemoteFunction, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        opts.check_embedded(options, self.name)
        call_args, call_kwargs, deps = execution.encode_args(args, kwargs)
        payload = serialize_args(call_args, call_kwargs, fn.__qualname__, self.session_id)
        num_returns = options["num_returns"]
        streams = num_returns == "streaming"
        return_ids = [] if streams else [new_id("o") for _ in range(num_returns)]
        task = Task(
            new_id("t"),
            fn.function_id,
            fn.__qualname__,
            payload,
            deps,
            return_ids,
            opts.task_wire_options(options),
            None,
        )
        if streams:
            task.stream = streaming.Stream(self._cond, self._check_open, self.release)
        with self._cond:
            self._check_open()
            functions = self._scheduler.functions
            if fn.function_id not in functions:
                functions[fn.function_id] = execution.pickled_definition(
                    fn.function, "remote function", fn.__qualname__
                )
            self._scheduler.submit(task)
            self._cond.notify_all()
        if task.stream is not None:
            return ObjectRefGenerator(task.stream)
        refs = [ObjectRef(oid) for oid in return_ids]
        return returns_of(refs, num_returns) if refs else None

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        with self._cond:
            self._check_open()
            self._cancel(ref.id, force, recursive)
            self._cond.notify_all()

    def _cancel(self, oid: str, force: bool, recursive: bool) -> None:
        """Cancel the task or actor call producing ``oid`` (a finished one: no-op)."""
        task = self._scheduler.producing(oid)
        if task is not None:
            self._scheduler.cancel(task, force, recursive)
        else:
            self._actors.cancel_producing(oid, force)

    # ======================================================================= actors
    def create_actor(
        self, cls: ActorClass, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> ActorHandle:
        opts.check_embedded(options, self.name)
        init_args, init_kwargs, deps = execution.encode_args(args, kwargs)
        payload = serialize_args(init_args, init_kwargs, cls.__name__, self.session_id)
        class_bytes = execution.pickled_definition(cls.cls, "actor", cls.__name__)
        with self._cond:
            self._check_open()
            return self._actors.create(
                cls.__name__, cls.methods, class_bytes, payload, deps, options
            )

    def submit_actor_call(
        self, handle: ActorHandle, method: str, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        with self._lock:
            self._actors.check_pending_limit(handle.actor_id)
        call_args, call_kwargs, deps = execution.encode_args(args, kwargs)
        label = f"{handle.class_name}.{method}"
        # Refs inside the arguments (``f.remote([ref])``) are lent, not pinned for the whole
        # session: the call keeps their objects alive until it ends, and the actor's process
        # holds each ref it unpickles (WorkerClient.borrowed_ref) for as long as it keeps it.
        # Pinned, a model's weights handed over in a list stayed in shared memory until
        # shutdown: one more copy per weight sync (rl.param_sync's refs=[weights]).
        lent: list[str] = []
        self._lending.ids = lent
        try:
            payload = serialize_args(call_args, call_kwargs, label, self.session_id)
        finally:
            self._lending.ids = None
        num_returns = options["num_returns"]
        streams = num_returns == "streaming"
        call = Call(
            new_id("m"),
            method,
            payload,
            deps,
            [] if streams else [new_id("o") for _ in range(num_returns)],
            opts.call_wire_options(options),
            lent=lent,
        )
        if streams:
            call.stream = streaming.Stream(self._cond, self._check_open, self.release)
        with self._cond:
            self._check_open()
            self._actors.submit(handle.actor_id, call, owner=None)
        if call.stream is not None:
            return ObjectRefGenerator(call.stream)
        refs = [ObjectRef(oid) for oid in call.return_ids]
        return returns_of(refs, num_returns) if refs else None

    def kill(self, handle: ActorHandle, no_restart: bool) -> None:
        with self._cond:
            self._actors.kill(handle.actor_id, no_restart)
            self._cond.notify_all()

    def get_actor(self, name: str, namespace: str | None) -> ActorHandle:
        with self._lock:
            self._check_open()
            actor_id, class_name, methods = self._actors.lookup(name, namespace)
        return ActorHandle(actor_id, class_name, methods)

    def runtime_context(self) -> runtime_context.RuntimeContext:
        return runtime_context.RuntimeContext(
            self.name, self.session_id, runtime_context.node_id_of(self.session_id), self.namespace
        )

    def exit_actor(self) -> None:
        runtime_context.exit_actor_here()  # the driver hosts no actor: a TypeError

    # ======================================================================= deaths
    def _on_child_exited(self, child: Child, reason: str) -> None:
        self._requests.forget(child)
        self._objects.forget_holder(child.key)
        # A dead child maps nothing; segments it created and nobody uses can go.
        self._ledger.forget_child(child.key)
        in_use = self._objects.segments_in_use()
        in_use |= self._scheduler.segments_in_use() | self._actors.segments_in_use()
        self._ledger.sweep_created_by(child.popen.pid, self.session_id, in_use)
        if child.kind == "worker":
            self._scheduler.worker_exited(child, reason)
        elif child.actor is not None:
            self._actors.process_exited(child, reason)

    def _retire(self, child: Child) -> None:
        self._processes.retire(child)
        self._scheduler.forget(child)

    # ======================================================================= shutdown
    def _check_open(self) -> None:
        self._processes.check_open()

    def shutdown(self) -> None:
        with self._cond:
            children = self._processes.begin_shutdown()
            if children is None:
                return
            self._cond.notify_all()
        self._processes.finish_shutdown(children)
        with self._lock:
            self._scheduler.clear()
            # A future still waiting fails now, as get() does, rather than never completing.
            waiting = self._objects.clear()
        for complete in waiting:
            complete()
        segments.reset()  # close our kept writer mappings before the files go
        shm.unlink_session(self.session_id)
        self._processes.stop_janitor()

    def child_pids(self) -> list[int]:
        """Process ids of every live child (for tests and benchmarks)."""
        with self._lock:
            return [c.popen.pid for c in self._processes.children.values() if not c.dead]

    def actor_pid(self, handle: ActorHandle) -> int | None:
        with self._lock:
            actor = self._actors.actors.get(handle.actor_id)
            if actor is None or actor.child is None:
                return None
            return actor.child.popen.pid


def _decoded(entry: ObjectEntry) -> Any:
    if entry.stored is None:  # only when shutdown() completes the futures still waiting
        raise RaySystemError(
            f"the runtime was shut down before the result of {entry.producer} was ready"
        )
    raise_if_error(entry.stored)
    return value_of(entry.stored)
