"""Children of the local backend die with their driver, whatever they are running.

A child learns that its driver died on its receiver thread (EOF on its socket). That is a Python
thread: while user code sits in a long C call that holds the GIL (a C extension, a huge regex)
it cannot run, and the child outlived a SIGKILLed driver until the call returned, or forever.
So the kernel ends them, and a process that runs no user code sweeps up after them:

    driver                                   child, in worker.main() before any user code
    spawn thread: Popen() ---------------->  prctl(PR_SET_PDEATHSIG, SIGKILL); the parent is
      (never ends)                           already gone (getppid changed)? exit at once
    janitor process  <-- "pid N" per child
    driver dies:     kernel SIGKILLs every child; the janitor's pipe reaches EOF, it waits
                     for the children it was told of to be gone and sweeps the segments

Two details of the kernel's rule shape this. The signal is sent when the *thread* that forked
the child ends, not the process, so every child is forked from one spawn thread that lives as
long as the process (an actor created from a short-lived user thread would die with it). And a
child killed by SIGKILL cannot sweep its session's segments on EOF as it used to, hence the
janitor. Both are Linux mechanisms; elsewhere children keep relying on their receiver thread.

This file is also the janitor's program (``python -S -I lifeline.py DIR PREFIX``), so it
imports nothing but the standard library, and each role imports what it alone uses inside its
functions: at module level ctypes, subprocess, queue and threading cost the janitor's start
25 ms of CPU against 8 ms without, and every worker 4 ms of subprocess it never calls, while
``init`` starts the janitor and the workers at once on this 2-core machine.
"""

from __future__ import annotations

import _thread
import glob
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import queue
    import subprocess

ENV_PARENT_PID = "MINIRAY_PARENT_PID"
PR_SET_PDEATHSIG = 1
# How long the janitor waits for the driver's children to die before its last sweep (they are
# SIGKILLed by the kernel as the driver exits; this only bounds a pid reused meanwhile).
JANITOR_WAIT_S = 5.0
_LINUX = sys.platform.startswith("linux")


# ---------------------------------------------------------------------------- in the child


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its driver dies; exit now if it already did.

    Call first thing in a child started by ``spawn`` (it reads the driver's pid from the
    environment, and removes it there so the user's own subprocesses do not inherit it).
    """
    parent = os.environ.pop(ENV_PARENT_PID, None)
    if parent is None or not _LINUX:
        return
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    # The arguments after the first as unsigned longs: prctl is variadic, and a C int leaves
    # the upper half of the register undefined, which the kernel reads as part of the signal.
    unused = ctypes.c_ulong(0)
    if prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), unused, unused, unused) != 0:
        return  # refused (a seccomp filter): the receiver thread still handles the common case
    # The driver may have died between our fork and the prctl: then no signal will ever come,
    # and we were reparented (to init or a subreaper).
    if os.getppid() != int(parent):
        os._exit(0)


# --------------------------------------------------------------------------- in the driver

_spawn_lock = _thread.allocate_lock()  # threading's lock without importing threading
_spawn_queue: queue.SimpleQueue | None = None
_spawn_pid = 0  # the process the spawn thread belongs to (a fork has no such thread)


def spawn(args: list[str], *, env: dict[str, str], **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, ...)`` for a child that calls ``die_with_parent``, forked from
    the spawn thread so that its parent-death signal fires only when this process dies."""
    import subprocess

    env = {**env, ENV_PARENT_PID: str(os.getpid())}
    if not _LINUX:
        return subprocess.Popen(args, env=env, **popen_kwargs)
    request = _Request(args, {"env": env, **popen_kwargs})
    _queue().put(request)
    # If this wait is interrupted, the child still starts; it exits when it finds its socket
    # closed, as any child whose driver went away does.
    request.done.wait()
    if request.popen is None:
        raise request.error or RuntimeError("the spawn thread returned nothing")
    return request.popen


class _Request:
    """One Popen for the spawn thread (not a concurrent.futures.Future: importing that module
    costs the janitor, which is this file too, 40 ms)."""

    def __init__(self, args: list[str], kwargs: dict[str, Any]):
        import threading

        self.args = args
        self.kwargs = kwargs
        self.done = threading.Event()
        self.popen: subprocess.Popen | None = None
        self.error: BaseException | None = None


def _queue() -> queue.SimpleQueue:
    global _spawn_queue, _spawn_pid
    import queue
    import threading

    with _spawn_lock:
        if _spawn_queue is None or _spawn_pid != os.getpid():
            _spawn_queue = queue.SimpleQueue()
            _spawn_pid = os.getpid()
            threading.Thread(
                target=_serve, args=(_spawn_queue,), name="miniray-spawn", daemon=True
            ).start()
        return _spawn_queue


def _serve(requests: queue.SimpleQueue) -> None:
    import subprocess

    while True:  # never returns: its end would send every child it forked the signal
        request = requests.get()
        try:
            request.popen = subprocess.Popen(request.args, **request.kwargs)
        except BaseException as exc:
            request.error = exc
        request.done.set()


class Janitor:
    """A process that sweeps a session's segments if the driver dies without shutting down.

    ``watch`` tells it of each child, so that its last sweep comes after they are all gone (a
    dying child may still be creating a segment); ``stop`` ends it at shutdown without a sweep
    (shutdown sweeps itself).
    """

    def __init__(self, directory: str, prefix: str):
        import subprocess

        self._popen = subprocess.Popen(
            [sys.executable, "-S", "-I", os.path.abspath(__file__), directory, prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the driver only, as for the workers
        )
        assert self._popen.stdin is not None
        self._pipe = self._popen.stdin

    def watch(self, pid: int) -> None:
        self._tell(f"pid {pid}\n")

    def stop(self) -> None:
        import subprocess

        self._tell("exit\n")
        try:
            self._pipe.close()
        except OSError:
            pass
        try:
            self._popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()

    def _tell(self, line: str) -> None:
        try:
            self._pipe.write(line.encode())
            self._pipe.flush()
        except (OSError, ValueError):
            pass  # it died (killed from outside): nothing to tell


def _janitor_main(directory: str, prefix: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids = []
    for line in sys.stdin.buffer:  # until EOF: shutdown closed the pipe, or the driver died
        word, _, value = line.decode().partition(" ")
        if word == "exit":
            return
        if word == "pid":
            pids.append(int(value))
    pattern = os.path.join(glob.escape(directory), glob.escape(prefix) + "*")
    _sweep(pattern)  # free the memory now; again once no child can create a segment any more
    deadline = time.monotonic() + JANITOR_WAIT_S
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    _sweep(pattern)


def _sweep(pattern: str) -> None:
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


if __name__ == "__main__":
    _janitor_main(sys.argv[1], sys.argv[2])
