"""The backend inside a child process: every runtime call is forwarded to the head.

    user code (any thread) --send--> head            receiver thread <--recv-- head
          | request(): waits on _Request.event            | reply -> sets that event
          +-- deadline expires -> cancel_request, GetTimeoutError

Ids for new objects and tasks are made here, so ``.remote()`` needs no round trip. The receiver
thread never sends and never runs user code, so it always drains the socket: that is what keeps
head and child from blocking on each other's full buffers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from miniray.errors import GetTimeoutError, RaySystemError
from miniray.runtime import execution, runtime_context, serialization
from miniray.runtime import options as opts
from miniray.runtime.execution import serialize_args
from miniray.runtime.local import protocol
from miniray.runtime.local.values import raise_if_error, value_of
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ObjectRef,
    RemoteFunction,
    new_id,
    returns_of,
)


class _Request:
    __slots__ = ("callback", "event", "payload")

    def __init__(self, callback: Callable[[Any], None] | None = None):
        self.event = threading.Event()
        self.payload: Any = None
        self.callback = callback


class WorkerClient:
    name = "local"

    def __init__(self, conn: protocol.Channel, session_id: str, namespace: str):
        self._conn = conn
        self._session_id = session_id
        self.namespace = namespace
        self._send_lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._request_ids = itertools.count()
        self._releases: deque[str] = deque()
        self._pins: deque[str] = deque()
        self._holds: deque[str] = deque()
        self._unmapped: deque[tuple[str, int]] = deque()
        self._sent_functions: set[str] = set()

    # -- channel ---------------------------------------------------------------------------
    def send(self, message: protocol.ToHead) -> None:
        with self._send_lock:
            # Holds and pins first: a ref made here (a lent one, held) or inside `message`
            # (pinned) must be counted before the head could free it; releases after.
            if self._holds:
                holds = [self._holds.popleft() for _ in range(len(self._holds))]
                protocol.send(self._conn, protocol.Hold(holds))
            if self._pins:
                pins = [self._pins.popleft() for _ in range(len(self._pins))]
                protocol.send(self._conn, protocol.Pin(pins))
            protocol.send(self._conn, message)
            if self._releases:
                releases = [self._releases.popleft() for _ in range(len(self._releases))]
                protocol.send(self._conn, protocol.Release(releases))
            if self._unmapped:
                unmapped = [self._unmapped.popleft() for _ in range(len(self._unmapped))]
                protocol.send(self._conn, protocol.Unmapped(unmapped))

    def on_reply(self, request_id: int, payload: Any) -> None:
        """Called by the receiver thread."""
        request = self._requests.pop(request_id, None)
        if request is None:  # the caller gave up (timeout) before the answer came
            for item in payload if isinstance(payload, list) else ():
                if isinstance(item, tuple):
                    item[1].discard()
            return
        request.payload = payload
        request.event.set()
        if request.callback is not None:
            request.callback(payload)

    def _request(
        self, make: Callable[[int], protocol.ToHead], deadline: float | None, what: str
    ) -> Any:
        request_id = next(self._request_ids)
        request = _Request()
        self._requests[request_id] = request
        self.send(make(request_id))
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            answered = request.event.wait(remaining)
        except BaseException:  # the KeyboardInterrupt of a cancel: the head must stop waiting too
            self._give_up(request_id)
            raise
        if not answered:
            self._give_up(request_id)
            raise GetTimeoutError(f"{what} timed out")
        return request.payload

    def _give_up(self, request_id: int) -> None:
        """The caller no longer waits for this answer (its reply, if any, is dropped)."""
        self._requests.pop(request_id, None)
        self.send(protocol.CancelRequest(request_id))

    # -- objects ---------------------------------------------------------------------------
    def get(self, refs: list[ObjectRef], deadline: float | None) -> list[Any]:
        ids = [r.id for r in refs]
        stored = self._request(
            lambda rid: protocol.Get(rid, ids),
            deadline,
            f"get() waiting for {len(ids)} object(s) starting with {refs[0]!r}",
        )
        for item in stored:
            raise_if_error(item)
        return [value_of(item) for item in stored]

    def wait(
        self, refs: list[ObjectRef], num_returns: int, deadline: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        ids = [r.id for r in refs]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready_ids = set(
            self._request(lambda rid: protocol.Wait(rid, ids, num_returns, timeout), None, "wait()")
        )
        ready = [r for r in refs if r.id in ready_ids][:num_returns]
        taken = {r.id for r in ready}
        return ready, [r for r in refs if r.id not in taken]

    def put(self, value: Any) -> ObjectRef:
        oid = new_id("o")
        ser = serialization.serialize(value, session_id=self._session_id)
        self.send(protocol.Put(oid, ser))
        return ObjectRef(oid)

    def future(self, ref: ObjectRef) -> Any:
        # Imported here: a worker that never asks for a future would pay concurrent.futures,
        # logging and traceback at start, 8 ms of its ~40 ms of imports.
        from concurrent.futures import Future

        from miniray.runtime import futures

        fut: Future = Future()

        def complete(stored: list) -> None:
            # On the receiver thread: only queue. The reply's value is a pending delivery (see
            # Serialized), so its segment is not reused before the completer decodes it.
            futures.settle(fut, lambda: _decoded(stored[0]))

        request_id = next(self._request_ids)
        self._requests[request_id] = _Request(complete)
        self.send(protocol.Get(request_id, [ref.id]))
        return fut

    def release(self, object_id: str) -> None:
        self._releases.append(object_id)

    def pin(self, object_id: str) -> None:
        self._pins.append(object_id)

    def borrowed_ref(self, object_id: str) -> ObjectRef:
        """A ref unpickled here (from a call's arguments, or a stored value): counted, as this
        process's own refs are, so that the object lives as long as this process keeps it;
        the hold reaches the head before this process's answer to the call that lent it."""
        self._holds.append(object_id)
        return ObjectRef(object_id)

    def unmapped(self, name: str, consumed: int) -> None:
        """segments' hook: this process no longer maps ``name`` (reported on the next send)."""
        self._unmapped.append((name, consumed))

    def flush(self) -> None:
        if self._releases or self._pins or self._holds or self._unmapped:
            self.send(protocol.Release([]))

    # -- tasks and actors --------------------------------------------------------------------
    def submit_task(
        self, fn: RemoteFunction, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        opts.check_embedded(options, self.name)
        if options["num_returns"] == "streaming":
            raise _nested_stream_error(f"{fn.__qualname__}.remote()")
        call_args, call_kwargs, deps = execution.encode_args(args, kwargs)
        payload = serialize_args(call_args, call_kwargs, fn.__qualname__, self._session_id)
        fn_bytes = None
        if fn.function_id not in self._sent_functions:
            fn_bytes = execution.pickled_definition(fn.function, "remote function", fn.__qualname__)
            self._sent_functions.add(fn.function_id)
        task_id = new_id("t")
        return_ids = [new_id("o") for _ in range(options["num_returns"])]
        self.send(
            protocol.Submit(
                task_id,
                fn.function_id,
                fn_bytes,
                fn.__qualname__,
                payload,
                deps,
                return_ids,
                opts.task_wire_options(options),
            )
        )
        refs = [ObjectRef(oid) for oid in return_ids]
        return returns_of(refs, options["num_returns"]) if refs else None

    def submit_actor_call(
        self, handle: ActorHandle, method: str, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any:
        label = f"{handle.class_name}.{method}"
        if options["num_returns"] == "streaming":
            raise _nested_stream_error(f"{label}.remote()")
        call_args, call_kwargs, deps = execution.encode_args(args, kwargs)
        payload = serialize_args(call_args, call_kwargs, label, self._session_id)
        return_ids = [new_id("o") for _ in range(options["num_returns"])]
        self.send(
            protocol.SubmitCall(
                handle.actor_id,
                new_id("m"),
                method,
                payload,
                deps,
                return_ids,
                opts.call_wire_options(options),
            )
        )
        refs = [ObjectRef(oid) for oid in return_ids]
        return returns_of(refs, options["num_returns"]) if refs else None

    def create_actor(
        self, cls: ActorClass, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> ActorHandle:
        opts.check_embedded(options, self.name)
        init_args, init_kwargs, deps = execution.encode_args(args, kwargs)
        payload = serialize_args(init_args, init_kwargs, cls.__name__, self._session_id)
        class_bytes = execution.pickled_definition(cls.cls, "actor", cls.__name__)
        answer = self._request(
            lambda rid: protocol.NewActor(
                rid, cls.__name__, cls.methods, class_bytes, payload, deps, options
            ),
            None,
            "create_actor",
        )
        return _handle_or_raise(answer)

    def kill(self, handle: ActorHandle, no_restart: bool) -> None:
        self._request(lambda rid: protocol.Kill(rid, handle.actor_id, no_restart), None, "kill()")

    def get_actor(self, name: str, namespace: str | None) -> ActorHandle:
        answer = self._request(
            lambda rid: protocol.GetActor(rid, name, namespace), None, "get_actor()"
        )
        return _handle_or_raise(answer)

    def runtime_context(self) -> runtime_context.RuntimeContext:
        return runtime_context.RuntimeContext(
            self.name,
            self._session_id,
            runtime_context.node_id_of(self._session_id),
            self.namespace,
        )

    def exit_actor(self) -> None:
        runtime_context.exit_actor_here()

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        self.send(protocol.CancelRef(ref.id, force, recursive))

    def shutdown(self) -> None:
        raise RaySystemError("shutdown() can only be called by the driver, not inside a worker")


def _nested_stream_error(label: str) -> ValueError:
    # The head keeps a stream's refs in the driver, and a generator cannot travel to a child.
    return ValueError(
        f"{label}: a streaming generator (num_returns='streaming') can be started only from "
        "the driver on the local backend, not from inside a task or actor; return a list "
        "from here instead"
    )


def _decoded(stored: protocol.Stored) -> Any:
    raise_if_error(stored)
    return value_of(stored)


def _handle_or_raise(answer: tuple) -> ActorHandle:
    kind, value = answer
    if kind == "error":
        raise value
    actor_id, class_name, methods = value
    return ActorHandle(actor_id, class_name, methods)
