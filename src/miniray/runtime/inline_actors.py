"""The inline backend's actors: creation, the queue of calls of each actor and how it runs
them (one thread in order, a thread pool for ``max_concurrency > 1``, an event loop for async
actors), retries, restarts, ``kill``, named actors and ``cancel`` of a call.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from miniray.errors import (
    ActorAlreadyExistsError,
    ActorDiedError,
    ActorUnavailableError,
    PendingCallsLimitExceeded,
    RayActorError,
    TaskCancelledError,
)
from miniray.runtime import execution, runtime_context, serialization
from miniray.runtime import options as opts
from miniray.runtime.inline_objects import _all_stored, _Entry
from miniray.runtime.inline_streams import InlineStreams
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ObjectRef,
    ObjectRefGenerator,
    new_id,
    returns_of,
)
from miniray.runtime.runtime_context import ActorExit, ActorIdentity


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


class InlineActors(InlineStreams):
    namespace: str
    _actors: dict[str, _Actor]
    _names: dict[tuple[str, str], str]  # (namespace, name) -> actor id

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
