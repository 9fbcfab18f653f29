"""A child process of the local backend: a task worker, or the host of one actor.

    receiver thread: recv from head -> reply: wake the waiting request
                                     -> exit / EOF (driver gone): sweep shm, os._exit
                                     -> task / create / call: hand to the executor
    executor: sync actor or task worker -> main thread, one call at a time, in order
              threaded actor (max_concurrency > 1) -> thread pool
              async actor -> asyncio loop in the main thread, max_concurrency at once
    cancel of the running task -> receiver thread sends SIGINT to the main thread, whose
              handler raises KeyboardInterrupt in the task (only in that task: see _on_sigint)
    cancel of an actor call -> its result becomes TaskCancelledError (as in Ray 2.60): a queued
              call never runs, a generator stops at its next yield, an async call's coroutine
              is cancelled; running sync code is not interrupted (Ray does not either)

Started as ``python -m miniray.runtime.local.worker FD`` with the session in the environment.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import sys
import threading
from typing import Any, NoReturn

from miniray.errors import TaskCancelledError
from miniray.runtime import (
    context,
    execution,
    runtime_context,
    segments,
    serialization,
    shm,
    streaming,
)
from miniray.runtime.local import lifeline, protocol
from miniray.runtime.local.client import WorkerClient
from miniray.runtime.local.values import error_of, stored_error, stored_value, value_of
from miniray.runtime.refs import new_id
from miniray.runtime.runtime_context import ActorExit, ActorIdentity

ENV_SESSION = "MINIRAY_SESSION"
ENV_NAMESPACE = "MINIRAY_NAMESPACE"  # the driver's namespace: get_actor(name) looks there
ENV_SYS_PATH = "MINIRAY_SYS_PATH"


class Worker:
    def __init__(self, conn: protocol.Channel, session_id: str, namespace: str):
        self.conn = conn
        self.session_id = session_id
        self.client = WorkerClient(conn, session_id, namespace)
        self.inbox: queue.SimpleQueue[
            protocol.RunTask | protocol.CreateActor | protocol.RunCall
        ] = queue.SimpleQueue()
        self.functions: dict[str, Any] = {}
        self.instance: Any = None
        self.actor_name = ""
        self.pool: Any = None  # ThreadPoolExecutor of a threaded actor
        self.loop: Any = None  # asyncio loop of an async actor
        self.semaphore: Any = None
        # Cancellation: the task the main thread runs, and the last task the head cancelled.
        self.current_task: str | None = None
        self.cancel_id: str | None = None
        # Actor calls the head cancelled (ids leave when the call's result is sent), and the
        # asyncio task of each call of an async actor.
        self.cancelled_calls: set[str] = set()
        self.async_calls: dict[str, Any] = {}
        self.identity: ActorIdentity | None = None  # the actor this process hosts
        self.exiting = False  # exit_actor() was called: run no more calls

    # -- receiving -------------------------------------------------------------------------
    def receive_forever(self) -> None:
        while True:
            try:
                message = protocol.recv(self.conn)
            except (EOFError, OSError):
                self._driver_gone()
                return
            match message:
                case protocol.Reply(request_id, payload):
                    self.client.on_reply(request_id, payload)
                case protocol.Exit():
                    os._exit(0)
                case protocol.CancelTask(task_id):
                    self._interrupt(task_id)
                case protocol.CancelCall(call_id):
                    self.cancelled_calls.add(call_id)
                    if self.loop is not None:
                        self.loop.call_soon_threadsafe(self._cancel_async_call, call_id)
                case protocol.Reclaim(names):
                    for name in names:
                        segments.reclaim(name)
                case protocol.RunCall() if self.loop is not None:
                    try:
                        self.loop.call_soon_threadsafe(self._start_async_call, message)
                    except RuntimeError:  # closed by exit_actor(): the head failed this call
                        pass
                case protocol.RunCall() if self.pool is not None:
                    try:
                        self.pool.submit(self._run_call, message)
                    except RuntimeError:  # shut down by exit_actor(): the head failed this call
                        pass
                case protocol.RunTask() | protocol.CreateActor() | protocol.RunCall():
                    self.inbox.put(message)
                case _:  # a head of another version: say so, and keep draining the socket
                    print(f"miniray worker: unknown message {message!r}", file=sys.stderr)

    def _interrupt(self, task_id: str) -> None:
        """Receiver thread: the head cancelled ``task_id``, which this worker runs or will run.

        cancel_id is set before current_task is read, and _run_task sets current_task before it
        reads cancel_id: whichever comes second sees the other, so the cancel is never lost."""
        self.cancel_id = task_id
        if self.current_task == task_id:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    def on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT handler (main thread, between bytecodes): interrupt the cancelled task only.

        A signal that lands after that task ended, or a stray Ctrl-C, is ignored: a worker dying
        of it would look like a crash."""
        if self.current_task is not None and self.current_task == self.cancel_id:
            raise KeyboardInterrupt(f"task {self.current_task} was cancelled")

    def _driver_gone(self) -> None:
        # The driver died without shutdown() (e.g. SIGKILL): nobody else will clean up.
        shm.unlink_session(self.session_id)
        os._exit(0)

    # -- executing -------------------------------------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self.receive_forever, name="miniray-receiver", daemon=True).start()
        protocol.send(self.conn, protocol.Ready(os.getpid()))
        while True:
            message = self.inbox.get()
            match message:
                case protocol.RunTask():
                    self._run_task(message)
                case protocol.CreateActor():
                    if self._create_actor(message) and self.loop is not None:
                        self.loop.run_forever()
                case protocol.RunCall():
                    self._run_call(message)

    def _args(self, payload: Any, deps: dict[str, protocol.Stored]) -> tuple[tuple, dict]:
        args, kwargs = serialization.deserialize(payload)
        values = {oid: value_of(stored) for oid, stored in deps.items()}
        return execution.decode_args(args, kwargs, values)

    def _run_task(self, message: protocol.RunTask) -> None:
        task_id, name, return_ids = message.task_id, message.name, message.return_ids
        if message.fn_bytes is not None:
            self.functions[message.fn_id] = serialization.loads(message.fn_bytes)
        self.current_task = task_id  # from here a cancel interrupts us (see _interrupt)
        try:
            outcome = self._attempts(message)
        except KeyboardInterrupt:  # the cancel's interrupt, landing in our code around the call
            outcome = TaskCancelledError(f"task {name}() was cancelled")
        finally:
            self.current_task = None  # (no call here: a pending signal cannot run before it)
        if isinstance(outcome, BaseException):
            error = stored_error(outcome, self.session_id)
            self.client.send(protocol.Result(task_id, [error] * max(1, len(return_ids))))
            return
        stored = [stored_value(v, self.session_id, name) for v in outcome]
        # Drop our views of the arguments first, so the send also reports them unmapped.
        del outcome
        self.client.send(protocol.Result(task_id, stored))

    def _attempts(self, message: protocol.RunTask) -> list[Any] | BaseException:
        """Run the task, retrying listed exceptions: its return values, or the error to store.

        Each retry is reported to the head, which counts it against the same ``max_retries``
        that covers this process dying: never more attempts than asked. ``sys.exit()`` in the
        task ends this process, as in Ray: the head sees a crashed worker and retries the task
        under ``max_retries`` (whatever ``retry_exceptions`` says), else fails it with
        ``WorkerCrashedError`` (a cancelled one with ``TaskCancelledError``)."""
        task_id, name, options = message.task_id, message.name, message.options
        attempts_left = options["max_retries"]
        runtime_context.set_executing(task_id, None)
        streams = options["num_returns"] == "streaming"
        streamed = [options.get("streamed", 0)]  # values the caller has (a retry skips them)
        while True:
            if self.cancel_id == task_id:  # cancelled before it started, or between attempts
                return TaskCancelledError(f"task {name}() was cancelled")
            try:
                fn = self.functions[message.fn_id]
                args, kwargs = self._args(message.payload, message.deps)
                if streams:
                    self._stream(task_id, name, fn(*args, **kwargs), streamed)
                    return []
                returns = len(message.return_ids)
                return execution.split_returns(fn(*args, **kwargs), returns, name)
            except BaseException as exc:
                if isinstance(exc, SystemExit):
                    _exit_process(exc)
                if self.cancel_id == task_id:  # Ray never retries a cancelled task
                    if isinstance(exc, KeyboardInterrupt):
                        return TaskCancelledError(f"task {name}() was cancelled")
                    return execution.task_error(name, exc)
                left = execution.retries_after(exc, attempts_left, options["retry_exceptions"])
                if left is None:
                    return execution.task_error(name, exc)
                attempts_left = left
                self.client.send(protocol.Retried(task_id))

    def _stream(self, task_id: str, name: str, values: Any, streamed: list[int]) -> None:
        """Send each value a streaming task or actor call yields as it comes: the head makes
        it an object and hands its ref to the caller's ObjectRefGenerator."""
        if not hasattr(values, "__next__"):
            raise streaming.not_a_generator_error(name, values)
        for index, value in streaming.replay(values, streamed[0]):
            if task_id in self.cancelled_calls:  # a cancelled actor call stops here, as in Ray
                values.close()
                raise TaskCancelledError(f"actor call {name}() was cancelled")
            self.client.send(protocol.Yield(task_id, stored_value(value, self.session_id, name)))
            del value
            streamed[0] = index + 1

    async def _stream_async(self, call_id: str, name: str, values: Any, streamed: list[int]):
        """``_stream`` for an async generator method, on the actor's event loop."""
        async for index, value in streaming.areplay(values, streamed[0]):
            self.client.send(protocol.Yield(call_id, stored_value(value, self.session_id, name)))
            del value
            streamed[0] = index + 1

    def _create_actor(self, message: protocol.CreateActor) -> bool:
        actor_id, class_name, options = message.actor_id, message.class_name, message.options
        payload, deps = message.payload, message.deps
        self.actor_name = class_name
        self.identity = ActorIdentity(actor_id, class_name, options["methods"], options["name"])
        runtime_context.set_process_actor(self.identity)
        runtime_context.set_executing(new_id("t"), self.identity)  # the creation task
        # The head only ever hears why __init__ failed as text: it must not decode (run) a
        # user's exception in its router thread, so this process does, with the fallback of
        # RayTaskError's unpickling for one that does not unpickle.
        failure = None
        try:
            failed = next((stored for stored in deps.values() if stored[0]), None)
            if failed is not None:  # then it is the only argument the head sent
                failure = f"an argument of its __init__ failed:\n{error_of(failed)}"
            else:
                cls = serialization.loads(message.class_bytes)
                args, kwargs = self._args(payload, deps)
                self.instance = cls(*args, **kwargs)
        except BaseException as exc:
            error = execution.task_error(f"{class_name}.__init__", exc)
            failure = f"its __init__ raised:\n{error}"
        if failure is not None:
            self.client.send(protocol.Created(actor_id, failure))
            return False
        import inspect  # lazily: task workers never need it

        is_async = any(
            inspect.iscoroutinefunction(m) or inspect.isasyncgenfunction(m)
            for _, m in inspect.getmembers(type(self.instance))
        )
        if is_async:
            import asyncio  # only async actors pay for importing it

            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.semaphore = asyncio.Semaphore(options["max_concurrency"])
        elif options["max_concurrency"] > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(
                options["max_concurrency"], thread_name_prefix=f"miniray-{class_name}"
            )
        # What __init__ built (a model, its imports) lives as long as the actor: out of the
        # collector's way. A full collection of a process holding torch and transformers took
        # ~200 ms and stopped the actor meanwhile (the demo's rank and rollouter, once each per
        # 900 steps, with the driver's router also stopped by its own).
        gc.freeze()
        self.client.send(protocol.Created(actor_id, None))
        return True

    def _invoke(self, message: protocol.RunCall) -> Any:
        args, kwargs = self._args(message.payload, message.deps)
        runtime_context.set_executing(message.call_id, self.identity)
        return execution.actor_method(self.instance, message.method)(*args, **kwargs)

    def _finish_call(self, call_id: str, label: str, return_ids: list[str], value: Any) -> None:
        if call_id in self.cancelled_calls:  # Ray drops the result of a cancelled call
            return self._fail_call(call_id, label, return_ids, None)
        try:
            values = execution.split_returns(value, len(return_ids), label)
        except ValueError as exc:
            return self._fail_call(call_id, label, return_ids, exc)
        stored = [stored_value(v, self.session_id, label) for v in values]
        del values, value
        self.client.send(protocol.Result(call_id, stored))

    def _fail_call(
        self, call_id: str, label: str, return_ids: list[str], exc: BaseException | None
    ) -> None:
        if call_id in self.cancelled_calls:
            self.cancelled_calls.discard(call_id)
            failure: BaseException = TaskCancelledError(f"actor call {label}() was cancelled")
        else:
            assert exc is not None
            failure = execution.task_error(label, exc)
        error = stored_error(failure, self.session_id)
        self.client.send(protocol.Result(call_id, [error] * max(1, len(return_ids))))

    def _run_call(self, message: protocol.RunCall) -> None:
        if self.exiting:
            return  # queued behind the exit_actor() call: the head failed it already
        retries_left = message.options["max_task_retries"]
        label = f"{self.actor_name}.{message.method}"
        if message.call_id in self.cancelled_calls:  # cancelled while queued: it never runs
            return self._fail_call(message.call_id, label, message.return_ids, None)
        streamed = _streamed(message)
        while True:
            try:
                value = self._invoke(message)
                if streamed is not None:  # the call holds the actor until its generator ends
                    self._stream(message.call_id, label, value, streamed)
                    value = None
            except BaseException as exc:
                left = self._after_failure(message, exc, retries_left)
                if left is None:
                    return
                retries_left = left
                continue
            break
        self._finish_call(message.call_id, label, message.return_ids, value)
        del value
        self.client.flush()

    def _after_failure(
        self, message: protocol.RunCall, exc: BaseException, retries_left: int
    ) -> int | None:
        """What a failed attempt of an actor call leads to, for the sync and the async runner
        alike: the retries left for the next attempt, or None once the call has ended.

        ``retries_left`` starts at ``max_task_retries`` (the head resolved it: the call's own,
        else the actor's). The head hears of each retry, so that one after this process dies
        counts against the same budget."""
        call_id = message.call_id
        if isinstance(exc, ActorExit):  # before SystemExit, which it is: exit_actor() is final
            self._exit_actor(call_id)
            return None
        if isinstance(exc, SystemExit):
            _exit_process(exc)
        if call_id in self.cancelled_calls:  # never retried; _fail_call says cancelled
            left = None
        else:
            left = execution.retries_after(exc, retries_left, message.options["retry_exceptions"])
        if left is None:
            label = f"{self.actor_name}.{message.method}"
            self._fail_call(call_id, label, message.return_ids, exc)
            return None
        self.client.send(protocol.Retried(call_id))
        return left

    def _start_async_call(self, message: protocol.RunCall) -> None:
        assert self.loop is not None
        if not self.exiting:
            task = self.loop.create_task(self._run_async_call(message))
            self.async_calls[message.call_id] = task

    def _cancel_async_call(self, call_id: str) -> None:
        """On the loop: the head cancelled this call; its coroutine sees CancelledError."""
        task = self.async_calls.get(call_id)
        if task is not None:
            task.cancel()

    async def _run_async_call(self, message: protocol.RunCall) -> None:
        label = f"{self.actor_name}.{message.method}"
        call_id = message.call_id
        try:
            await self._run_async_attempts(message, label)
        except BaseException:
            if call_id not in self.cancelled_calls:
                raise
            self._fail_call(call_id, label, message.return_ids, None)  # cancelled while queued
        finally:
            self.async_calls.pop(call_id, None)

    async def _run_async_attempts(self, message: protocol.RunCall, label: str) -> None:
        assert self.semaphore is not None
        retries_left = message.options["max_task_retries"]
        streamed = _streamed(message)
        async with self.semaphore:
            if self.exiting:
                return
            while True:
                try:
                    value = self._invoke(message)
                    if streamed is not None and hasattr(value, "__anext__"):
                        await self._stream_async(message.call_id, label, value, streamed)
                        value = None
                    elif streamed is not None:
                        self._stream(message.call_id, label, value, streamed)
                        value = None
                    elif hasattr(value, "__await__"):
                        value = await value
                except BaseException as exc:
                    left = self._after_failure(message, exc, retries_left)
                    if left is None:
                        return
                    retries_left = left
                    continue
                break
            self._finish_call(message.call_id, label, message.return_ids, value)

    # -- exit_actor() ----------------------------------------------------------------------
    def _exit_actor(self, call_id: str) -> None:
        """A method called exit_actor(): the head fails this call and every later one with
        ActorDiedError and never restarts the actor; calls running alongside it (threaded or
        async actors) run to their end first, queued ones never start, as in Ray."""
        self.exiting = True
        self.client.send(protocol.ActorExit(call_id))
        if self.pool is not None:
            pool = self.pool

            def drain_then_end() -> None:
                pool.shutdown(wait=True, cancel_futures=True)
                _end_process()

            # Not from this pool thread: shutdown(wait=True) would wait for itself.
            threading.Thread(target=drain_then_end, daemon=True).start()
        elif self.loop is not None:
            self.loop.create_task(self._exit_when_others_end())
        else:
            _end_process()

    async def _exit_when_others_end(self) -> None:
        import asyncio

        current = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not current]
        if others:
            await asyncio.wait(others)
        _end_process()


def _streamed(message: protocol.RunCall) -> list[int] | None:
    """A streaming call's count of values the caller has (a retry skips them), else None."""
    options = message.options
    return [options.get("streamed", 0)] if options["num_returns"] == "streaming" else None


def _end_process() -> None:
    """End an actor's process as a normal exit would: atexit handlers run (Ray runs them)."""
    import atexit

    context.set_backend(None)  # miniray's own atexit shutdown() is the driver's business
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _exit_process(exc: SystemExit) -> NoReturn:
    """``sys.exit()`` in a task or an actor method ends this process with that code, as in Ray.

    For an actor the head tells the two apart by the exit code: 0 (or None) is an intended
    exit, so the actor is dead for good; any other code is a crash, restarted per
    ``max_restarts``. For a task either is a worker crash (retried per ``max_retries``)."""
    code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # sys.exit("message") prints it and exits with 1
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def main() -> None:
    lifeline.die_with_parent()  # before any user code: that may never let Python run again
    fd = int(sys.argv[-1])
    session_id = os.environ[ENV_SESSION]
    namespace = os.environ[ENV_NAMESPACE]
    sys.path[:] = os.environ[ENV_SYS_PATH].split(os.pathsep)
    conn = protocol.Channel(fd)
    worker = Worker(conn, session_id, namespace)
    # SIGINT is how a cancel interrupts a running task; Ctrl-C goes to the driver (we run in a
    # session of our own), which shuts us down.
    signal.signal(signal.SIGINT, worker.on_sigint)
    context.set_backend(worker.client)
    segments.set_unmapped_hook(worker.client.unmapped)
    worker.run()


if __name__ == "__main__":
    main()
