"""The inline backend: the whole runtime in this one process, on threads.

For debugging (breakpoints and prints work, one process to profile) and fast unit tests; Ray
removed its local_mode and users miss it. Semantics match the local backend: every value is
copied through the serializer (mutating a result never changes the stored object), calls to one
actor run in submission order on that actor's own thread, async actors interleave on their own
event loop, and ``get``/``wait`` honour their deadlines. What it cannot do: isolate crashes
(a call that kills the process kills everything) or run Python in parallel past the GIL.

    caller thread --submit--> per-task thread | actor thread / actor event loop
         |                                 |
         +--get(deadline)-- waits on --> _Entry.done (threading.Event), set when stored

The parts, one module each: the object table (``inline_objects``), streaming generators
(``inline_streams``), tasks and their cancellation (``inline_tasks``), actors and their calls
(``inline_actors``); ``InlineBackend`` here holds their shared state and shuts them down.
"""

from __future__ import annotations

import threading
import time
import weakref

from miniray.errors import RaySystemError
from miniray.runtime import runtime_context, streaming
from miniray.runtime.inline_actors import InlineActors, _Actor
from miniray.runtime.inline_objects import _Entry
from miniray.runtime.inline_tasks import InlineTasks
from miniray.runtime.refs import ObjectRef, new_id

SHUTDOWN_JOIN_S = 5.0


class InlineBackend(InlineTasks, InlineActors):
    name = "inline"

    def __init__(self, runs_tasks: bool = True, namespace: str | None = None) -> None:
        self._runs_tasks = runs_tasks  # False: init(num_cpus=0), a driver-only session
        # Functions and classes whose pickled size was checked (nothing here ships them, but
        # one that Ray and the local backend refuse as too large is refused here too).
        self._sized: set[str] = set()
        self._awaited: dict[int, _Entry] = {}  # entries that futures wait on
        self.session_id = new_id("j")
        # Named actors are found by (namespace, name); see runtime_context.
        self.namespace = namespace or runtime_context.anonymous_namespace()
        self._lock = threading.Lock()
        self._objects: dict[str, _Entry] = {}
        self._actors: dict[str, _Actor] = {}
        self._names: dict[tuple[str, str], str] = {}  # (namespace, name) -> actor id
        self._current = threading.local()  # .task: the task this thread runs
        self._pinned: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._streams: weakref.WeakSet[streaming.Stream] = weakref.WeakSet()

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        entry = self._objects.get(ref.id)
        if entry is not None and entry.call is not None:
            if force:
                raise ValueError("force=True is not supported for actor tasks.")  # Ray's words
            self._cancel_call(entry.call)
            return
        task = entry.task if entry is not None else None
        if task is not None:  # not a task's result (put): nothing to cancel
            self._cancel_task(task, recursive)

    def runtime_context(self) -> runtime_context.RuntimeContext:
        return runtime_context.RuntimeContext(
            self.name, self.session_id, runtime_context.node_id_of(self.session_id), self.namespace
        )

    def exit_actor(self) -> None:
        runtime_context.exit_actor_here()

    def shutdown(self) -> None:
        self._closed = True
        pools = []
        for actor in self._actors.values():
            actor.dead_reason = "the runtime was shut down"
            if actor.loop is not None:
                actor.loop.call_soon_threadsafe(actor.loop.stop)
            if actor.pool is not None:
                actor.pool.shutdown(wait=False, cancel_futures=True)
                pools.append(actor.pool)
            if actor.fifo is not None:
                actor.fifo.put(None)
        # Wait (bounded) for our threads: a daemon thread still inside a torch op when the
        # interpreter exits aborts the process ("terminate called without an active exception").
        deadline = time.monotonic() + SHUTDOWN_JOIN_S
        for thread in [*self._threads, *(t for p in pools for t in p._threads)]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._actors.clear()
        with self._lock:
            entries = {id(e): e for e in self._objects.values()} | dict(self._awaited)
            waiting = [entry for entry in entries.values() if not entry.done.is_set()]
            self._objects.clear()
        # A future or get still waiting fails now, as on the local backend, rather than never
        # returning (a task still running past the join would store into a forgotten entry).
        for entry in waiting:
            self._store(
                entry, error=RaySystemError("the runtime was shut down before it was ready")
            )
        for stream in list(self._streams):  # a waiting next() sees the shutdown (_check_open)
            with stream.cond:
                stream.cond.notify_all()
