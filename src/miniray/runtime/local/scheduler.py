"""The local head's tasks: waiting for arguments, the ready queue, dispatch to idle workers,
extra workers while others block, retries after a worker dies, cancellation.

    submit -> waiting (an argument not stored yet) --dep_stored--> ready queue
           -> ready queue --dispatch: an idle worker--> running on that child
    running --Result--> finish: results stored, the worker idle again (or replaced: max_calls)
            --the worker died--> retried (max_retries) first in the queue, or failed

Every method runs under the head lock. A task's results are stored through ``store_results``
(the head's, which wakes whoever waits on them); the worker processes are ``Processes``'.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from miniray.errors import TaskCancelledError, WorkerCrashedError
from miniray.runtime import execution, serialization, streaming
from miniray.runtime.local import protocol
from miniray.runtime.local.ledger import SegmentLedger
from miniray.runtime.local.objects import ObjectTable
from miniray.runtime.local.processes import Child, Processes
from miniray.runtime.local.protocol import Stored
from miniray.runtime.local.values import stored_error

# Extra task workers may be started while others block in get(); this caps them.
MAX_EXTRA_WORKERS = 32

# store_results(return ids, one stored value each, the stream if a generator, label)
StoreResults = Callable[[list[str], list[Stored], "streaming.Stream | None", str], None]


class Task:
    def __init__(
        self,
        task_id: str,
        fn_id: str,
        name: str,
        payload: serialization.Serialized,
        deps: list[str],
        return_ids: list[str],
        options: dict[str, Any],
        owner: int | None,
    ):
        self.task_id = task_id
        self.fn_id = fn_id
        self.name = name
        self.payload = payload
        self.deps = deps
        self.return_ids = return_ids
        self.options = options
        self.retries_left: int = options["max_retries"]
        self.missing = 0  # arguments not stored yet
        self.owner = owner  # the child that submitted it (None: the driver)
        self.parent: str | None = None  # the task that submitted it (for recursive cancel)
        self.cancelled = False
        self.done = False
        self.stream: streaming.Stream | None = None  # a streaming generator task's

    @classmethod
    def submitted(cls, message: protocol.Submit, child: Child) -> Task:
        """A task a child submitted (a nested call): owned by that child, cancelled with the
        task it runs (recursive cancel)."""
        task = cls(
            message.task_id,
            message.fn_id,
            message.name,
            message.payload,
            message.deps,
            message.return_ids,
            message.options,
            child.key,
        )
        task.parent = child.task.task_id if child.task is not None else None
        return task

    @property
    def label(self) -> str:
        return f"task {self.name}()"


def every_return(task_or_call: Any, stored: Stored) -> list[Stored]:
    """One value (an error) for each of a call's returns, at least one."""
    return [stored] * max(1, len(task_or_call.return_ids))


class Scheduler:
    def __init__(
        self,
        num_workers: int,
        session_id: str,
        objects: ObjectTable,
        ledger: SegmentLedger,
        processes: Processes,
        store_results: StoreResults,
    ):
        self.num_workers = num_workers
        self._session_id = session_id
        self._objects = objects
        self._ledger = ledger
        self._processes = processes
        self._store_results = store_results
        self.tasks: dict[str, Task] = {}  # not finished
        self.functions: dict[str, bytes] = {}  # function id -> its pickled definition
        self._waiting: dict[str, list[Task]] = {}  # object id -> tasks waiting on it
        self._ready: deque[Task] = deque()
        self._idle: list[Child] = []

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, task: Task) -> None:
        for oid in task.return_ids:
            self._objects.new(oid, task.label, owner=task.owner)
        self.tasks[task.task_id] = task
        missing = self._objects.take_uses(task.deps)
        for oid in missing:
            task.missing += 1
            self._waiting.setdefault(oid, []).append(task)
        # An argument that failed before this call was made fails it now, as dep_stored does
        # for one that fails later; the worker must never get an error as an argument's value.
        failed = self._objects.failed(task.deps)
        if failed is None and self.num_workers == 0:
            failed = stored_error(execution.no_cpus_error(task.name), self._session_id)
        if failed is not None:
            self.finish(task, every_return(task, failed))
        elif not missing:
            self._ready.append(task)
            self.dispatch()

    def dep_stored(self, oid: str, stored: Stored) -> None:
        """``oid`` was stored: the tasks waiting on it may be ready (or fail with it)."""
        for task in self._waiting.pop(oid, ()):
            if task.done:
                continue
            if stored[0]:  # a failed argument fails the task with the same error
                self.finish(task, every_return(task, stored))
                continue
            task.missing -= 1
            if task.missing == 0:
                self._ready.append(task)
                self.dispatch()

    # -- running ------------------------------------------------------------------------------
    def dispatch(self) -> None:
        while self._ready and self._idle:
            task = self._ready.popleft()
            if task.done:
                continue
            child = self._idle.pop()
            fn_bytes = None
            if task.fn_id not in child.known_functions:
                fn_bytes = self.functions[task.fn_id]
                child.known_functions.add(task.fn_id)
            child.task = task
            self._ledger.deliver(child.key, task.payload, *self._objects.stored_of(task.deps))
            self._processes.send(
                child,
                protocol.RunTask(
                    task.task_id,
                    task.fn_id,
                    fn_bytes,
                    task.name,
                    task.payload,
                    self._objects.values_of(task.deps),
                    task.return_ids,
                    task.options,
                ),
            )
        if self._ready and not self._idle:
            workers = self._processes.workers()
            blocked = sum(1 for c in workers if c.blocked > 0 and c.task is not None)
            starting = sum(1 for c in workers if not c.ready)
            extra = len(workers) - self.num_workers
            # Tasks blocked in get() hold their worker; without more workers a tree of nested
            # tasks could wait on each other forever.
            if blocked > starting and extra < MAX_EXTRA_WORKERS:
                self._processes.spawn("worker").extra = True

    def finish(self, task: Task, stored: list[Stored]) -> None:
        task.done = True
        self.tasks.pop(task.task_id, None)
        self._objects.release_uses(task.deps)
        self._ledger.free(task.payload)
        self._store_results(task.return_ids, stored, task.stream, task.label)

    def on_result(self, child: Child, call_id: str, stored: list[Stored]) -> None:
        task = child.task
        child.task = None
        if task is not None and task.task_id == call_id:
            self.finish(task, stored)
            if self._used_up(child, task):
                return
        self.worker_idle(child)

    def _used_up(self, child: Child, task: Task) -> bool:
        """``max_calls``: a worker that ran a function that often is replaced (leaky code)."""
        max_calls = task.options.get("max_calls") or 0
        if max_calls <= 0:
            return False
        child.calls[task.fn_id] = child.calls.get(task.fn_id, 0) + 1
        if child.calls[task.fn_id] < max_calls:
            return False
        self.forget(child)
        self._processes.dismiss(child)
        if not self._processes.closing:
            self._processes.spawn("worker")
        return True

    def worker_idle(self, child: Child) -> None:
        """``child`` is ready for a task (new, or done with its last)."""
        workers = self._processes.workers()
        if child.extra and len(workers) > self.num_workers and not self._ready:
            self.forget(child)
            self._processes.dismiss(child)
            return
        self._idle.append(child)
        self.dispatch()

    def stream_of(self, child: Child, call_id: str) -> tuple[streaming.Stream, str] | None:
        """The stream of the generator task ``call_id`` running on ``child``, and its label."""
        task = child.task
        if task is None or task.task_id != call_id or task.done or task.stream is None:
            return None
        return task.stream, task.label

    def on_retried(self, child: Child, call_id: str) -> None:
        """The worker re-ran its task after a listed exception: one retry fewer if it dies."""
        task = child.task
        if task is not None and task.task_id == call_id and task.retries_left > 0:
            task.retries_left -= 1

    # -- cancelling ---------------------------------------------------------------------------
    def producing(self, oid: str) -> Task | None:
        """The unfinished task that returns ``oid``."""
        return next((t for t in self.tasks.values() if oid in t.return_ids), None)

    def cancel(self, task: Task, force: bool, recursive: bool) -> None:
        """Its dependents fail with the same error as its results (see ``dep_stored``)."""
        if task.done:
            return
        # Its children first: the parent, blocked in get() on one, then fails as cancelled
        # rather than see a child's error (and no child outlives it running).
        if recursive:
            for child_task in [t for t in self.tasks.values() if t.parent == task.task_id]:
                self.cancel(child_task, force, recursive)
        running = next((c for c in self._processes.children.values() if c.task is task), None)
        if running is None:
            error = TaskCancelledError(f"task {task.name}() was cancelled")
            self.finish(task, every_return(task, stored_error(error, self._session_id)))
        elif force:
            task.cancelled = True  # worker_exited stores TaskCancelledError, no retry
            running.popen.kill()
        elif not task.cancelled:
            # The worker raises KeyboardInterrupt in it; its result (TaskCancelledError, or a
            # value if user code caught the interrupt) comes back as any other.
            task.cancelled = True
            self._processes.send(running, protocol.CancelTask(task.task_id))

    # -- deaths -------------------------------------------------------------------------------
    def forget(self, child: Child) -> None:
        """``child`` left the tables: it takes no more tasks."""
        if child in self._idle:
            self._idle.remove(child)

    def worker_exited(self, child: Child, reason: str) -> None:
        """A worker's exit status is known: its task is retried or fails, and it is replaced."""
        self.forget(child)
        task = child.task
        child.task = None
        if task is not None and not task.done:
            self._task_lost(task, child, reason)
        if not child.ready:
            # It died before saying hello: a broken environment, not a crash to heal.
            self._processes.start_failure = f"a worker process (pid {child.popen.pid}) {reason}"
        elif len(self._processes.workers()) < self.num_workers and not self._processes.closing:
            self._processes.spawn("worker")
        self.dispatch()

    def _task_lost(self, task: Task, child: Child, reason: str) -> None:
        error: Exception
        if task.cancelled:
            error = TaskCancelledError(f"task {task.name}() was cancelled (force=True)")
        elif task.retries_left != 0:
            task.retries_left -= 1
            # The next attempt may retry exceptions only with what is left of the same budget.
            task.options = {**task.options, "max_retries": task.retries_left}
            if task.stream is not None:  # the next attempt skips the values the caller has
                task.options["streamed"] = len(task.stream.ids)
            self._ready.appendleft(task)
            return
        else:
            error = WorkerCrashedError(
                f"The worker process (pid {child.popen.pid}) running task {task.name}() died: "
                f"{reason}. No retries left (max_retries={task.options['max_retries']})."
            )
        self.finish(task, every_return(task, stored_error(error, self._session_id)))

    def segments_in_use(self) -> set[str | None]:
        return {t.payload.segment for t in self.tasks.values()}

    def clear(self) -> None:
        self._idle.clear()
