"""Messages between the driver (head) and the processes it started, and how they travel.

One immutable, typed class per message kind (a ``NamedTuple``), so that mypy checks every
sender and every receiver (``match`` on the class). They travel pickled over a socketpair created by the driver for each
child: never over a network socket, and only between processes of one session (see
docs/design.md, "What crosses a process boundary").

    head -> child : RunTask, CreateActor, RunCall, CancelTask, CancelCall, Reply, Reclaim, Exit
    child -> head : Ready, Result, Yield, Retried, Created, ActorExit,          (its own work)
                    Submit, SubmitCall, NewActor, Kill, GetActor, CancelRef,   (nested calls)
                    Put, Get, Wait, CancelRequest, Release, Hold, Pin, Unmapped (objects)

On the wire a message is the tuple ``(tag, *field values)``, the tag its class's index in
``_KINDS``; ``recv`` calls the class with the fields. Pickling the message class itself would
send its module and class name in every message and look the class up again at every load:
that measured 1.7x (RunCall) to 9x (Get) a tuple's pickle round trip (docs/design.md).
NamedTuple rather than a frozen dataclass: the 27 frozen, slotted dataclasses cost ~16 ms of
import in every process (each started worker, so ``init``: 0.10-0.14 s -> 0.16-0.18 s in
``benchmarks/runtime_vs_ray.py``) against ~4 ms, and a frozen dataclass is rebuilt on receipt
at ~1.9 us (its ``__init__`` sets each field through ``object.__setattr__``) against ~0.3 us.
"""

from __future__ import annotations

import pickle
import select
import socket
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from miniray.runtime.serialization import Serialized

# A stored value: (is_error, serialized value or error)
Stored = tuple[bool, Serialized]

_M = TypeVar("_M")


_KINDS: list[type] = []  # tag -> message class
_ENCODE: dict[type, Callable[[Any], tuple]] = {}  # message class -> its wire tuple


def _wire(cls: type[_M]) -> type[_M]:
    """Register a message class: its tag, and how it becomes ``(tag, *fields)``."""
    tag = len(_KINDS)
    _KINDS.append(cls)
    _ENCODE[cls] = lambda message: (tag, *message)
    return cls


# ------------------------------------------------------------------------ head -> child
@_wire
class RunTask(NamedTuple):
    task_id: str
    fn_id: str
    fn_bytes: bytes | None  # the function, the first time this child runs it
    name: str
    payload: Serialized  # (args, kwargs)
    deps: dict[str, Stored]  # argument object id -> its value
    return_ids: list[str]
    options: dict[str, Any]


@_wire
class CreateActor(NamedTuple):
    actor_id: str
    class_name: str
    class_bytes: bytes
    payload: Serialized | None  # None: deps holds the one argument that failed
    deps: dict[str, Stored]
    options: dict[str, Any]  # max_concurrency, methods, name


@_wire
class RunCall(NamedTuple):
    call_id: str
    method: str
    payload: Serialized
    deps: dict[str, Stored]
    return_ids: list[str]
    options: dict[str, Any]


@_wire
class CancelTask(NamedTuple):
    task_id: str


@_wire
class CancelCall(NamedTuple):
    call_id: str


@_wire
class Reply(NamedTuple):
    request_id: int
    payload: Any  # what the request asked for (see each request)


@_wire
class Reclaim(NamedTuple):
    names: list[str]  # segments this child created that nobody maps any more


@_wire
class Exit(NamedTuple):
    pass


# ------------------------------------------------------------------------ child -> head
@_wire
class Ready(NamedTuple):
    pid: int


@_wire
class Result(NamedTuple):
    call_id: str  # a task's or an actor call's id
    stored: list[Stored]  # one per return id (at least one: an error fills them all)


@_wire
class Yield(NamedTuple):
    call_id: str
    stored: Stored  # the next value of a streaming task or call


@_wire
class Retried(NamedTuple):
    call_id: str  # ran again after a listed exception


@_wire
class Created(NamedTuple):
    actor_id: str
    failure: str | None  # why __init__ failed, as text (the head never decodes user errors)


@_wire
class ActorExit(NamedTuple):
    call_id: str  # the call that called exit_actor()


@_wire
class Submit(NamedTuple):
    task_id: str
    fn_id: str
    fn_bytes: bytes | None
    name: str
    payload: Serialized
    deps: list[str]
    return_ids: list[str]
    options: dict[str, Any]


@_wire
class SubmitCall(NamedTuple):
    actor_id: str
    call_id: str
    method: str
    payload: Serialized
    deps: list[str]
    return_ids: list[str]
    options: dict[str, Any]


@_wire
class NewActor(NamedTuple):
    request_id: int  # Reply: ("ok", (actor_id, class_name, methods)) or ("error", exception)
    class_name: str
    methods: dict[str, Any]
    class_bytes: bytes
    payload: Serialized
    deps: list[str]
    options: dict[str, Any]


@_wire
class Kill(NamedTuple):
    request_id: int  # Reply: None
    actor_id: str
    no_restart: bool


@_wire
class GetActor(NamedTuple):
    request_id: int  # Reply: ("ok", (actor_id, class_name, methods)) or ("error", ValueError)
    name: str
    namespace: str | None


@_wire
class CancelRef(NamedTuple):
    object_id: str
    force: bool
    recursive: bool


@_wire
class Put(NamedTuple):
    object_id: str
    value: Serialized


@_wire
class Get(NamedTuple):
    request_id: int  # Reply: list[Stored], one per id
    ids: list[str]


@_wire
class Wait(NamedTuple):
    request_id: int  # Reply: the ready ids
    ids: list[str]
    num_returns: int
    timeout: float | None


@_wire
class CancelRequest(NamedTuple):
    request_id: int  # the caller stopped waiting (its reply, if any, is dropped)


@_wire
class Release(NamedTuple):
    ids: list[str]  # one ref of each dropped


@_wire
class Hold(NamedTuple):
    ids: list[str]  # one more ref of each held here (a ref lent in a call's arguments)


@_wire
class Pin(NamedTuple):
    ids: list[str]  # pickled into another value: kept until shutdown


@_wire
class Unmapped(NamedTuple):
    reports: list[tuple[str, int]]  # (segment, deliveries consumed): no longer mapped here


ToChild = RunTask | CreateActor | RunCall | CancelTask | CancelCall | Reply | Reclaim | Exit
ToHead = (
    Ready
    | Result
    | Yield
    | Retried
    | Created
    | ActorExit
    | Submit
    | SubmitCall
    | NewActor
    | Kill
    | GetActor
    | CancelRef
    | Put
    | Get
    | Wait
    | CancelRequest
    | Release
    | Hold
    | Pin
    | Unmapped
)


HEADER = 8  # little-endian length of the frame that follows
CHUNK = 1 << 16


class Channel:
    """Length-prefixed frames over one end of a socketpair, with a read buffer.

    We frame ourselves rather than use ``multiprocessing.connection``: importing that package
    was a third of a worker's start-up time. Reads take what the socket has (up to 64 KiB), so
    a burst of small messages costs one system call, not two per message; ``poll`` therefore
    looks at the buffer before the socket.
    """

    def __init__(self, fd: int):
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(True)
        self._buffer = bytearray()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send_bytes(self, data: bytes) -> None:
        header = len(data).to_bytes(HEADER, "little")
        if len(data) <= CHUNK:
            self._sock.sendall(header + data)
        else:
            self._sock.sendall(header)
            self._sock.sendall(data)

    def _frame_ready(self) -> bool:
        buffer = self._buffer
        return len(buffer) >= HEADER and len(buffer) >= HEADER + int.from_bytes(
            buffer[:HEADER], "little"
        )

    def recv_bytes(self) -> bytes:
        buffer = self._buffer
        while not self._frame_ready():
            chunk = self._sock.recv(CHUNK)
            if not chunk:
                raise EOFError("the other end of the channel closed")
            buffer += chunk
        size = int.from_bytes(buffer[:HEADER], "little")
        data = bytes(buffer[HEADER : HEADER + size])
        del buffer[: HEADER + size]
        return data

    def poll(self) -> bool:
        """True when a frame (or EOF) can be received without blocking."""
        if self._frame_ready():
            return True
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def close(self) -> None:
        self._sock.close()


def send(conn: Channel, message: ToChild | ToHead) -> None:
    conn.send_bytes(pickle.dumps(_ENCODE[type(message)](message), protocol=5))


def recv(conn: Channel) -> Any:
    """The next message; the caller ``match``es it against the kinds it may receive."""
    wire = pickle.loads(conn.recv_bytes())
    return _KINDS[wire[0]](*wire[1:])
