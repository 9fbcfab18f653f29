"""The local head's child processes: starting them, sending to them, retiring them, and the
router thread that receives from all of them.

    driver thread (head lock held) --spawn--> lifeline.spawn: a child with one socketpair;
                                              queued for the router's selector, router woken
    router thread: select(children's sockets, the wake socket, the next request deadline)
        --head lock--> events.handle(child, message) / events.died(child) at EOF
                       events.tick(): drains queued work, returns callbacks
        --no lock----> callbacks (futures settle; they may call back into the head)
    reaper threads (reaper.py) --exit status--> exits queue --wake--> router: events.died ...
                                                                      head: drain_exits()

One lock (the head's condition) guards the table of children; only the router thread touches
the selector. Sending happens under the lock: a child drains its socket on a receiver thread
that never blocks, so a send cannot block forever. Nothing here decides what a message means:
that is the head's ``RouterEvents``.
"""

from __future__ import annotations

import itertools
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from miniray.errors import RaySystemError
from miniray.runtime.local import lifeline, protocol, reaper
from miniray.runtime.local.worker import ENV_NAMESPACE, ENV_SESSION, ENV_SYS_PATH

if TYPE_CHECKING:
    from miniray.runtime.local.actors import Actor
    from miniray.runtime.local.scheduler import Task

# -S: no site import (the worker gets the driver's sys.path, .pth entries included);
# -c rather than -m: runpy costs a few ms more at every start.
WORKER_COMMAND = (
    "-S",
    "-c",
    "import os, sys; sys.path[:] = os.environ['MINIRAY_SYS_PATH'].split(os.pathsep); "
    "from miniray.runtime.local.worker import main; main()",
)
EXIT_GRACE_S = 1.0

Kind = Literal["worker", "actor"]


class Child:
    """One child process and its channel."""

    def __init__(self, key: int, kind: Kind, popen: subprocess.Popen, conn: protocol.Channel):
        self.key = key
        self.kind: Kind = kind
        self.popen = popen
        self.conn = conn
        self.ready = False
        self.dead = False
        self.task: Task | None = None  # running task (workers)
        self.actor: Actor | None = None
        self.blocked = 0  # requests it waits on (a blocked worker frees its slot)
        self.known_functions: set[str] = set()
        self.calls: dict[str, int] = {}  # function id -> tasks run (for max_calls)
        self.extra = False  # started while others blocked; retired when idle


class RouterEvents(Protocol):
    """What the router thread calls, with the head lock held."""

    def handle(self, child: Child, message: Any) -> None: ...

    def died(self, child: Child) -> None: ...

    def tick(self) -> list[Callable[[], None]]: ...

    def next_deadline_in(self) -> float | None: ...


class Processes:
    def __init__(self, session_id: str, namespace: str, cond: threading.Condition):
        self.session_id = session_id
        self.namespace = namespace
        self._cond = cond
        self.children: dict[int, Child] = {}
        self._keys = itertools.count(1)
        self.closing = False
        self.start_failure = ""  # why a worker died before it was ready
        self.router_error = ""  # a bug in the head: the traceback
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # Only the router thread touches the selector; others queue new children here.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._unregistered: deque[Child] = deque()
        # Children are waited for on reaper threads, never under the lock (see reaper.py); a
        # dead child's exit status comes back here and the router handles the death.
        self._reaper = reaper.Reaper()
        self._exits: deque[tuple[Child, int]] = deque()
        self._janitor: lifeline.Janitor | None = None
        self._router: threading.Thread | None = None

    # -- children ---------------------------------------------------------------------------
    def spawn(self, kind: Kind) -> Child:
        """Start a child (under the lock); it says Ready once it can take work."""
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env[ENV_SESSION] = self.session_id
        env[ENV_NAMESPACE] = self.namespace
        env[ENV_SYS_PATH] = os.pathsep.join(sys.path)  # (json would cost the child 20 ms)
        env["PYTHONUNBUFFERED"] = "1"
        # The child asks the kernel to kill it when we die (a child stuck in a C call holding
        # the GIL cannot notice by itself); lifeline.spawn forks it from a thread that lives
        # as long as this process, because that signal follows the forking thread.
        popen = lifeline.spawn(
            [sys.executable, *WORKER_COMMAND, str(child_sock.fileno())],
            pass_fds=[child_sock.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the driver only; it shuts us down
        )
        child_sock.close()
        if self._janitor is not None:  # else it is told of every child when it starts
            self._janitor.watch(popen.pid)
        conn = protocol.Channel(parent_sock.detach())
        child = Child(next(self._keys), kind, popen, conn)
        self.children[child.key] = child
        self._unregistered.append(child)
        self.wake()
        return child

    def send(self, child: Child, message: protocol.ToChild) -> bool:
        """Send under the lock; a dead child is handled by the router (EOF)."""
        try:
            protocol.send(child.conn, message)
            return True
        except (OSError, ValueError):
            return False

    def send_reclaim(self, creator_pid: int, name: str) -> bool:
        """Hand a freed segment back to the child that created it, if it lives."""
        child = self.by_pid(creator_pid)
        return child is not None and not child.dead and self.send(child, protocol.Reclaim([name]))

    def await_workers(self, count: int, timeout_s: float) -> str | None:
        """Wait until ``count`` workers are ready; else why not (a worker died, or the time)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self.start_failure:
                if self.ready_workers() >= count:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return self.start_failure or f"workers did not start within {timeout_s:.0f}s"

    def check_open(self) -> None:
        """RaySystemError if the runtime was shut down, or its router thread failed."""
        if self.router_error:
            raise RaySystemError(
                "the local runtime is broken: its router thread failed (a miniray bug, please "
                f"report it); call miniray.shutdown(). Cause:\n{self.router_error}"
            )
        if self.closing:
            raise RaySystemError("the miniray runtime was shut down")

    def workers(self) -> list[Child]:
        """Task workers not known to be dead."""
        return [c for c in self.children.values() if c.kind == "worker" and not c.dead]

    def ready_workers(self) -> int:
        return sum(1 for c in self.children.values() if c.kind == "worker" and c.ready)

    def by_pid(self, pid: int) -> Child | None:
        return next((c for c in self.children.values() if c.popen.pid == pid), None)

    def retire(self, child: Child) -> None:
        """Out of the tables, its channel closed; the caller has the reaper wait for it."""
        self.children.pop(child.key, None)
        try:
            self._selector.unregister(child.conn)
        except (KeyError, ValueError, OSError):
            pass
        try:
            child.conn.close()
        except OSError:
            pass

    def dismiss(self, child: Child) -> None:
        """A healthy child we no longer need (max_calls, an idle extra worker): told to exit,
        retired, and reaped off the lock; its exit is no death to handle."""
        child.dead = True
        self.send(child, protocol.Exit())
        self.retire(child)
        self._reaper.reap(child.popen, EXIT_GRACE_S)

    def await_exit(self, child: Child) -> None:
        """Its socket reached EOF: reap it off the lock; ``drain_exits`` then has its status."""

        def exited(code: int) -> None:  # on a reaper thread
            self._exits.append((child, code))
            self.wake()

        self._reaper.reap(child.popen, EXIT_GRACE_S, exited)

    def drain_exits(self) -> list[tuple[Child, str]]:
        """Children whose exit status came back since the last call, with why they ended."""
        exits = []
        while self._exits:
            child, code = self._exits.popleft()
            exits.append((child, exit_reason(code)))
        return exits

    def start_janitor(self) -> None:
        """Sweeps this session's segments if the driver dies without shutdown (lifeline.py).

        Started once the workers are up: its interpreter's start (15 ms of CPU) slowed theirs
        on 2 cores, and until init returns no segment exists for it to sweep (a driver dying
        before then takes its workers along by their parent-death signal)."""
        from miniray.runtime import shm

        self._janitor = lifeline.Janitor(shm.directory(), shm.session_prefix(self.session_id))
        for child in self.children.values():
            self._janitor.watch(child.popen.pid)

    # -- the router thread --------------------------------------------------------------------
    def wake(self) -> None:
        """Make the router look again (new child, queued work); safe from any thread."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def start_router(self, events: RouterEvents) -> None:
        self._router = threading.Thread(
            target=self._route_forever, args=(events,), name="miniray-router", daemon=True
        )
        self._router.start()

    def _route_forever(self, events: RouterEvents) -> None:
        try:
            self._route(events)
        except BaseException as exc:
            # A bug in the head: say so to every waiter now rather than let them time out.
            with self._cond:
                self.router_error = "".join(traceback.format_exception(exc))
                self._cond.notify_all()
            print(f"miniray: the router thread failed:\n{self.router_error}", file=sys.stderr)

    def _route(self, events: RouterEvents) -> None:
        while not self.closing:
            while self._unregistered:
                child = self._unregistered.popleft()
                if not child.dead:
                    self._selector.register(child.conn, selectors.EVENT_READ, child)
            try:
                ready = self._selector.select(events.next_deadline_in())
            except (OSError, ValueError):
                ready = []
            with self._cond:
                if self.closing:
                    return
                for key, _ in ready:
                    child = key.data
                    if child is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    elif child.key in self.children:
                        self._drain_child(child, events)
                callbacks = events.tick()
                self._cond.notify_all()
            for callback in callbacks:
                callback()

    def _drain_child(self, child: Child, events: RouterEvents) -> None:
        conn = child.conn
        # A message may retire this very child (max_calls, an extra worker going idle): stop then.
        while child.key in self.children:
            try:
                if not conn.poll():
                    return
                message = protocol.recv(conn)
            except (EOFError, OSError):
                events.died(child)
                return
            events.handle(child, message)

    # -- shutdown -----------------------------------------------------------------------------
    def begin_shutdown(self) -> list[Child] | None:
        """Under the lock: tell every child to exit; None if shut down already."""
        if self.closing and not self.children:
            return None
        self.closing = True
        children = list(self.children.values())
        for child in children:
            self.send(child, protocol.Exit())
        return children

    def finish_shutdown(self, children: list[Child]) -> None:
        """Off the lock: stop the router, and wait for (or kill) every child; none outlives it."""
        self.wake()
        if self._router is not None and self._router is not threading.current_thread():
            self._router.join(timeout=5)
        deadline = time.monotonic() + EXIT_GRACE_S
        for child in children:
            try:
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.send_signal(signal.SIGKILL)
                child.popen.wait()
            try:
                child.conn.close()
            except OSError:
                pass
        self._reaper.join()  # children that died or retired earlier: none outlives shutdown
        with self._cond:
            self.children.clear()
        self._wake_r.close()
        self._wake_w.close()

    def stop_janitor(self) -> None:
        if self._janitor is not None:  # None: init failed before starting it
            self._janitor.stop()


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
