"""Messages between the driver (head) and the processes it started.

Every message is a tuple whose first item names its kind. They travel pickled over a
socketpair created by the driver for each child: never over a network socket, and only between
processes of one session (see docs/design.md, "What crosses a process boundary").

    head -> child : task, create, call, reply, exit
    child -> head : ready, result, created, submit, submit_call, create_actor, put, get, wait,
                    cancel_request, release, pin, kill, get_actor, cancel
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection
from typing import Any

from miniray.runtime.serialization import Serialized

# A stored value: (is_error, serialized value or error)
Stored = tuple[bool, Serialized]


def send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=5))


def recv(conn: Connection) -> tuple[Any, ...]:
    return pickle.loads(conn.recv_bytes())
