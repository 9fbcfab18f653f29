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

``cancel`` stores ``TaskCancelledError`` for a task still waiting for its arguments; a running
one gets a ``KeyboardInterrupt`` raised asynchronously in its thread (PyThreadState_SetAsyncExc),
which Python checks between bytecodes: a thread inside a C call (``time.sleep``, a blocking
``get``) sees it when the call returns. A thread cannot be killed, so ``force=True`` does the same.
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from miniray.errors import (
    ActorAlreadyExistsError,
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    PendingCallsLimitExceeded,
    RayActorError,
    RaySystemError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)
from miniray.runtime import execution, futures, runtime_context, serialization, streaming
from miniray.runtime import options as opts
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ObjectRef,
    ObjectRefGenerator,
    RemoteFunction,
    new_id,
    returns_of,
)
from miniray.runtime.runtime_context import ActorExit, ActorIdentity

SHUTDOWN_JOIN_S = 5.0


class _Entry:
    __slots__ = ("call", "callbacks", "done", "error", "task", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: serialization.Serialized | None = None
        self.error: BaseException | None = None
        self.callbacks: list[Callable[[], None]] = []
        self.task: _Task | None = None  # the task that produces it (for cancel)
        self.call: _Call | None = None  # or the actor call


class _Task:
    """What ``cancel`` needs of a task: its state, its thread and the tasks it submitted.

    queued (waiting for arguments) -> running -> finishing, or queued -> cancelled. State
    changes happen under the backend's lock."""

    __slots__ = ("children", "interrupted", "name", "outs", "state", "stream", "thread_id")

    def __init__(self, name: str, outs: list[_Entry], stream: streaming.Stream | None = None):
        self.name = name
        self.outs = outs
        self.stream = stream  # a streaming generator task's (then outs is empty)
        self.state = "queued"
        self.thread_id = 0
        self.interrupted = False  # a KeyboardInterrupt was raised in its thread
        self.children: list[_Task] = []

    def cancelled_error(self) -> TaskCancelledError:
        return TaskCancelledError(f"task {self.name}() was cancelled")


class _Call:
    """What ``cancel`` needs of an actor call: queued -> running -> done, or queued -> done
    (cancelled). State changes happen under the backend's lock."""

    __slots__ = ("cancelled", "finish", "state", "task")

    def __init__(self, finish: Callable[..., None]):
        self.state = "queued"
        self.cancelled = False
        self.finish = finish  # stores the call's results (or its error)
        self.task: asyncio.Task | None = None  # an async actor's call


class _Actor:
    def __init__(self, actor_id: str, cls: ActorClass, options: dict[str, Any]):
        self.actor_id = actor_id
        self.cls = cls
        self.options = options
        self.instance: Any = None
        self.dead_reason: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.semaphore: asyncio.Semaphore | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.fifo: queue.SimpleQueue | None = None
        self.restarts_left = options["max_restarts"]
        self.outstanding = 0  # calls submitted and not finished (for max_pending_calls)
        self.init_payload: tuple[Any, dict[str, _Entry]] = (None, {})  # args of __init__
        # A threaded actor's pool could start a method before __init__ ends: methods wait.
        self.constructed = threading.Event()
        self.name_key: tuple[str, str] | None = None  # (namespace, name) of a named actor
        self.identity = ActorIdentity(actor_id, cls.__name__, cls.methods, options["name"])


class InlineBackend:
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

    # -- objects ---------------------------------------------------------------------------
    def _new_entry(self) -> tuple[str, _Entry]:
        oid = new_id("o")
        entry = _Entry()
        with self._lock:
            self._objects[oid] = entry
        return oid, entry

    def _store(self, entry: _Entry, value: Any = None, error: BaseException | None = None) -> None:
        if error is None:
            try:
                entry.value = serialization.serialize(value, session_id=None)
            except Exception as exc:
                error = TypeError(f"could not serialize the result: {exc}")
        entry.error = error
        entry.done.set()
        for callback in entry.callbacks:
            callback()

    def _entry(self, ref: ObjectRef) -> _Entry:
        entry = self._objects.get(ref.id)
        if entry is None:
            raise ValueError(f"{ref!r} is unknown to this runtime (was it created before init?)")
        return entry

    def _value(self, entry: _Entry) -> Any:
        if entry.error is not None:
            raise _reraisable(entry.error)
        assert entry.value is not None
        return serialization.deserialize(entry.value)

    def put(self, value: Any) -> ObjectRef:
        oid, entry = self._new_entry()
        self._store(entry, value)
        return ObjectRef(oid)

    def get(self, refs: list[ObjectRef], deadline: float | None) -> list[Any]:
        entries = [self._entry(r) for r in refs]
        for ref, entry in zip(refs, entries):
            if entry.error is not None:
                break
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not entry.done.wait(remaining):
                raise GetTimeoutError(f"get() timed out waiting for {ref!r}")
            if entry.error is not None:
                break
        return [self._value(e) for e in entries]

    def wait(
        self, refs: list[ObjectRef], num_returns: int, deadline: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        changed = threading.Event()
        entries = [self._entry(r) for r in refs]
        for entry in entries:
            entry.callbacks.append(changed.set)
        while True:
            ready = [r for r, e in zip(refs, entries) if e.done.is_set()]
            if len(ready) >= num_returns:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            changed.wait(remaining)
            changed.clear()
        ready = ready[:num_returns]
        taken = set(ready)
        return ready, [r for r in refs if r not in taken]

    def future(self, ref: ObjectRef) -> Future:
        entry = self._entry(ref)
        fut: Future = Future()
        once = threading.Lock()

        def complete() -> None:
            # Runs in the thread that stored the value (a task's or an actor's): only queue, so
            # a done-callback that blocks cannot stall that actor (see futures.py).
            if once.acquire(blocking=False):
                self._awaited.pop(id(entry), None)
                futures.settle(fut, lambda: self._value(entry))

        # Kept for shutdown to fail: the ref, and so its _objects entry, may be gone already.
        self._awaited[id(entry)] = entry
        entry.callbacks.append(complete)
        if entry.done.is_set():  # stored before (or while) we appended: _store may miss us
            complete()
        return fut

    def release(self, object_id: str) -> None:
        # The one counted ref of this object is gone; calls that need it hold the entry itself.
        if object_id not in self._pinned:
            self._objects.pop(object_id, None)

    def pin(self, object_id: str) -> None:
        self._pinned.add(object_id)

    # -- tasks -----------------------------------------------------------------------------
    def _dep_entries(self, deps: list[str]) -> dict[str, _Entry]:
        with self._lock:
            missing = [oid for oid in deps if oid not in self._objects]
            if missing:
                raise ValueError(f"ObjectRef({missing[0]}) is unknown to this runtime")
            return {oid: self._objects[oid] for oid in deps}

    def _resolve(self, entries: dict[str, _Entry]) -> dict[str, Any]:
        values = {}
        for oid, entry in entries.items():
            entry.done.wait()
            values[oid] = self._value(entry)
        return values

    def _failed_dep(self, entries: dict[str, _Entry]) -> BaseException | None:
        """Wait for the arguments; the error of the first that failed, passed on as it is (as
        on the local backend: a cancelled argument cancels its consumers)."""
        for entry in entries.values():
            entry.done.wait()
            if entry.error is not None:
                return entry.error
        return None

    def submit_task(
        self, fn: RemoteFunction, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        opts.check_embedded(options, self.name)
        if fn.function_id not in self._sized:
            execution.pickled_definition(fn.function, "remote function", fn.__qualname__)
            self._sized.add(fn.function_id)
        call_args, call_kwargs, dep_ids = execution.encode_args(args, kwargs)
        deps = self._dep_entries(dep_ids)
        payload = execution.serialize_args(call_args, call_kwargs, fn.__qualname__, None)
        num_returns = options["num_returns"]
        stream = self._new_stream() if num_returns == "streaming" else None
        outs = [] if stream is not None else [self._new_entry() for _ in range(num_returns)]
        name = fn.__qualname__
        task = _Task(name, [entry for _, entry in outs], stream)
        for entry in task.outs:
            entry.task = task
        parent = getattr(self._current, "task", None)
        if parent is not None:
            parent.children.append(task)

        if not self._runs_tasks:
            self._fail_task(task, execution.no_cpus_error(name))
            return self._task_returns(task, outs, num_returns)
        task_id = new_id("t")
        streamed = [0]  # values of a streaming task the caller has (a retry skips them)

        def attempts() -> list[Any] | BaseException:
            attempts_left = options["max_retries"]
            while True:
                try:
                    a, k = serialization.deserialize(payload)
                    a, k = execution.decode_args(a, k, self._resolve(deps))
                    if stream is not None:
                        self._stream_values(stream, name, fn.function(*a, **k), streamed)
                        return []
                    return execution.split_returns(fn.function(*a, **k), num_returns, name)
                except BaseException as exc:
                    # sys.exit() would end a worker process (local, Ray): a crash, not an error.
                    exited = isinstance(exc, SystemExit)
                    if task.interrupted:  # cancelled: never retried, as in Ray
                        if isinstance(exc, KeyboardInterrupt) or exited:
                            return task.cancelled_error()
                        return execution.task_error(name, exc)
                    left = execution.retries_after(
                        exc, attempts_left, options["retry_exceptions"], crashed=exited
                    )
                    if left is None:
                        if exited:
                            return _exited_task_error(name, exc, options["max_retries"])
                        return execution.task_error(name, exc)
                    attempts_left = left

        def run() -> None:
            runtime_context.set_executing(task_id, None)
            self._current.task = task
            failed = self._failed_dep(deps)
            with self._lock:
                if task.state != "queued":
                    return  # cancelled while it waited; cancel stored the error
                task.state = "running" if failed is None else "finishing"
                task.thread_id = threading.get_ident()
            outcome = failed if failed is not None else self._interruptible(task, attempts)
            if isinstance(outcome, BaseException):
                self._fail_task(task, outcome)
                return
            for entry, value in zip(task.outs, outcome):
                self._store(entry, value)
            if stream is not None:
                self._end_stream(stream, None)

        self._start_thread(run, f"miniray-task-{name}")
        return self._task_returns(task, outs, num_returns)

    def _task_returns(self, task: _Task, outs: list[tuple[str, _Entry]], num_returns: Any) -> Any:
        if task.stream is not None:
            return ObjectRefGenerator(task.stream)
        return returns_of([ObjectRef(oid) for oid, _ in outs], num_returns) if outs else None

    def _fail_task(self, task: _Task, error: BaseException) -> None:
        """Store ``error`` in every result of the task; a stream gets it as its last value."""
        for entry in task.outs:
            self._store(entry, error=error)
        if task.stream is not None:
            self._end_stream(task.stream, error)

    # -- streaming generators (tasks and actor methods) --------------------------------------
    def _new_stream(self) -> streaming.Stream:
        stream = streaming.Stream(threading.Condition(), self._check_open, self.release)
        self._streams.add(stream)
        return stream

    def _check_open(self) -> None:
        if self._closed:
            raise RaySystemError("the runtime was shut down before the generator task ended")

    def _stream_values(
        self,
        stream: streaming.Stream,
        name: str,
        values: Any,
        streamed: list[int],
        call: _Call | None = None,
    ) -> None:
        """Store each value the generator yields and hand its ref to the stream at once."""
        if not hasattr(values, "__next__"):
            raise streaming.not_a_generator_error(name, values)
        for index, value in streaming.replay(values, streamed[0]):
            if call is not None and call.cancelled:  # a cancelled actor call stops, as in Ray
                values.close()
                raise TaskCancelledError(f"actor call {name}() was cancelled")
            self._stream_value(stream, value)
            streamed[0] = index + 1

    async def _stream_async_values(
        self, stream: streaming.Stream, values: Any, streamed: list[int]
    ) -> None:
        """``_stream_values`` for an async generator method, on its actor's event loop."""
        async for index, value in streaming.areplay(values, streamed[0]):
            self._stream_value(stream, value)
            streamed[0] = index + 1

    def _stream_value(self, stream: streaming.Stream, value: Any) -> None:
        oid, entry = self._new_entry()
        self._store(entry, value)
        with stream.cond:
            stream.append(oid)

    def _end_stream(self, stream: streaming.Stream, error: BaseException | None) -> None:
        """The generator ended; its error, if any, is the stream's last value."""
        if error is not None:
            oid, entry = self._new_entry()
            self._store(entry, error=error)
            with stream.cond:
                stream.append(oid)
        with stream.cond:
            stream.end()

    def _interruptible(
        self, task: _Task, body: Callable[[], list[Any] | BaseException]
    ) -> list[Any] | BaseException:
        """Run ``body`` where a cancel may interrupt it; no interrupt escapes this frame.

        A cancel raises at most one KeyboardInterrupt, between any two bytecodes: inside
        ``body`` it makes the task cancelled; after ``body`` the result stands. Once the state
        is "finishing" (set under the lock that cancel takes) no new one comes, and a pending
        one is withdrawn."""
        try:
            outcome = body()
        except KeyboardInterrupt:
            outcome = task.cancelled_error()
        while True:
            try:
                with self._lock:
                    task.state = "finishing"
                    if task.interrupted:
                        _set_async_exc(task.thread_id, None)
                return outcome
            except KeyboardInterrupt:
                continue

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

    def _cancel_call(self, call: _Call) -> None:
        """As in Ray 2.60 its result is TaskCancelledError: a queued call never runs, an async
        one's coroutine is cancelled, a generator stops at its next yield; running sync code
        runs on (not interrupted, as in Ray) and its result is dropped."""
        with self._lock:
            if call.state == "done":
                return
            call.cancelled = True
            queued = call.state == "queued"
            if queued:
                call.state = "done"
        if queued:
            call.finish()
        elif call.task is not None:
            loop = call.task.get_loop()
            loop.call_soon_threadsafe(call.task.cancel)

    def _cancel_task(self, task: _Task, recursive: bool) -> None:
        if task.state in ("finishing", "cancelled"):
            return  # finished (or finishing) tasks are left alone, as in Ray
        if recursive:
            for child in list(task.children):
                self._cancel_task(child, recursive)
        with self._lock:
            state = task.state
            if state == "queued":
                task.state = "cancelled"
            elif state == "running" and not task.interrupted:
                task.interrupted = True
                _set_async_exc(task.thread_id, KeyboardInterrupt)
        if state == "queued":
            self._fail_task(task, task.cancelled_error())

    # -- actors ----------------------------------------------------------------------------
    def create_actor(
        self, cls: ActorClass, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> ActorHandle:
        opts.check_embedded(options, self.name)
        if cls.class_id not in self._sized:
            execution.pickled_definition(cls.cls, "actor", cls.__name__)
            self._sized.add(cls.class_id)
        key = self._name_key(options["name"], options["namespace"])
        # Check and register in one step: of concurrent get_if_exists=True creations exactly
        # one constructs, the others get its handle.
        with self._lock:
            if key is not None and key in self._names:
                existing = self._actors[self._names[key]]
                if options["get_if_exists"]:
                    return ActorHandle(
                        existing.actor_id, existing.cls.__name__, existing.cls.methods
                    )
                raise ActorAlreadyExistsError(
                    f"an actor named {key[1]!r} already exists in namespace {key[0]!r}; pass "
                    "get_if_exists=True to reuse it, or another name or namespace"
                )
            actor = _Actor(new_id("a"), cls, options)
            self._actors[actor.actor_id] = actor
            if key is not None:
                actor.name_key = key
                self._names[key] = actor.actor_id
        init_args, init_kwargs, dep_ids = execution.encode_args(args, kwargs)
        deps = self._dep_entries(dep_ids)
        payload = execution.serialize_args(init_args, init_kwargs, cls.__name__, None)
        actor.init_payload = (payload, deps)
        if cls.is_async:
            ready = threading.Event()
            self._start_thread(lambda: self._run_loop(actor, ready), f"miniray-{cls.__name__}")
            ready.wait()
        elif options["max_concurrency"] > 1:
            actor.pool = ThreadPoolExecutor(options["max_concurrency"])
        else:
            actor.fifo = queue.SimpleQueue()
            self._start_thread(lambda: self._run_fifo(actor), f"miniray-{cls.__name__}")
        self._enqueue(actor, lambda: self._construct(actor), 1, is_init=True)
        return ActorHandle(actor.actor_id, cls.__name__, cls.methods)

    def _construct(self, actor: _Actor) -> None:
        runtime_context.set_executing(new_id("t"), actor.identity)  # the creation task
        try:
            payload, deps = actor.init_payload
            a, k = serialization.deserialize(payload)
            a, k = execution.decode_args(a, k, self._resolve(deps))
            actor.instance = actor.cls.cls(*a, **k)
        except BaseException as exc:
            err = execution.task_error(f"{actor.cls.__name__}.__init__", exc)
            actor.dead_reason = f"its __init__ raised:\n{err}"
            raise
        finally:
            actor.constructed.set()

    def _run_loop(self, actor: _Actor, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        actor.loop = loop
        asyncio.set_event_loop(loop)

        async def make_semaphore() -> None:
            actor.semaphore = asyncio.Semaphore(actor.options["max_concurrency"])

        loop.run_until_complete(make_semaphore())
        ready.set()
        loop.run_forever()

    def _run_fifo(self, actor: _Actor) -> None:
        assert actor.fifo is not None
        while True:
            job = actor.fifo.get()
            if job is None:
                return
            job()

    def _enqueue(
        self,
        actor: _Actor,
        call: Callable[[], Any],
        num_returns: int | str,
        *,
        is_init: bool = False,
        retries: int = 0,
        retry_exceptions: Any = False,
        deps: dict[str, _Entry] | None = None,
    ) -> Any:
        # A streaming call (a generator method) has no results of its own: its values go to
        # the stream as they are yielded, and its error (or death) is the stream's last value.
        stream = self._new_stream() if num_returns == "streaming" else None
        outs = [] if stream is not None else [self._new_entry() for _ in range(int(num_returns))]
        streamed = [0]  # values the caller has (a retry skips them)
        name = getattr(call, "__name__", "actor method")
        actor.outstanding += 1

        def finish(value: Any = None, error: BaseException | None = None) -> None:
            actor.outstanding -= 1
            with self._lock:
                record.state = "done"
            if record.cancelled:
                error = TaskCancelledError(f"actor call {name}() was cancelled")
            if stream is not None:
                return self._end_stream(stream, error)
            assert isinstance(num_returns, int)
            if error is None:
                try:
                    values = execution.split_returns(value, num_returns, "actor method")
                except ValueError as exc:
                    error = execution.task_error("actor method", exc)
            if error is not None:
                for _, entry in outs:
                    self._store(entry, error=error)
                return
            for (_, entry), v in zip(outs, values):
                self._store(entry, v)

        record = _Call(finish)

        def after_failure(exc: BaseException, attempts_left: int) -> int | None:
            """What a failed attempt leads to, for the sync and the async runner alike: the
            retries left for the next attempt, or None once finish() has stored the error."""
            if isinstance(exc, ActorExit):  # before SystemExit, which it is: exit_actor() is final
                self._exited(actor, call)
                finish(error=self._died(actor))
                return None
            if record.cancelled:  # never retried; finish() says cancelled
                finish(error=exc)
                return None
            if actor.dead_reason is not None and actor.instance is None:  # __init__ failed
                finish(error=self._died(actor))
                return None
            left: int | None
            if isinstance(exc, SystemExit) and not is_init:
                error: BaseException = self._actor_exited(actor, exc)
                # Restarted (not dead): the call may run again on the new instance.
                restarted = isinstance(error, ActorUnavailableError)
                left = execution.retries_after(exc, attempts_left, False, crashed=restarted)
            else:
                error = execution.task_error(name, exc)
                left = execution.retries_after(exc, attempts_left, retry_exceptions)
            if left is None:
                finish(error=error)
            return left

        def started() -> bool:
            with self._lock:
                if record.state != "queued":
                    return False  # cancelled while queued: finished already
                record.state = "running"
                return True

        def run_sync() -> None:
            if not is_init:
                actor.constructed.wait()
            if not started():
                return
            attempts_left = retries
            while True:
                if actor.dead_reason is not None:
                    return finish(error=self._died(actor))
                try:
                    value = call()
                    if stream is not None:  # the call holds the actor until its generator ends
                        self._stream_values(stream, name, value, streamed, record)
                        value = None
                except BaseException as exc:
                    left = after_failure(exc, attempts_left)
                    if left is None:
                        return
                    attempts_left = left
                    continue
                return finish(value)

        if actor.loop is not None:
            loop = actor.loop

            async def run_async() -> None:
                try:
                    await run_async_attempts()
                except asyncio.CancelledError:  # cancelled while waiting to start
                    with self._lock:
                        waited = record.state == "queued"
                        record.state = "done"
                    if waited:
                        finish()

            async def run_async_attempts() -> None:
                assert actor.semaphore is not None
                if deps:  # as in Ray, a call whose arguments are ready does not wait behind it
                    await _all_stored(loop, deps.values())
                async with actor.semaphore:
                    if not started():
                        return
                    attempts_left = retries
                    while True:
                        if actor.dead_reason is not None:
                            return finish(error=self._died(actor))
                        try:
                            value = call()
                            if stream is not None and hasattr(value, "__anext__"):
                                await self._stream_async_values(stream, value, streamed)
                                value = None
                            elif stream is not None:
                                self._stream_values(stream, name, value, streamed, record)
                                value = None
                            elif asyncio.iscoroutine(value):
                                value = await value
                        except BaseException as exc:
                            left = after_failure(exc, attempts_left)
                            if left is None:
                                return
                            attempts_left = left
                            continue
                        return finish(value)

            def start() -> None:
                record.task = loop.create_task(run_async())

            loop.call_soon_threadsafe(start)
        elif actor.pool is not None:
            actor.pool.submit(run_sync)
        else:
            assert actor.fifo is not None
            actor.fifo.put(run_sync)
        for _, entry in outs:
            entry.call = record
        if stream is not None:
            return ObjectRefGenerator(stream)
        refs = [ObjectRef(oid) for oid, _ in outs]
        return returns_of(refs, int(num_returns)) if refs else None

    def _actor_exited(self, actor: _Actor, exc: SystemExit) -> RayActorError:
        """``sys.exit()`` in a method: the actor's process would end. Code 0 is an intended
        exit (dead for good); another code is a crash, restarted here, on the actor's own
        thread, so that calls queued behind it run on the new instance (as on local)."""
        code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
        if code and actor.restarts_left != 0:
            if actor.restarts_left > 0:
                actor.restarts_left -= 1
            try:
                self._construct(actor)
            except BaseException:
                return self._died(actor)  # _construct recorded why
            return ActorUnavailableError(
                f"The actor {actor.cls.__name__} ({actor.actor_id}) exited with code {code} "
                "while running this call; it was restarted",
                actor_id=actor.actor_id,
            )
        actor.dead_reason = (
            "a method called sys.exit()" if not code else f"a method exited with code {code}"
        )
        self._forget_name(actor)
        return self._died(actor)

    def _died(self, actor: _Actor) -> ActorDiedError:
        return ActorDiedError(
            f"The actor {actor.cls.__name__} ({actor.actor_id}) is dead: {actor.dead_reason}",
            actor_id=actor.actor_id,
        )

    def submit_actor_call(
        self, handle: ActorHandle, method: str, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        actor = self._actors.get(handle.actor_id)
        if actor is None:
            raise ValueError(f"{handle!r} is unknown to this runtime")
        limit = actor.options.get("max_pending_calls", -1)
        if limit > 0 and actor.outstanding >= limit:
            raise PendingCallsLimitExceeded(
                f"actor {actor.cls.__name__} already has {actor.outstanding} calls pending "
                f"(max_pending_calls={limit}); wait for some results before submitting more"
            )
        call_args, call_kwargs, dep_ids = execution.encode_args(args, kwargs)
        deps = self._dep_entries(dep_ids)
        label = f"{actor.cls.__name__}.{method}"
        payload = execution.serialize_args(call_args, call_kwargs, label, None)

        call_id = new_id("m")

        def call() -> Any:
            a, k = serialization.deserialize(payload)
            a, k = execution.decode_args(a, k, self._resolve(deps))
            runtime_context.set_executing(call_id, actor.identity)
            return execution.actor_method(actor.instance, method)(*a, **k)

        call.__name__ = f"{actor.cls.__name__}.{method}"
        retries = options.get("max_task_retries")
        return self._enqueue(
            actor,
            call,
            options["num_returns"],
            retries=actor.options["max_task_retries"] if retries is None else retries,
            retry_exceptions=options.get("retry_exceptions", False),
            deps=deps,
        )

    def kill(self, handle: ActorHandle, no_restart: bool) -> None:
        actor = self._actors.get(handle.actor_id)
        if actor is None:
            return
        if not no_restart and actor.restarts_left != 0:
            actor.restarts_left -= 1
            actor.constructed.clear()
            self._enqueue(actor, lambda: self._construct(actor), 1, is_init=True)
            return
        actor.dead_reason = "it was killed with miniray.kill()"
        self._forget_name(actor)

    def _exited(self, actor: _Actor, call: Callable[[], Any]) -> None:
        """A method called exit_actor(): dead for good, no restart; queued calls fail."""
        actor.dead_reason = (
            f"it exited: {getattr(call, '__name__', 'a method')}() called exit_actor()"
        )
        self._forget_name(actor)

    def _forget_name(self, actor: _Actor) -> None:
        with self._lock:
            key = actor.name_key
            if key is not None and self._names.get(key) == actor.actor_id:
                del self._names[key]

    def _name_key(self, name: str | None, namespace: str | None) -> tuple[str, str] | None:
        return None if name is None else (namespace or self.namespace, name)

    def get_actor(self, name: str, namespace: str | None) -> ActorHandle:
        key = self._name_key(name, namespace)
        assert key is not None
        with self._lock:
            actor_id = self._names.get(key)
            names = sorted(n for ns, n in self._names if ns == key[0])
        if actor_id is None:
            raise ValueError(
                f"Failed to look up actor with name {name!r} in namespace {key[0]!r}: no live "
                f"actor has that name there (named actors in it: {names})"
            )
        actor = self._actors[actor_id]
        return ActorHandle(actor_id, actor.cls.__name__, actor.cls.methods)

    def runtime_context(self) -> runtime_context.RuntimeContext:
        return runtime_context.RuntimeContext(
            self.name, self.session_id, runtime_context.node_id_of(self.session_id), self.namespace
        )

    def exit_actor(self) -> None:
        runtime_context.exit_actor_here()

    def _start_thread(self, target: Callable[[], Any], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

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


async def _all_stored(loop: asyncio.AbstractEventLoop, entries: Any) -> None:
    """Wait on ``loop`` (without blocking it) until every entry is stored."""
    for entry in entries:
        if entry.done.is_set():
            continue
        stored = loop.create_future()

        def settle(stored: asyncio.Future = stored) -> None:
            if not stored.done():
                stored.set_result(None)

        def wake(stored: asyncio.Future = stored) -> None:
            loop.call_soon_threadsafe(settle, stored)

        entry.callbacks.append(wake)
        if not entry.done.is_set():  # _store may have run its callbacks before we appended
            await stored


def _exited_task_error(name: str, exc: BaseException, max_retries: int) -> WorkerCrashedError:
    """What a task that called ``sys.exit()`` on its last attempt fails with: on Ray and the
    local backend its worker process ends, so Ray's crashed-worker error (here no process ends:
    it would be the driver's)."""
    return WorkerCrashedError(
        f"task {name}() called sys.exit({getattr(exc, 'code', None)!r}), which ends its worker "
        f"process as in Ray: the worker died. No retries left (max_retries={max_retries})."
    )


def _set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in that thread at its next bytecode (None withdraws a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type else None
    )


def _reraisable(error: BaseException) -> BaseException:
    if isinstance(error, RayTaskError):
        return error.as_instanceof_cause()
    return error
