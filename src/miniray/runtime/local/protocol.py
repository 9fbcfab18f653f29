"""Messages between the driver (head) and the processes it started.

Every message is a tuple whose first item names its kind. They travel pickled over a
socketpair created by the driver for each child: never over a network socket, and only between
processes of one session (see docs/design.md, "What crosses a process boundary").

    head -> child : task, create, call, cancel, reply, exit
    child -> head : ready, result, retried, created, submit, submit_call, create_actor, put, get,
                    wait, cancel_request, release, pin, kill, get_actor, cancel
"""

from __future__ import annotations

import pickle
import select
import socket
from typing import Any

from miniray.runtime.serialization import Serialized

# A stored value: (is_error, serialized value or error)
Stored = tuple[bool, Serialized]


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


def send(conn: Channel, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=5))


def recv(conn: Channel) -> tuple[Any, ...]:
    return pickle.loads(conn.recv_bytes())
