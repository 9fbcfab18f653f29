"""The local backend's head, living in the driver: objects, scheduling, processes.

    driver threads --(lock)--> head tables --send--> child processes (workers, actors)
          ^                        ^                        |
          | Condition.notify_all   | router thread: recv <--+  results, nested calls, EOF
          +------------------------+

One lock guards every table. Driver threads submit and send while holding it; the router thread
receives from all children, updates the tables and wakes waiters. Children always drain their
socket on a dedicated receiver thread, so a send under the lock cannot block forever.

Lifetimes: an object is freed (its shared-memory segment unlinked) when no ObjectRef counts it,
no pending call needs it, and it was never pickled into another value (then it is pinned until
shutdown). A child whose socket reaches EOF is dead: it gets no more work, and once a reaper
thread has its exit status (reaper.py: nothing waits for a process under the lock) its running
task is retried or fails with ``WorkerCrashedError``; an actor restarts (``max_restarts``) or
fails its calls with ``ActorDiedError``. ``shutdown`` kills every child and sweeps the session's
segments.
"""

from __future__ import annotations

import itertools
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from miniray.errors import (
    ActorAlreadyExistsError,
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    PendingCallsLimitExceeded,
    RaySystemError,
    TaskCancelledError,
    WorkerCrashedError,
)
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
from miniray.runtime.local import lifeline, protocol, reaper
from miniray.runtime.local.protocol import Stored
from miniray.runtime.local.values import raise_if_error, stored_error, value_of
from miniray.runtime.local.worker import ENV_NAMESPACE, ENV_SESSION, ENV_SYS_PATH
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
# -S: no site import (the worker gets the driver's sys.path, .pth entries included);
# -c rather than -m: runpy costs a few ms more at every start.
WORKER_COMMAND = (
    "-S",
    "-c",
    "import os, sys; sys.path[:] = os.environ['MINIRAY_SYS_PATH'].split(os.pathsep); "
    "from miniray.runtime.local.worker import main; main()",
)
EXIT_GRACE_S = 1.0
# Extra task workers may be started while others block in get(); this caps them.
MAX_EXTRA_WORKERS = 32


class _Object:
    __slots__ = ("holders", "local_refs", "pinned", "producer", "stored", "uses", "watchers")

    def __init__(self, producer: str, local_refs: int = 0):
        self.stored: Stored | None = None
        self.producer = producer
        self.local_refs = local_refs
        self.holders: dict[int, int] = {}  # child key -> refs held there
        self.pinned = False
        self.uses = 0  # pending calls that take it as an argument
        self.watchers: list[Callable[[], None]] = []


class _Child:
    """One child process and its channel."""

    def __init__(self, key: int, kind: str, popen: subprocess.Popen, conn: protocol.Channel):
        self.key = key
        self.kind = kind  # "worker" or "actor"
        self.popen = popen
        self.conn = conn
        self.ready = False
        self.dead = False
        self.task: _Task | None = None  # running task (workers)
        self.actor: _Actor | None = None
        self.blocked = 0  # requests it waits on (a blocked worker frees its slot)
        self.known_functions: set[str] = set()
        self.calls: dict[str, int] = {}  # function id -> tasks run (for max_calls)
        self.extra = False


class _Task:
    def __init__(self, task_id, fn_id, name, payload, deps, return_ids, options, owner):
        self.task_id: str = task_id
        self.fn_id: str = fn_id
        self.name: str = name
        self.payload: serialization.Serialized = payload
        self.deps: list[str] = deps
        self.return_ids: list[str] = return_ids
        self.options: dict[str, Any] = options
        self.retries_left: int = options["max_retries"]
        self.missing = 0
        self.owner = owner
        self.parent: str | None = None  # the task that submitted it (for recursive cancel)
        self.cancelled = False
        self.done = False
        self.stream: streaming.Stream | None = None  # a streaming generator task's


class _Call:
    def __init__(self, call_id, method, payload, deps, return_ids, options):
        self.call_id: str = call_id
        self.method: str = method
        self.payload: serialization.Serialized = payload
        self.deps: list[str] = deps
        self.return_ids: list[str] = return_ids
        self.options: dict[str, Any] = options
        retries = options.get("max_task_retries")
        self.retries_left: int = 0 if retries is None else retries
        self.stream: streaming.Stream | None = None  # a generator method's (no return_ids)
        self.cancelled = False


class _Actor:
    def __init__(self, actor_id, class_name, methods, class_bytes, payload, deps, options):
        self.actor_id: str = actor_id
        self.class_name: str = class_name
        self.methods: dict = methods
        self.class_bytes: bytes = class_bytes
        self.payload: serialization.Serialized = payload
        self.deps: list[str] = deps
        self.options: dict[str, Any] = options
        self.restarts_left: int = options["max_restarts"]
        # As in Ray: a sync actor runs one caller's calls in submission order, a threaded or
        # async one runs a call as soon as its arguments are ready (see _pump).
        self.out_of_order = options["max_concurrency"] > 1 or any(
            m.get("is_async") for m in methods.values()
        )
        self.state = "starting"  # starting -> alive -> (restarting -> alive)* -> dead
        self.child: _Child | None = None
        self.pending: deque[_Call] = deque()
        self.inflight: dict[str, _Call] = {}
        self.death_reason = ""
        self.name_key: tuple[str, str] | None = None  # (namespace, name) of a named actor

    def handle(self) -> ActorHandle:
        return ActorHandle(self.actor_id, self.class_name, self.methods)


class _WorkerRequest:
    """A get or wait from a child, answered when its objects are ready (or time is up)."""

    def __init__(self, child, request_id, kind, ids, num_returns=0, deadline=None):
        self.child: _Child = child
        self.request_id: int = request_id
        self.kind: str = kind
        self.ids: list[str] = ids
        self.num_returns: int = num_returns
        self.deadline: float | None = deadline


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
        self._objects: dict[str, _Object] = {}
        self._tasks: dict[str, _Task] = {}
        self._waiting_tasks: dict[str, list[_Task]] = {}  # object id -> tasks waiting on it
        self._ready_tasks: deque[_Task] = deque()
        self._children: dict[int, _Child] = {}
        self._idle: list[_Child] = []
        self._actors: dict[str, _Actor] = {}
        self._names: dict[tuple[str, str], str] = {}  # (namespace, name) -> actor id
        self._functions: dict[str, bytes] = {}
        self._requests: dict[tuple[int, int], _WorkerRequest] = {}
        self._releases: deque[str] = deque()
        self._watched: set[str] = set()
        self._keys = itertools.count(1)
        self._closing = False
        self._start_failure = ""
        self._router_error = ""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # Only the router thread touches the selector; others queue new children here.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._unregistered: deque[_Child] = deque()
        # Children are waited for on reaper threads, never under the lock (see reaper.py); a
        # dead child's exit status comes back here and the router handles the death.
        self._reaper = reaper.Reaper()
        self._exits: deque[tuple[_Child, int]] = deque()
        # object id -> actors whose next step (create or the head-of-line call) waits on it
        self._actors_waiting: dict[str, list[_Actor]] = {}
        # Segment reuse (see segments.py): deliveries not yet reported unmapped, per child;
        # freed segments still mapped somewhere; unmaps reported by this process's GC.
        self._seg_out: dict[str, dict[int, int]] = {}
        self._seg_orphans: set[str] = set()
        self._local_unmaps: deque[str] = deque()
        segments.reset()
        segments.set_unmapped_hook(self._on_local_unmap)
        self._janitor: lifeline.Janitor | None = None
        self._router = threading.Thread(
            target=self._route_forever, name="miniray-router", daemon=True
        )
        self._router.start()
        with self._lock:
            for _ in range(num_workers):
                self._spawn("worker")
        self._await_workers(start_timeout_s)
        # Sweeps this session's segments if the driver dies without shutdown (see lifeline.py).
        # Started once the workers are up: its interpreter's start (15 ms of CPU) slowed theirs
        # on 2 cores, and until init returns no segment exists for it to sweep (a driver dying
        # before then takes its workers along by their parent-death signal).
        with self._lock:
            self._janitor = lifeline.Janitor(shm.directory(), shm.session_prefix(self.session_id))
            for child in self._children.values():
                self._janitor.watch(child.popen.pid)

    # ======================================================================= processes
    def _spawn(self, kind: str) -> _Child:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env[ENV_SESSION] = self.session_id
        env[ENV_NAMESPACE] = self.namespace
        env[ENV_SYS_PATH] = os.pathsep.join(sys.path)  # (json would cost the child 20 ms)
        env["PYTHONUNBUFFERED"] = "1"
        # The child asks the kernel to kill it when we die (a child stuck in a C call holding
        # the GIL cannot notice by itself); lifeline.spawn forks it from a thread that lives
        # as long as this process, because that signal follows the forking thread.
        popen = lifeline.spawn(
            [sys.executable, *WORKER_COMMAND, str(child_sock.fileno())],
            pass_fds=[child_sock.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the driver only; it shuts us down
        )
        child_sock.close()
        if self._janitor is not None:  # else it is told of every child when it starts
            self._janitor.watch(popen.pid)
        conn = protocol.Channel(parent_sock.detach())
        child = _Child(next(self._keys), kind, popen, conn)
        self._children[child.key] = child
        self._unregistered.append(child)
        self._wake()
        return child

    def _await_workers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._start_failure:
                    break
                ready = [c for c in self._children.values() if c.kind == "worker" and c.ready]
                if len(ready) >= self.num_workers:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        failure = self._start_failure or f"workers did not start within {timeout_s:.0f}s"
        self.shutdown()
        raise RaySystemError(
            f"miniray.init() failed: {failure} (python: {sys.executable}); "
            "see the worker's error output above"
        )

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _send(self, child: _Child, message: tuple) -> bool:
        """Send under the lock; a dead child is handled by the router (EOF)."""
        try:
            protocol.send(child.conn, message)
            return True
        except (OSError, ValueError):
            return False

    # ======================================================================= router
    def _route_forever(self) -> None:
        try:
            self._route()
        except BaseException as exc:
            # A bug in the head: say so to every waiter now rather than let them time out.
            with self._cond:
                self._router_error = "".join(traceback.format_exception(exc))
                self._cond.notify_all()
            print(f"miniray: the router thread failed:\n{self._router_error}", file=sys.stderr)

    def _route(self) -> None:
        while not self._closing:
            while self._unregistered:
                child = self._unregistered.popleft()
                if not child.dead:
                    self._selector.register(child.conn, selectors.EVENT_READ, child)
            try:
                events = self._selector.select(self._next_deadline_in())
            except (OSError, ValueError):
                events = []
            with self._cond:
                if self._closing:
                    return
                for key, _ in events:
                    child = key.data
                    if child is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    elif child.key in self._children:
                        self._drain_child(child)
                self._drain_exits()
                self._drain_releases()
                self._drain_local_unmaps()
                self._expire_requests()
                callbacks = self._take_callbacks()
                self._cond.notify_all()
            for callback in callbacks:
                callback()

    def _drain_child(self, child: _Child) -> None:
        conn = child.conn
        # A message may retire this very child (max_calls, an extra worker going idle): stop then.
        while child.key in self._children:
            try:
                if not conn.poll():
                    return
                message = protocol.recv(conn)
            except (EOFError, OSError):
                self._on_child_died(child)
                return
            self._handle(child, message)

    def _handle(self, child: _Child, message: tuple) -> None:
        kind = message[0]
        if kind == "result":
            self._on_result(child, message[1], message[2])
        elif kind == "yield":
            self._on_yield(child, message[1], message[2])
        elif kind == "ready":
            self._on_ready(child)
        elif kind == "created":
            self._on_created(child, message[1], message[2])
        elif kind == "submit":
            _, task_id, fn_id, fn_bytes, name, payload, deps, return_ids, options = message
            if fn_bytes is not None:
                self._functions[fn_id] = fn_bytes
            task = _Task(task_id, fn_id, name, payload, deps, return_ids, options, child.key)
            task.parent = child.task.task_id if child.task is not None else None
            self._submit_task(task)
        elif kind == "submit_call":
            _, actor_id, call_id, method, payload, deps, return_ids, options = message
            call = _Call(call_id, method, payload, deps, return_ids, options)
            self._submit_call(actor_id, call, owner=child.key)
        elif kind == "put":
            _, oid, ser = message
            put_entry = _Object("put()")
            put_entry.holders[child.key] = 1
            self._objects[oid] = put_entry
            self._store(oid, (False, ser))
        elif kind in ("get", "wait"):
            request = self._make_request(child, message)
            if not self._try_answer(request):
                self._requests[(child.key, request.request_id)] = request
                child.blocked += 1
                self._dispatch()
        elif kind == "cancel_request":
            if self._requests.pop((child.key, message[1]), None) is not None:
                child.blocked -= 1
        elif kind == "release":
            for oid in message[1]:
                entry = self._objects.get(oid)
                if entry is not None and child.key in entry.holders:
                    entry.holders[child.key] -= 1
                    if entry.holders[child.key] <= 0:
                        del entry.holders[child.key]
                    self._maybe_free(oid, entry)
        elif kind == "unmapped":
            self._on_unmapped(child.key, message[1])
        elif kind == "pin":
            for oid in message[1]:
                entry = self._objects.get(oid)
                if entry is not None:
                    entry.pinned = True
        elif kind == "create_actor":
            _, rid, class_name, methods, class_bytes, payload, deps, options = message
            try:
                handle = self._create_actor(
                    class_name, methods, class_bytes, payload, deps, options
                )
                answer: tuple = ("ok", (handle.actor_id, handle.class_name, handle._methods))
            except Exception as exc:
                answer = ("error", exc)
            self._send(child, ("reply", rid, answer))
        elif kind == "kill":
            _, rid, actor_id, no_restart = message
            self._kill(actor_id, no_restart)
            self._send(child, ("reply", rid, None))
        elif kind == "get_actor":
            _, rid, name, namespace = message
            try:
                answer = ("ok", self._lookup_actor(name, namespace))
            except ValueError as exc:
                answer = ("error", exc)
            self._send(child, ("reply", rid, answer))
        elif kind == "cancel":
            try:
                self._cancel(message[1], message[2], message[3])
            except ValueError:  # force=True on an actor call: ignored inside a task (docs)
                pass
        elif kind == "retried":
            self._on_retried(child, message[1])
        elif kind == "actor_exit":
            self._on_actor_exit(child, message[1])
        else:
            raise RaySystemError(f"unknown message kind {kind!r} from pid {child.popen.pid}")

    # ======================================================================= objects
    def _new_object(self, oid: str, producer: str, *, owner: int | None) -> _Object:
        entry = _Object(producer, local_refs=1 if owner is None else 0)
        if owner is not None:
            entry.holders[owner] = 1
        self._objects[oid] = entry
        return entry

    def _store(self, oid: str, stored: Stored) -> None:
        entry = self._objects.get(oid)
        if entry is None:  # nobody wants it any more
            self._free_segment(stored[1])
            return
        entry.stored = stored
        # A waiter that fails with this value as its error releases its use of it, which may
        # free the entry before we get to the _maybe_free below (that one is then a no-op).
        for task in self._waiting_tasks.pop(oid, ()):
            self._dep_ready(task, oid, stored)
        for actor in self._actors_waiting.pop(oid, ()):
            if actor.state in ("starting", "restarting"):
                self._send_create(actor)
            else:
                self._pump(actor)
        self._maybe_free(oid, entry)

    def _release_uses(self, deps: list[str]) -> None:
        """A call that took these objects as arguments is over."""
        for oid in deps:
            entry = self._objects.get(oid)
            if entry is not None:
                entry.uses -= 1
                self._maybe_free(oid, entry)

    def _maybe_free(self, oid: str, entry: _Object) -> None:
        if (
            self._objects.get(oid) is not entry  # freed already, deeper in this same event
            or entry.stored is None
            or entry.local_refs > 0
            or entry.holders
            or entry.pinned
            or entry.uses > 0
            or entry.watchers
        ):
            return
        del self._objects[oid]
        self._free_segment(entry.stored[1])

    def _drain_releases(self) -> None:
        while self._releases:
            oid = self._releases.popleft()
            entry = self._objects.get(oid)
            if entry is not None:
                entry.local_refs -= 1
                self._maybe_free(oid, entry)

    def _take_callbacks(self) -> list[Callable[[], None]]:
        callbacks: list[Callable[[], None]] = []
        for oid in list(self._watched):
            entry = self._objects.get(oid)
            if entry is None or entry.stored is not None:
                self._watched.discard(oid)
            if entry is not None and entry.stored is not None:
                # Each watcher holds a use until its future has decoded the value (futures.py).
                entry.uses += len(entry.watchers)
                callbacks.extend(entry.watchers)
                entry.watchers = []
        return callbacks

    # ----------------------------------------------------------------- segment reuse
    def _deliver(self, child: _Child, *values: Any) -> None:
        """Count segments sent to ``child``: they stay unreusable until it reports them.

        ``values`` are Serialized, or stored (is_error, Serialized) pairs, or None, all sent in
        one message: pickle sends an object that appears twice in it once (one argument passed
        twice, one error for every ref of a get), so each is counted once, as the child will
        report it consumed."""
        seen: set[int] = set()
        for value in values:
            ser = value[1] if isinstance(value, tuple) else value
            if ser is not None and ser.segment is not None and id(ser) not in seen:
                seen.add(id(ser))
                out = self._seg_out.setdefault(ser.segment, {})
                out[child.key] = out.get(child.key, 0) + 1

    def _free_segment(self, ser: serialization.Serialized) -> None:
        """The value owning ``ser``'s segment is gone; reuse the segment once nobody maps it."""
        name = ser.segment
        if name is None:
            return
        ser.discard()
        if self._seg_out.get(name) or segments.local_maps(name):
            self._seg_orphans.add(name)
        else:
            self._reclaim(name)

    def _reclaim(self, name: str) -> None:
        self._seg_out.pop(name, None)
        self._seg_orphans.discard(name)
        creator = _creator_pid(name)
        if creator == os.getpid():
            segments.reclaim(name)
            return
        child = next((c for c in self._children.values() if c.popen.pid == creator), None)
        if child is None or child.dead or not self._send(child, ("reclaim", [name])):
            shm.unlink(name)

    def _on_unmapped(self, child_key: int, reports: list[tuple[str, int]]) -> None:
        for name, consumed in reports:
            out = self._seg_out.get(name)
            if out is not None and child_key in out:
                out[child_key] -= consumed
                if out[child_key] <= 0:
                    del out[child_key]
                if not out:
                    del self._seg_out[name]
            self._maybe_reclaim(name)

    def _maybe_reclaim(self, name: str) -> None:
        if name in self._seg_orphans and not self._seg_out.get(name):
            if not segments.local_maps(name):
                self._reclaim(name)

    def _on_local_unmap(self, name: str, consumed: int) -> None:
        # Runs in whichever thread dropped the last view (maybe inside the GC): only queue.
        self._local_unmaps.append(name)
        self._wake()

    def _drain_local_unmaps(self) -> None:
        while self._local_unmaps:
            self._maybe_reclaim(self._local_unmaps.popleft())

    def release(self, object_id: str) -> None:
        # Called from ObjectRef.__del__, possibly inside the garbage collector while this very
        # thread holds the lock: only queue it.
        self._releases.append(object_id)

    def pin(self, object_id: str) -> None:
        entry = self._objects.get(object_id)
        if entry is not None:
            entry.pinned = True

    def put(self, value: Any) -> ObjectRef:
        ser = serialization.serialize(value, session_id=self.session_id)
        oid = new_id("o")
        with self._cond:
            self._check_open()
            self._new_object(oid, "put()", owner=None)
            self._store(oid, (False, ser))
        return ObjectRef(oid)

    def _entries(self, refs: list[ObjectRef]) -> list[_Object]:
        entries = []
        for ref in refs:
            entry = self._objects.get(ref.id)
            if entry is None:
                raise ObjectLostError(
                    f"{ref!r} is not known to this runtime: it was freed, or it comes from an "
                    "earlier miniray.init() session"
                )
            entries.append(entry)
        return entries

    def get(self, refs: list[ObjectRef], deadline: float | None) -> list[Any]:
        with self._cond:
            while True:
                self._check_open()
                self._drain_releases()
                entries = self._entries(refs)
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
                entries = self._entries(refs)
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
            entry = self._entries([ref])[0]
            if entry.stored is None:
                # Called by the router once stored, with a use taken for it (_take_callbacks).
                def complete() -> None:
                    futures.settle(fut, lambda: _decoded(entry), lambda: self._release_use(oid))

                entry.watchers.append(complete)
                self._watched.add(oid)
                return fut
        futures.settle_now(fut, lambda: _decoded(entry))  # our caller's ref keeps it stored
        return fut

    def _release_use(self, oid: str) -> None:
        with self._lock:
            self._release_uses([oid])

    # ======================================================================= child requests
    def _make_request(self, child: _Child, message: tuple) -> _WorkerRequest:
        if message[0] == "get":
            return _WorkerRequest(child, message[1], "get", message[2])
        _, rid, ids, num_returns, timeout = message
        deadline = None if timeout is None else time.monotonic() + timeout
        return _WorkerRequest(child, rid, "wait", ids, num_returns, deadline)

    def _try_answer(self, request: _WorkerRequest, *, expired: bool = False) -> bool:
        entries = [self._objects.get(oid) for oid in request.ids]
        if request.kind == "get":
            missing = [oid for oid, e in zip(request.ids, entries) if e is None]
            if missing:
                lost = ObjectLostError(f"ObjectRef({missing[0]}) is not known to this runtime")
                error = stored_error(lost, self.session_id)
                self._send(request.child, ("reply", request.request_id, [error] * len(entries)))
                return True
            failed = [e for e in entries if e.stored is not None and e.stored[0]]  # type: ignore[union-attr]
            if not failed and any(e.stored is None for e in entries):  # type: ignore[union-attr]
                return False
            payload = [failed[0].stored] * len(entries) if failed else [e.stored for e in entries]  # type: ignore[union-attr]
            self._deliver(request.child, *payload)
            self._send(request.child, ("reply", request.request_id, payload))
            return True
        ready = [
            oid for oid, e in zip(request.ids, entries) if e is not None and e.stored is not None
        ]
        if len(ready) < request.num_returns and not expired:
            return False
        self._send(request.child, ("reply", request.request_id, ready))
        return True

    def _answer_requests(self) -> None:
        for key, request in list(self._requests.items()):
            if self._try_answer(request):
                del self._requests[key]
                request.child.blocked -= 1

    def _expire_requests(self) -> None:
        self._answer_requests()
        now = time.monotonic()
        for key, request in list(self._requests.items()):
            if request.deadline is not None and request.deadline <= now:
                self._try_answer(request, expired=True)
                del self._requests[key]
                request.child.blocked -= 1

    def _next_deadline_in(self) -> float | None:
        deadlines = [r.deadline for r in self._requests.values() if r.deadline is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

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
        task = _Task(
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
            if fn.function_id not in self._functions:
                self._functions[fn.function_id] = execution.pickled_definition(
                    fn.function, "remote function", fn.__qualname__
                )
            self._submit_task(task)
            self._cond.notify_all()
        if task.stream is not None:
            return ObjectRefGenerator(task.stream)
        refs = [ObjectRef(oid) for oid in return_ids]
        return returns_of(refs, num_returns) if refs else None

    def _submit_task(self, task: _Task) -> None:
        producer = f"task {task.name}()"
        for oid in task.return_ids:
            self._new_object(oid, producer, owner=task.owner)
        self._tasks[task.task_id] = task
        ready = self._take_deps(task.deps, task, self._waiting_tasks)
        # An argument that failed before this call was made fails it now, as _dep_ready does
        # for one that fails later; the worker must never get an error as an argument's value.
        failed = self._failed_dep(task.deps)
        if failed is None and self.num_workers == 0:
            failed = stored_error(execution.no_cpus_error(task.name), self.session_id)
        if failed is not None:
            self._finish_task(task, [failed] * max(1, len(task.return_ids)))
        elif ready:
            self._ready_tasks.append(task)
            self._dispatch()

    def _failed_dep(self, deps: list[str]) -> Stored | None:
        """The stored error of the first argument that failed, if any did."""
        for oid in deps:
            stored = self._objects[oid].stored
            if stored is not None and stored[0]:
                return stored
        return None

    def _take_deps(self, deps: list[str], waiter: Any, index: dict[str, list]) -> bool:
        """Count uses of the dependencies; True when all are ready already."""
        ready = True
        for oid in deps:
            entry = self._objects.get(oid)
            if entry is None:
                raise ObjectLostError(f"argument ObjectRef({oid}) is not known to this runtime")
            entry.uses += 1
            if entry.stored is None:
                ready = False
                if isinstance(waiter, _Task):
                    waiter.missing += 1
                    index.setdefault(oid, []).append(waiter)
        return ready

    def _dep_ready(self, task: _Task, oid: str, stored: Stored) -> None:
        if task.done:
            return
        if stored[0]:  # a failed argument fails the task with the same error
            self._finish_task(task, [stored] * max(1, len(task.return_ids)))
            return
        task.missing -= 1
        if task.missing == 0:
            self._ready_tasks.append(task)
            self._dispatch()

    def _dep_values(self, deps: list[str]) -> dict[str, Stored]:
        return {oid: self._objects[oid].stored for oid in deps}  # type: ignore[misc]

    def _dispatch(self) -> None:
        while self._ready_tasks and self._idle:
            task = self._ready_tasks.popleft()
            if task.done:
                continue
            child = self._idle.pop()
            fn_bytes = None
            if task.fn_id not in child.known_functions:
                fn_bytes = self._functions[task.fn_id]
                child.known_functions.add(task.fn_id)
            child.task = task
            self._deliver(child, task.payload, *(self._objects[o].stored for o in task.deps))
            self._send(
                child,
                (
                    "task",
                    task.task_id,
                    task.fn_id,
                    fn_bytes,
                    task.name,
                    task.payload,
                    self._dep_values(task.deps),
                    task.return_ids,
                    task.options,
                ),
            )
        if self._ready_tasks and not self._idle:
            workers = [c for c in self._children.values() if c.kind == "worker" and not c.dead]
            blocked = sum(1 for c in workers if c.blocked > 0 and c.task is not None)
            starting = sum(1 for c in workers if not c.ready)
            extra = len(workers) - self.num_workers
            # Tasks blocked in get() hold their worker; without more workers a tree of nested
            # tasks could wait on each other forever.
            if blocked > starting and extra < MAX_EXTRA_WORKERS:
                self._spawn("worker").extra = True

    def _finish_task(self, task: _Task, stored: list[Stored]) -> None:
        task.done = True
        self._tasks.pop(task.task_id, None)
        self._release_uses(task.deps)
        self._free_segment(task.payload)
        for oid, item in zip(task.return_ids, stored):
            self._store(oid, item)
        if task.stream is not None:
            self._end_stream(task.stream, stored, f"task {task.name}()")

    def _on_yield(self, child: _Child, call_id: str, stored: Stored) -> None:
        """A streaming task or actor call running on ``child`` yielded a value: a new object,
        its ref handed to the caller's ObjectRefGenerator at once."""
        stream, label = None, ""
        task = child.task
        if task is not None and task.task_id == call_id and not task.done:
            stream, label = task.stream, f"task {task.name}()"
        elif child.actor is not None and call_id in child.actor.inflight:
            call = child.actor.inflight[call_id]
            stream, label = call.stream, f"{child.actor.class_name}.{call.method}()"
        if stream is None:
            self._free_segment(stored[1])  # (cancelled with force=True, say)
            return
        self._stream_value(stream, stored, label)

    def _stream_value(self, stream: streaming.Stream, stored: Stored, label: str) -> None:
        oid = new_id("o")
        self._new_object(oid, label, owner=None)  # the generator's reference
        self._store(oid, stored)
        stream.append(oid)

    def _end_stream(self, stream: streaming.Stream, stored: list[Stored], label: str) -> None:
        if stored and stored[0][0]:  # an error: the stream's last value
            self._stream_value(stream, stored[0], label)
        stream.end()

    def _on_result(self, child: _Child, call_id: str, stored: list[Stored]) -> None:
        if child.kind == "worker":
            task = child.task
            child.task = None
            if task is not None and task.task_id == call_id:
                self._finish_task(task, stored)
                if self._used_up(child, task):
                    return
            self._worker_idle(child)
            return
        actor = child.actor
        if actor is None:
            return
        call = actor.inflight.pop(call_id, None)
        if call is not None:
            self._finish_call(call, stored)

    def _used_up(self, child: _Child, task: _Task) -> bool:
        """``max_calls``: a worker that ran a function that often is replaced (leaky code)."""
        max_calls = task.options.get("max_calls") or 0
        if max_calls <= 0:
            return False
        child.calls[task.fn_id] = child.calls.get(task.fn_id, 0) + 1
        if child.calls[task.fn_id] < max_calls:
            return False
        child.dead = True
        self._send(child, ("exit",))
        self._retire(child)
        self._reaper.reap(child.popen, EXIT_GRACE_S)
        if not self._closing:
            self._spawn("worker")
        return True

    def _worker_idle(self, child: _Child) -> None:
        workers = [c for c in self._children.values() if c.kind == "worker" and not c.dead]
        if child.extra and len(workers) > self.num_workers and not self._ready_tasks:
            child.dead = True
            self._send(child, ("exit",))
            self._retire(child)
            self._reaper.reap(child.popen, EXIT_GRACE_S)
            return
        self._idle.append(child)
        self._dispatch()

    def _on_ready(self, child: _Child) -> None:
        child.ready = True
        if child.kind == "worker":
            self._worker_idle(child)
        elif child.actor is not None:
            self._send_create(child.actor)

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        with self._cond:
            self._check_open()
            self._cancel(ref.id, force, recursive)
            self._cond.notify_all()

    def _cancel(self, oid: str, force: bool, recursive: bool) -> None:
        """Cancel the task producing ``oid`` (a finished one, or an actor call: no-op).

        Its dependents fail with the same error as its results (see ``_dep_ready``)."""
        task = next((t for t in self._tasks.values() if oid in t.return_ids), None)
        if task is not None:
            self._cancel_task(task, force, recursive)
            return
        for actor in self._actors.values():
            for call in (*actor.pending, *actor.inflight.values()):
                if oid in call.return_ids:
                    if force:
                        raise ValueError("force=True is not supported for actor tasks.")  # Ray's
                    self._cancel_call(actor, call)
                    return

    def _cancel_call(self, actor: _Actor, call: _Call) -> None:
        """As in Ray 2.60, a cancelled actor call's result is TaskCancelledError: one still
        queued here never runs; the actor's process decides for one sent to it (worker.py)."""
        if call in actor.pending:
            actor.pending.remove(call)
            error = TaskCancelledError(
                f"actor call {actor.class_name}.{call.method}() was cancelled"
            )
            self._finish_call(
                call, [stored_error(error, self.session_id)] * max(1, len(call.return_ids))
            )
        elif not call.cancelled and actor.child is not None:
            call.cancelled = True
            self._send(actor.child, ("cancel_call", call.call_id))

    def _cancel_task(self, task: _Task, force: bool, recursive: bool) -> None:
        if task.done:
            return
        # Its children first: the parent, blocked in get() on one, then fails as cancelled
        # rather than see a child's error (and no child outlives it running).
        if recursive:
            for child_task in [t for t in self._tasks.values() if t.parent == task.task_id]:
                self._cancel_task(child_task, force, recursive)
        running = next((c for c in self._children.values() if c.task is task), None)
        if running is None:
            error = stored_error(
                TaskCancelledError(f"task {task.name}() was cancelled"), self.session_id
            )
            self._finish_task(task, [error] * max(1, len(task.return_ids)))
        elif force:
            task.cancelled = True  # _task_lost stores TaskCancelledError, no retry
            running.popen.kill()
        elif not task.cancelled:
            # The worker raises KeyboardInterrupt in it; its result (TaskCancelledError, or a
            # value if user code caught the interrupt) comes back as any other.
            task.cancelled = True
            self._send(running, ("cancel", task.task_id))

    def _on_retried(self, child: _Child, call_id: str) -> None:
        """A child re-ran a call after a listed exception: one retry fewer if its process dies."""
        if child.actor is not None:
            call = child.actor.inflight.get(call_id)
            if call is not None and call.retries_left > 0:
                call.retries_left -= 1
        elif child.task is not None and child.task.task_id == call_id:
            if child.task.retries_left > 0:
                child.task.retries_left -= 1

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
            return self._create_actor(
                cls.__name__, cls.methods, class_bytes, payload, deps, options
            )

    def _create_actor(
        self, class_name, methods, class_bytes, payload, deps, options
    ) -> ActorHandle:
        # Check and register in one step under the lock: of concurrent get_if_exists=True
        # creations (threads, tasks) exactly one constructs, the others get its handle.
        key = self._name_key(options.get("name"), options.get("namespace"))
        if key is not None and key in self._names:
            if options.get("get_if_exists"):
                return self._actors[self._names[key]].handle()
            raise ActorAlreadyExistsError(
                f"an actor named {key[1]!r} already exists in namespace {key[0]!r}; pass "
                "get_if_exists=True to reuse it, or another name or namespace"
            )
        actor = _Actor(new_id("a"), class_name, methods, class_bytes, payload, deps, options)
        self._take_deps(deps, actor, {})
        self._actors[actor.actor_id] = actor
        if key is not None:
            actor.name_key = key
            self._names[key] = actor.actor_id
        self._start_actor(actor)
        return actor.handle()

    def _start_actor(self, actor: _Actor) -> None:
        child = self._spawn("actor")
        child.actor = actor
        actor.child = child

    def _send_create(self, actor: _Actor) -> None:
        """Ask a started actor process to run ``__init__`` once its arguments exist."""
        child = actor.child
        # A dead child (its exit status not known yet) gets nothing: the death restarts or ends
        # the actor.
        if (
            child is None
            or child.dead
            or not child.ready
            or actor.state not in ("starting", "restarting")
        ):
            return
        deps = [self._objects[oid].stored for oid in actor.deps]
        failed = self._failed_dep(actor.deps)
        payload: serialization.Serialized | None
        if failed is not None:
            # The actor's process gets the failed argument alone and reports it as its __init__
            # failing: unpickling a user's exception here, in the router thread, runs user code
            # under the lock (and one that does not unpickle would kill the router).
            payload, dep_values = None, {"failed": failed}  # the process reads nothing else
            self._deliver(child, failed)
        else:
            missing = next((oid for oid, s in zip(actor.deps, deps) if s is None), None)
            if missing is not None:
                self._actors_waiting.setdefault(missing, []).append(actor)
                return  # _store() calls us again when that argument arrives
            payload, dep_values = actor.payload, self._dep_values(actor.deps)
            self._deliver(child, actor.payload, *deps)
        self._send(
            child,
            (
                "create",
                actor.actor_id,
                actor.class_name,
                actor.class_bytes,
                payload,
                dep_values,
                {
                    "max_concurrency": actor.options["max_concurrency"],
                    "methods": actor.methods,  # for get_runtime_context().current_actor
                    "name": actor.options.get("name"),
                },
            ),
        )
        actor.state = "creating"

    def _on_created(self, child: _Child, actor_id: str, failure: str | None) -> None:
        """``failure``: why ``__init__`` failed, as text the actor's process made (the router
        never decodes a user's exception)."""
        actor = self._actors.get(actor_id)
        if actor is None or actor.child is not child:
            return
        if failure is not None:
            self._actor_dead(actor, failure)
            self._send(child, ("exit",))
            return
        actor.state = "alive"
        self._pump(actor)

    def submit_actor_call(
        self, handle: ActorHandle, method: str, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        with self._lock:
            self._check_pending_limit(handle)
        call_args, call_kwargs, deps = execution.encode_args(args, kwargs)
        label = f"{handle.class_name}.{method}"
        payload = serialize_args(call_args, call_kwargs, label, self.session_id)
        num_returns = options["num_returns"]
        streams = num_returns == "streaming"
        call = _Call(
            new_id("m"),
            method,
            payload,
            deps,
            [] if streams else [new_id("o") for _ in range(num_returns)],
            opts.call_wire_options(options),
        )
        if streams:
            call.stream = streaming.Stream(self._cond, self._check_open, self.release)
        with self._cond:
            self._check_open()
            self._submit_call(handle.actor_id, call, owner=None)
        if call.stream is not None:
            return ObjectRefGenerator(call.stream)
        refs = [ObjectRef(oid) for oid in call.return_ids]
        return returns_of(refs, num_returns) if refs else None

    def _check_pending_limit(self, handle: ActorHandle) -> None:
        actor = self._actors.get(handle.actor_id)
        if actor is None:
            return
        limit = actor.options.get("max_pending_calls", -1)
        waiting = len(actor.pending) + len(actor.inflight)
        if limit > 0 and waiting >= limit:
            raise PendingCallsLimitExceeded(
                f"actor {actor.class_name} already has {waiting} calls pending "
                f"(max_pending_calls={limit}); wait for some results before submitting more"
            )

    def _submit_call(self, actor_id: str, call: _Call, owner: int | None) -> None:
        actor = self._actors.get(actor_id)
        label = f"{actor.class_name if actor else 'actor'}.{call.method}()"
        for oid in call.return_ids:
            self._new_object(oid, label, owner=owner)
        if actor is None:
            self._fail_call_dead(call, None, actor_id, "is not known to this runtime")
            return
        if call.retries_left == 0 and call.options.get("max_task_retries") is None:
            call.retries_left = actor.options["max_task_retries"]
        # The actor's process retries listed exceptions itself: tell it the resolved budget.
        call.options["max_task_retries"] = call.retries_left
        self._take_deps(call.deps, call, {})
        if actor.state == "dead":
            self._fail_call_dead(call, actor, actor_id, actor.death_reason)
            return
        actor.pending.append(call)
        self._pump(actor)

    def _pump(self, actor: _Actor) -> None:
        """Send queued calls whose arguments are ready: in submission order, stopping at the
        first that waits (a sync actor), or each as soon as it can go (``out_of_order``)."""
        # A call sent to a dead child whose exit status is not known yet would fail as in
        # flight; queued, it goes to the restarted process or fails as the actor's death says.
        if actor.state != "alive" or actor.child is None or actor.child.dead:
            return
        held: list[_Call] = []  # out-of-order calls still waiting, in submission order
        while actor.pending:
            call = actor.pending.popleft()
            deps = [self._objects[oid].stored for oid in call.deps]
            failed = self._failed_dep(call.deps)
            if failed is not None:
                self._finish_call(call, [failed] * max(1, len(call.return_ids)))
                continue
            missing = next((oid for oid, s in zip(call.deps, deps) if s is None), None)
            if missing is not None:
                waiting = self._actors_waiting.setdefault(missing, [])
                if actor not in waiting:
                    waiting.append(actor)
                if not actor.out_of_order:
                    actor.pending.appendleft(call)
                    break
                held.append(call)
                continue
            actor.inflight[call.call_id] = call
            self._deliver(actor.child, call.payload, *deps)
            self._send(
                actor.child,
                (
                    "call",
                    call.call_id,
                    call.method,
                    call.payload,
                    self._dep_values(call.deps),
                    call.return_ids,
                    call.options,
                ),
            )
        if held:
            actor.pending.extendleft(reversed(held))

    def _finish_call(self, call: _Call, stored: list[Stored]) -> None:
        self._release_uses(call.deps)
        self._free_segment(call.payload)
        for oid, item in zip(call.return_ids, stored):
            self._store(oid, item)
        if call.stream is not None:
            self._end_stream(call.stream, stored, f"actor call {call.method}()")

    def _fail_call_dead(
        self, call: _Call, actor: _Actor | None, actor_id: str, reason: str, *, unavailable=False
    ) -> None:
        name = actor.class_name if actor else "actor"
        cls = ActorUnavailableError if unavailable else ActorDiedError
        error = cls(f"The actor {name} ({actor_id}) {reason}", actor_id=actor_id)
        stored = stored_error(error, self.session_id)
        self._finish_call(call, [stored] * max(1, len(call.return_ids)))

    def _actor_dead(self, actor: _Actor, reason: str) -> None:
        actor.state = "dead"
        actor.death_reason = reason
        key = actor.name_key
        if key is not None and self._names.get(key) == actor.actor_id:
            del self._names[key]
        calls = list(actor.inflight.values()) + list(actor.pending)
        actor.inflight.clear()
        actor.pending.clear()
        for call in calls:
            self._fail_call_dead(call, actor, actor.actor_id, reason)
        self._release_uses(actor.deps)
        actor.deps = []
        self._free_segment(actor.payload)

    def kill(self, handle: ActorHandle, no_restart: bool) -> None:
        with self._cond:
            self._kill(handle.actor_id, no_restart)
            self._cond.notify_all()

    def _kill(self, actor_id: str, no_restart: bool) -> None:
        actor = self._actors.get(actor_id)
        if actor is None or actor.state == "dead":
            return
        child = actor.child
        if no_restart or actor.restarts_left == 0:
            self._actor_dead(actor, "was killed with miniray.kill()")
        if child is not None and not child.dead:
            child.popen.kill()

    def _on_actor_exit(self, child: _Child, call_id: str) -> None:
        """A method of the actor called exit_actor(): it is dead for good (no restart)."""
        actor = child.actor
        if actor is None or actor.child is not child or actor.state == "dead":
            return
        call = actor.inflight.get(call_id)
        method = call.method if call is not None else "a method"
        self._actor_dead(actor, f"exited: {method}() called exit_actor()")

    def get_actor(self, name: str, namespace: str | None) -> ActorHandle:
        with self._lock:
            self._check_open()
            actor_id, class_name, methods = self._lookup_actor(name, namespace)
        return ActorHandle(actor_id, class_name, methods)

    def _name_key(self, name: str | None, namespace: str | None) -> tuple[str, str] | None:
        return None if name is None else (namespace or self.namespace, name)

    def _lookup_actor(self, name: str, namespace: str | None) -> tuple[str, str, dict]:
        key = self._name_key(name, namespace)
        assert key is not None
        actor_id = self._names.get(key)
        if actor_id is None:
            names = sorted(n for ns, n in self._names if ns == key[0])
            raise ValueError(
                f"Failed to look up actor with name {name!r} in namespace {key[0]!r}: no live "
                f"actor has that name there (named actors in it: {names})"
            )
        actor = self._actors[actor_id]
        return actor.actor_id, actor.class_name, actor.methods

    def runtime_context(self) -> runtime_context.RuntimeContext:
        return runtime_context.RuntimeContext(
            self.name, self.session_id, runtime_context.node_id_of(self.session_id), self.namespace
        )

    def exit_actor(self) -> None:
        runtime_context.exit_actor_here()  # the driver hosts no actor: a TypeError

    # ======================================================================= deaths
    def _on_child_died(self, child: _Child) -> None:
        """Its socket reached EOF: it gets no more work now, and its death is handled once its
        exit status is known (``_on_child_exited``), which may take up to ``EXIT_GRACE_S``."""
        if child.dead and child.kind == "worker" and child.task is None:
            self._retire(child)
            return
        child.dead = True
        self._retire(child)

        def exited(code: int) -> None:  # on a reaper thread
            self._exits.append((child, code))
            self._wake()

        self._reaper.reap(child.popen, EXIT_GRACE_S, exited)

    def _drain_exits(self) -> None:
        while self._exits:
            child, code = self._exits.popleft()
            self._on_child_exited(child, _exit_reason(code))

    def _on_child_exited(self, child: _Child, reason: str) -> None:
        self._requests = {k: r for k, r in self._requests.items() if r.child is not child}
        for entry in list(self._objects.values()):
            entry.holders.pop(child.key, None)
        self._forget_child_segments(child)
        if child.kind == "worker":
            if child in self._idle:
                self._idle.remove(child)
            task = child.task
            child.task = None
            if task is not None and not task.done:
                self._task_lost(task, child, reason)
            workers = [c for c in self._children.values() if c.kind == "worker" and not c.dead]
            if not child.ready:
                # It died before saying hello: a broken environment, not a crash to heal.
                self._start_failure = f"a worker process (pid {child.popen.pid}) {reason}"
            elif len(workers) < self.num_workers and not self._closing:
                self._spawn("worker")
            self._dispatch()
        elif child.actor is not None:
            self._actor_lost(child.actor, child, reason)

    def _forget_child_segments(self, child: _Child) -> None:
        """A dead child maps nothing; segments it created and nobody uses can go."""
        for name in list(self._seg_out):
            out = self._seg_out[name]
            out.pop(child.key, None)
            if not out:
                del self._seg_out[name]
                self._maybe_reclaim(name)
        in_use = {e.stored[1].segment for e in self._objects.values() if e.stored is not None}
        in_use |= {t.payload.segment for t in self._tasks.values()}
        for actor in self._actors.values():
            in_use.add(actor.payload.segment)
            in_use |= {c.payload.segment for c in (*actor.pending, *actor.inflight.values())}
        in_use |= self._seg_orphans
        for name in shm.list_session(self.session_id):
            if _creator_pid(name) == child.popen.pid and name not in in_use:
                shm.unlink(name)

    def _task_lost(self, task: _Task, child: _Child, reason: str) -> None:
        error: Exception
        if task.cancelled:
            error = TaskCancelledError(f"task {task.name}() was cancelled (force=True)")
        elif task.retries_left != 0:
            task.retries_left -= 1
            # The next attempt may retry exceptions only with what is left of the same budget.
            task.options = {**task.options, "max_retries": task.retries_left}
            if task.stream is not None:  # the next attempt skips the values the caller has
                task.options["streamed"] = len(task.stream.ids)
            self._ready_tasks.appendleft(task)
            return
        else:
            error = WorkerCrashedError(
                f"The worker process (pid {child.popen.pid}) running task {task.name}() died: "
                f"{reason}. No retries left (max_retries={task.options['max_retries']})."
            )
        stored = stored_error(error, self.session_id)
        self._finish_task(task, [stored] * max(1, len(task.return_ids)))

    def _actor_lost(self, actor: _Actor, child: _Child, reason: str) -> None:
        if actor.child is not child or actor.state == "dead":
            return
        if child.popen.returncode == 0:  # sys.exit(0) in a method: an intended exit, as in Ray
            self._actor_dead(actor, f"exited (pid {child.popen.pid}): a method called sys.exit()")
            return
        text = f"died unexpectedly (pid {child.popen.pid}, {reason})"
        if actor.restarts_left == 0:
            self._actor_dead(actor, text)
            return
        if actor.restarts_left > 0:
            actor.restarts_left -= 1
        actor.state = "restarting"
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
                self._fail_call_dead(
                    call,
                    actor,
                    actor.actor_id,
                    f"{text} while running this call; it is restarting",
                    unavailable=True,
                )
        actor.inflight.clear()
        actor.pending.extendleft(reversed(retry))
        self._start_actor(actor)

    def _retire(self, child: _Child) -> None:
        """Out of the tables, its channel closed; the caller has the reaper wait for it."""
        self._children.pop(child.key, None)
        try:
            self._selector.unregister(child.conn)
        except (KeyError, ValueError, OSError):
            pass
        if child in self._idle:
            self._idle.remove(child)
        try:
            child.conn.close()
        except OSError:
            pass

    # ======================================================================= shutdown
    def _check_open(self) -> None:
        if self._router_error:
            raise RaySystemError(
                "the local runtime is broken: its router thread failed (a miniray bug, please "
                f"report it); call miniray.shutdown(). Cause:\n{self._router_error}"
            )
        if self._closing:
            raise RaySystemError("the miniray runtime was shut down")

    def shutdown(self) -> None:
        with self._cond:
            if self._closing and not self._children:
                return
            self._closing = True
            children = list(self._children.values())
            for child in children:
                self._send(child, ("exit",))
            self._cond.notify_all()
        self._wake()
        if self._router is not threading.current_thread():
            self._router.join(timeout=5)
        deadline = time.monotonic() + EXIT_GRACE_S
        for child in children:
            try:
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.send_signal(signal.SIGKILL)
                child.popen.wait()
            try:
                child.conn.close()
            except OSError:
                pass
        self._reaper.join()  # children that died or retired earlier: none outlives shutdown
        with self._lock:
            self._children.clear()
            self._idle.clear()
            # A future still waiting fails now, as get() does, rather than never completing.
            waiting = [w for entry in self._objects.values() for w in entry.watchers]
            self._objects.clear()
        for complete in waiting:
            complete()
        self._wake_r.close()
        self._wake_w.close()
        segments.reset()  # close our kept writer mappings before the files go
        shm.unlink_session(self.session_id)
        if self._janitor is not None:  # None: init failed before starting it
            self._janitor.stop()

    def child_pids(self) -> list[int]:
        """Process ids of every live child (for tests and benchmarks)."""
        with self._lock:
            return [c.popen.pid for c in self._children.values() if not c.dead]

    def actor_pid(self, handle: ActorHandle) -> int | None:
        with self._lock:
            actor = self._actors.get(handle.actor_id)
            if actor is None or actor.child is None:
                return None
            return actor.child.popen.pid


def _decoded(entry: _Object) -> Any:
    if entry.stored is None:  # only when shutdown() completes the futures still waiting
        raise RaySystemError(
            f"the runtime was shut down before the result of {entry.producer} was ready"
        )
    raise_if_error(entry.stored)
    return value_of(entry.stored)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _creator_pid(segment: str) -> int:
    """Segment names are miniray_<session>_<pid>_<n> (see shm.new_name)."""
    try:
        return int(segment.split("_")[2])
    except (IndexError, ValueError):
        return -1
