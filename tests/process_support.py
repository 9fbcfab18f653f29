"""Waiting for processes in tests: a bounded poll, "is it gone", and a pid nobody holds.

One copy for the runtime, fault and checkpoint tests (each had its own).
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def wait_until(predicate, timeout=10.0, what="condition", poll=0.05):
    """Poll ``predicate`` until true; an ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def gone(pids):
    """Whether every pid has exited (a zombie, killed but not yet reaped, counts as exited)."""

    def dead(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(dead(pid) for pid in pids)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped: no process has it now (until the
    kernel reuses it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
