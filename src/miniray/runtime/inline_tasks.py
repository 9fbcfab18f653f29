"""The inline backend's tasks: each runs on its own thread once its arguments are stored,
with retries; ``cancel`` of a task.

``cancel`` stores ``TaskCancelledError`` for a task still waiting for its arguments; a running
one gets a ``KeyboardInterrupt`` raised asynchronously in its thread (PyThreadState_SetAsyncExc),
which Python checks between bytecodes: a thread inside a C call (``time.sleep``, a blocking
``get``) sees it when the call returns. A thread cannot be killed, so ``force=True`` does the same.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

from miniray.errors import TaskCancelledError, WorkerCrashedError
from miniray.runtime import execution, runtime_context, serialization, streaming
from miniray.runtime import options as opts
from miniray.runtime.inline_objects import _Entry
from miniray.runtime.inline_streams import InlineStreams
from miniray.runtime.refs import ObjectRef, ObjectRefGenerator, RemoteFunction, new_id, returns_of


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


class InlineTasks(InlineStreams):
    _runs_tasks: bool  # False: init(num_cpus=0), a driver-only session
    _current: threading.local  # .task: the task this thread runs

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
