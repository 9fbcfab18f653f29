"""Crashes, restarts and clean-up of the multi-process local backend.

Every test kills only processes it started itself (by PID) and checks that nothing of ours is
left: no child process, no shared-memory segment.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch

import miniray
from miniray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    TaskCancelledError,
    WorkerCrashedError,
)
from miniray.runtime import context, segments, shm
from miniray.runtime.local import lifeline
from process_support import gone, wait_until


def backend():
    return context.current()


@miniray.remote(max_retries=0)
def report_pid_then_sleep(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "finished"


@miniray.remote(max_retries=1)
def die_on_first_attempt(marker):
    if not os.path.exists(marker):
        pathlib.Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return "second attempt"


@miniray.remote
class Stateful:
    def __init__(self):
        self.count = 0

    def bump(self):
        self.count += 1
        return self.count

    def pid(self):
        return os.getpid()

    def slow(self, seconds):
        time.sleep(seconds)
        return "done"


def read_pid(path, timeout=20):
    file = pathlib.Path(path)
    wait_until(lambda: file.exists() and file.read_text(), timeout, f"pid file {path}")
    return int(file.read_text())


def test_killed_worker_fails_its_task_fast_without_retries(local_runtime, tmp_path):
    path = str(tmp_path / "pid")
    ref = report_pid_then_sleep.remote(path, 60)
    pid = read_pid(path)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerCrashedError, match="SIGKILL"):
        miniray.get(ref, timeout=10)
    assert time.monotonic() - start < 2.5
    # The pool replaced the worker: new work still runs.
    assert miniray.get(die_on_first_attempt.remote(str(tmp_path / "m")), timeout=30)


def test_cancel_interrupts_a_long_sleep_and_keeps_the_worker(local_runtime, tmp_path):
    path = str(tmp_path / "pid")
    ref = report_pid_then_sleep.remote(path, 60)
    pid = read_pid(path)
    start = time.monotonic()
    miniray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        miniray.get(ref, timeout=10)
    assert time.monotonic() - start < 5  # the signal cuts time.sleep short
    assert pid in backend().child_pids()  # the worker lives on and takes the next task
    assert miniray.get(report_pid_then_sleep.remote(str(tmp_path / "next"), 0), timeout=30)


def test_force_cancel_kills_the_worker_and_the_pool_replaces_it(local_runtime, tmp_path):
    path = str(tmp_path / "pid")
    ref = report_pid_then_sleep.remote(path, 60)
    pid = read_pid(path)
    miniray.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        miniray.get(ref, timeout=10)
    wait_until(lambda: gone([pid]), timeout=10, what=f"worker {pid} to be killed")
    assert miniray.get(report_pid_then_sleep.remote(str(tmp_path / "next"), 0), timeout=30)


@miniray.remote
def nested_sleeper(path):
    """Blocks in a nested get on a child that sleeps (the child is cancelled with it)."""
    return miniray.get(report_pid_then_sleep.remote(path, 60), timeout=120)


def test_cancel_with_the_only_worker_busy_frees_it_and_fails_the_queue(tmp_path):
    miniray.init(backend="local", num_workers=1)
    try:
        path = str(tmp_path / "pid")
        holder = report_pid_then_sleep.remote(path, 60)
        read_pid(path)
        dependent = echo_value.remote(holder)
        independent = echo_value.remote("runs")
        miniray.cancel(holder)
        for ref in (holder, dependent):
            with pytest.raises(TaskCancelledError):
                miniray.get(ref, timeout=10)
        assert miniray.get(independent, timeout=10) == "runs"
        # A task blocked in get() on its child: recursive cancel stops both, the worker that
        # was lent while it blocked included, and the pool is whole again.
        parent = nested_sleeper.remote(str(tmp_path / "child"))
        read_pid(str(tmp_path / "child"))
        miniray.cancel(parent)
        with pytest.raises(TaskCancelledError):
            miniray.get(parent, timeout=10)
        assert miniray.get(echo_value.remote("again"), timeout=10) == "again"
    finally:
        miniray.shutdown()


@miniray.remote
def echo_value(value):
    return value


@miniray.remote(max_task_retries=1)
class CrashesOnSecondAttempt:
    """Attempt 1 raises (a listed exception), attempt 2 kills the process; counted in a file."""

    def attempt(self, path):
        with open(path, "a") as f:
            f.write("x")
        attempts = len(pathlib.Path(path).read_text())
        if attempts == 1:
            raise ConnectionError("first attempt")
        if attempts == 2:
            os._exit(1)
        return attempts


def test_exception_retries_and_crash_retries_share_max_task_retries(local_runtime, tmp_path):
    path = str(tmp_path / "attempts")
    actor = CrashesOnSecondAttempt.options(max_restarts=2).remote()
    call = actor.attempt.options(retry_exceptions=[ConnectionError])
    with pytest.raises(ActorUnavailableError):  # the one retry went to the exception
        miniray.get(call.remote(path), timeout=30)
    assert pathlib.Path(path).read_text() == "xx"
    assert miniray.get(actor.attempt.remote(path), timeout=30) == 3  # restarted, and alive


def test_killed_worker_task_is_retried(local_runtime, tmp_path):
    marker = str(tmp_path / "marker")
    assert miniray.get(die_on_first_attempt.remote(marker), timeout=30) == "second attempt"


def test_killed_actor_fails_pending_get_fast_and_later_calls(local_runtime):
    actor = Stateful.remote()
    pid = miniray.get(actor.pid.remote(), timeout=30)
    pending = actor.slow.remote(60)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RayActorError, match="SIGKILL"):
        miniray.get(pending, timeout=10)
    assert time.monotonic() - start < 2.5
    with pytest.raises(ActorDiedError):
        miniray.get(actor.bump.remote(), timeout=10)


def test_actor_restarts_rerun_init_until_restarts_run_out(local_runtime):
    actor = Stateful.options(max_restarts=1).remote()
    assert miniray.get([actor.bump.remote() for _ in range(3)], timeout=30) == [1, 2, 3]
    first_pid = miniray.get(actor.pid.remote(), timeout=30)
    in_flight = actor.slow.remote(60)
    time.sleep(0.2)
    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(ActorUnavailableError):
        miniray.get(in_flight, timeout=10)
    assert miniray.get(actor.bump.remote(), timeout=30) == 1  # __init__ ran again
    second_pid = miniray.get(actor.pid.remote(), timeout=30)
    assert second_pid != first_pid
    os.kill(second_pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError):
        miniray.get(actor.bump.remote(), timeout=10)


def test_max_task_retries_reruns_the_in_flight_call_after_restart(local_runtime):
    actor = Stateful.options(max_restarts=1, max_task_retries=1).remote()
    pid = miniray.get(actor.pid.remote(), timeout=30)
    in_flight = actor.slow.remote(1.0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    assert miniray.get(in_flight, timeout=30) == "done"


def test_kill_with_restart_allowed_restarts(local_runtime):
    actor = Stateful.options(max_restarts=2).remote()
    miniray.get(actor.bump.remote(), timeout=30)
    miniray.kill(actor, no_restart=False)
    wait_until(
        lambda: _safe_call(actor) == 1, timeout=20, what="the actor to come back with fresh state"
    )


@miniray.remote(max_restarts=0)
class SlowToDie:
    def pid(self):
        return os.getpid()

    def close_channel_and_hang(self, seconds):
        """Shut down this process's sending side of its channel (the fd is the worker's last
        argument), then sleep: the head reads EOF at once, and the process exits only when the
        head SIGKILLs it after its grace period. Both are libc calls through ``PyDLL``, which
        keeps the GIL held from before the EOF on: the receiver thread, woken when the head
        closes its end, must never run (it would exit, with code 0, at once).
        """
        import ctypes
        import socket

        libc = ctypes.PyDLL(None)
        libc.shutdown(int(sys.argv[-1]), socket.SHUT_WR)
        libc.sleep(seconds)


def test_a_healthy_actor_answers_fast_while_another_child_is_reaped(local_runtime):
    """Waiting for a dead child to exit happens off the head's lock and off the router: the
    head's old popen.wait(timeout=1.0) under the lock stalled every call for up to a second."""
    from miniray.runtime.local.processes import EXIT_GRACE_S

    healthy, dying = Stateful.remote(), SlowToDie.remote()
    miniray.get([healthy.bump.remote(), dying.pid.remote()], timeout=30)
    dying_pid = miniray.get(dying.pid.remote(), timeout=30)
    start = time.monotonic()
    death = dying.close_channel_and_hang.remote(30)
    latencies = []
    while not miniray.wait([death], timeout=0)[0]:
        assert time.monotonic() - start < 20, "the dying actor was never reaped"
        sent = time.monotonic()
        miniray.get(healthy.bump.remote(), timeout=10)
        latencies.append(time.monotonic() - sent)
    took = time.monotonic() - start
    # The death was handled once the head killed the lingering process after its grace period,
    # and the error still names the process and the signal.
    assert took >= EXIT_GRACE_S / 2, took
    with pytest.raises(ActorDiedError, match=rf"pid {dying_pid}, killed by signal SIGKILL"):
        miniray.get(death, timeout=10)
    assert max(latencies) < 0.1, f"slowest call {max(latencies):.3f}s of {len(latencies)}"
    assert len(latencies) >= 5, latencies  # calls did run while the dying actor lingered
    assert miniray.get(healthy.bump.remote(), timeout=10) == len(latencies) + 2


def _safe_call(actor):
    try:
        return miniray.get(actor.bump.remote(), timeout=10)
    except RayActorError:
        return None


def test_shutdown_leaves_no_process_and_no_segment():
    miniray.init(backend="local", num_workers=2)
    actors = [Stateful.remote() for _ in range(2)]
    miniray.get([a.bump.remote() for a in actors], timeout=30)
    big = miniray.put(torch.ones(2_000_000))
    assert miniray.get(big, timeout=10).shape == (2_000_000,)
    head = backend()
    pids = head.child_pids()
    session = head.session_id
    assert len(pids) == 4
    assert shm.list_session(session)
    start = time.monotonic()
    miniray.shutdown()
    assert time.monotonic() - start < 3
    assert gone(pids)
    assert shm.list_session(session) == []


def settle():
    gc.collect()
    miniray.get(miniray.put(1), timeout=5)  # any call drains the queue of released refs
    time.sleep(0.2)
    miniray.get(miniray.put(1), timeout=5)


def test_freed_segment_is_reused_for_the_next_large_value(local_runtime):
    session = backend().session_id
    ref = miniray.put(torch.ones(1_000_000))
    names = shm.list_session(session)
    assert len(names) == 1
    del ref
    settle()
    ref = miniray.put(torch.full((1_000_000,), 2.0))
    assert shm.list_session(session) == names  # same file, no new pages
    assert float(miniray.get(ref, timeout=5).sum()) == 2_000_000


def test_a_dropped_value_is_freed_without_another_call_and_put_after_put_reuses_it(
    local_runtime,
):
    """Releases of the driver's refs were counted only when the router next turned, which an
    idle session never did: a loop of put and drop kept every value, a new segment each,
    until shutdown (a 1 GB state dict: 0.75-4 s per put, 1 GB of /dev/shm more each time)."""
    session = backend().session_id
    ref = miniray.put(torch.ones(1_000_000))
    (name,) = shm.list_session(session)
    del ref
    gc.collect()
    wait_until(lambda: shm.list_free(session) == [name], timeout=5)  # no miniray call between
    for fill in (2.0, 3.0, 4.0):
        ref = miniray.put(torch.full((1_000_000,), fill))
        del ref  # and the next put at once
    assert [n.removesuffix(shm.FREE_SUFFIX) for n in shm.list_session(session)] == [name]


def test_segment_still_mapped_by_the_driver_is_not_overwritten(local_runtime):
    ref = miniray.put(torch.ones(1_000_000))
    held = miniray.get(ref, timeout=5)
    del ref
    settle()
    for fill in (2.0, 3.0):
        miniray.get(miniray.put(torch.full((1_000_000,), fill)), timeout=5)
        settle()
    assert float(held.sum()) == 1_000_000


def test_segment_still_mapped_by_an_actor_is_not_overwritten(local_runtime):
    store = Holder.remote()
    ref = miniray.put(torch.ones(1_000_000))
    assert miniray.get(store.hold.remote(ref), timeout=30) == 1_000_000
    del ref
    settle()
    for fill in (2.0, 3.0):
        value = torch.full((1_000_000,), fill)
        assert miniray.get(store.echo_sum.remote(value), timeout=30) == fill * 1_000_000
        settle()
    assert miniray.get(store.held_sum.remote(), timeout=30) == 1_000_000


def test_repeated_large_transfers_reuse_a_bounded_set_of_segments(local_runtime):
    session = backend().session_id
    store = Holder.remote()
    counts = []
    for i in range(6):
        back = miniray.get(store.echo.remote(torch.full((2_000_000,), float(i))), timeout=30)
        assert float(back[0]) == i
        del back
        settle()
        counts.append(len(shm.list_session(session)))
    assert max(counts) <= 4, counts
    assert counts[-1] == counts[2], counts  # steady state: nothing new is created


def test_an_actor_reads_each_value_of_a_pooled_segment_through_the_mapping_it_kept(
    local_runtime,
):
    # A sync sends each reader the values its creator writes into the same pooled segment: the
    # reader keeps its mapping (large segments only) and sees every new value through it.
    session = backend().session_id
    reader = Holder.remote()
    n = segments.MIN_KEPT_BYTES // 4 + 1024
    seen, names = [], []
    for fill in (1.0, 2.0, 3.0):
        ref = miniray.put(torch.full((n,), fill))
        names.append(shm.list_session(session))
        seen.append(miniray.get(reader.sum_and_reuses.remote(ref), timeout=30))
        del ref
        settle()
    assert names[0] == names[1] == names[2] and len(names[0]) == 1  # one segment, rewritten
    assert seen == [(fill * n, reused) for fill, reused in ((1.0, 0), (2.0, 1), (3.0, 2))]


@miniray.remote
class Holder:
    def sum_and_reuses(self, value):
        return float(value.sum()), segments.POOL.kept.reused

    def hold(self, tensor):
        self.tensor = tensor
        return tensor.shape[0]

    def held_sum(self):
        return float(self.tensor.sum())

    def echo(self, value):
        return value

    def echo_sum(self, value):
        return float(value.sum())


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import miniray
    from miniray.runtime import context

    @miniray.remote
    class Holder:
        def hold(self, t):
            self.t = t
            return t.shape[0]

    miniray.init(backend="local", num_workers=2)
    holders = [Holder.remote() for _ in range(2)]
    ref = miniray.put(torch.ones(1_000_000))
    print(miniray.get([h.hold.remote(ref) for h in holders], timeout=60), file=sys.stderr)
    head = context.current()
    print(json.dumps({"pids": head.child_pids(), "session": head.session_id}), flush=True)
    if sys.argv[1] == "hang":
        time.sleep(600)
    """
)


def run_driver(tmp_path, mode):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    line = proc.stdout.readline()
    assert line, "the driver script printed nothing"
    return proc, json.loads(line)


def test_driver_exit_without_shutdown_cleans_up(tmp_path):
    proc, info = run_driver(tmp_path, "exit")
    assert proc.wait(timeout=30) == 0
    wait_until(lambda: gone(info["pids"]), timeout=5, what="children to exit")
    assert shm.list_session(info["session"]) == []


def test_driver_killed_with_sigkill_cleans_up(tmp_path):
    proc, info = run_driver(tmp_path, "hang")
    assert len(info["pids"]) == 4
    assert shm.list_session(info["session"])
    proc.kill()
    proc.wait(timeout=10)
    wait_until(lambda: gone(info["pids"]), timeout=5, what="children to notice the driver died")
    wait_until(
        lambda: shm.list_session(info["session"]) == [], timeout=5, what="segments to be swept"
    )


def test_workers_that_cannot_start_fail_init_fast_with_the_cause(monkeypatch):
    from miniray.exceptions import RaySystemError
    from miniray.runtime.local import processes

    monkeypatch.setattr(processes, "WORKER_COMMAND", ("-c", "import sys; sys.exit(3)"))
    start = time.monotonic()
    with pytest.raises(RaySystemError, match="exited with code 3"):
        miniray.init(backend="local", num_workers=2)
    assert time.monotonic() - start < 10
    assert not miniray.is_initialized()


@miniray.remote(max_calls=2)
def worker_pid():
    return os.getpid()


def test_max_calls_replaces_the_worker_after_that_many_calls(local_runtime):
    pids = [miniray.get(worker_pid.remote(), timeout=30) for _ in range(6)]
    for pid in set(pids):
        assert pids.count(pid) <= 2, pids
    assert len(backend().child_pids()) == 2


def test_a_failing_router_fails_waiting_calls_fast(monkeypatch, capsys):
    from miniray.exceptions import RaySystemError
    from miniray.runtime.local import protocol
    from miniray.runtime.local.head import LocalBackend

    original = LocalBackend.handle

    def broken(self, child, message):
        if isinstance(message, protocol.Result):
            raise RuntimeError("injected bug in the head")
        return original(self, child, message)

    monkeypatch.setattr(LocalBackend, "handle", broken)
    miniray.init(backend="local", num_workers=1)
    try:
        start = time.monotonic()
        with pytest.raises(RaySystemError, match="injected bug"):
            miniray.get(worker_pid.remote(), timeout=60)
        assert time.monotonic() - start < 10
    finally:
        miniray.shutdown()
    assert "router thread failed" in capsys.readouterr().err


# -- children die with the driver, even when they cannot run Python (issue 21, item 6) --------

STUCK_DRIVER = textwrap.dedent(
    """
    import ctypes, json, os, sys, time
    import numpy as np
    import miniray
    from miniray.runtime import context

    @miniray.remote(max_retries=0)
    def hold_the_gil(path):
        with open(path + ".part", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".part", path)
        # libc sleep() called through PyDLL keeps the GIL for the whole call, as a long C
        # extension call does: no Python thread of this worker runs until it returns.
        ctypes.PyDLL(None).sleep(600)

    miniray.init(backend="local", num_workers=2)
    kept = miniray.put(np.ones(2_000_000))  # a segment for the clean-up to sweep
    ref = hold_the_gil.remote(sys.argv[1])
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    head = context.current()
    info = {"pids": head.child_pids(), "stuck": int(open(sys.argv[1]).read()),
            "session": head.session_id}
    print(json.dumps(info), flush=True)
    time.sleep(600)
    """
)


def kill_if_alive(pids):
    """Test clean-up: orphans of a killed driver are not our children, so conftest cannot see
    them; kill the ones this test started by PID."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                os.kill(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def test_a_child_holding_the_gil_dies_with_a_killed_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(STUCK_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "pid")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    info = {"pids": []}
    try:
        line = proc.stdout.readline()
        assert line, "the driver script printed nothing"
        info = json.loads(line)
        assert info["stuck"] in info["pids"]
        assert shm.list_session(info["session"])
        proc.kill()
        proc.wait(timeout=10)
        # Its receiver thread sees the driver go but cannot get the GIL to act on it: only the
        # kernel (the parent-death signal) can end this process before sleep() returns.
        wait_until(lambda: gone(info["pids"]), timeout=5, what="children to die with the driver")
        wait_until(
            lambda: shm.list_session(info["session"]) == [], timeout=5, what="segments swept"
        )
    finally:
        proc.kill()
        proc.wait(timeout=10)
        kill_if_alive(info["pids"])
        if "session" in info:
            shm.unlink_session(info["session"])


def test_children_outlive_the_thread_that_started_them():
    """The kernel sends the parent-death signal when the *thread* that forked a child ends, not
    the process: children started from a thread that ends must not die with it."""
    thread = threading.Thread(target=miniray.init, kwargs={"backend": "local", "num_workers": 1})
    thread.start()
    thread.join()  # init returns once the worker is up, so it asked for the signal already
    try:
        (worker,) = backend().child_pids()
        made = []

        def create_and_use():
            made.append(Stateful.remote())
            made.append(miniray.get(made[0].pid.remote(), timeout=30))

        thread = threading.Thread(target=create_and_use)
        thread.start()
        thread.join()
        actor, actor_pid = made
        time.sleep(0.5)  # a parent-death signal would have arrived by now
        assert not gone([worker, actor_pid])
        assert miniray.get(actor.bump.remote(), timeout=30) == 1
        assert miniray.get(worker_pid.remote(), timeout=30) == worker
    finally:
        miniray.shutdown()


def test_a_child_whose_driver_died_before_it_asked_for_the_signal_exits():
    """The race die_with_parent closes: the driver died between fork and prctl, so no signal
    will ever come; the child sees that its parent is not the driver any more."""
    code = "from miniray.runtime.local import lifeline; lifeline.die_with_parent(); print('ran')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ours = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, lifeline.ENV_PARENT_PID: str(os.getpid())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (ours.returncode, ours.stdout) == (0, "ran\n")
    orphaned = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, lifeline.ENV_PARENT_PID: str(os.getppid())},  # not its parent: "died"
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (orphaned.returncode, orphaned.stdout) == (0, "")


# -- a full shared-memory directory (issue 21, item 3) ----------------------------------------


@miniray.remote(max_retries=0)
def make_ones(n):
    return torch.ones(n)


def test_a_value_too_large_for_shared_memory_is_a_clear_error(monkeypatch):
    """Docker's 64 MB /dev/shm, in small: a 100 MB tensor used to SIGBUS the process writing it
    (the driver, with no Python error; a worker, "killed by signal SIGBUS")."""
    from miniray.exceptions import ObjectStoreFullError
    from tmpfs_support import small_tmpfs

    big = torch.ones(25 << 20)  # 100 MiB
    with small_tmpfs(16) as directory:
        monkeypatch.setenv(shm.ENV_SHM_DIR, directory)
        miniray.init(backend="local", num_workers=2)
        try:
            workers = backend().child_pids()
            with pytest.raises(ObjectStoreFullError, match=f"{directory} is full"):
                miniray.put(big)
            with pytest.raises(ObjectStoreFullError, match="--shm-size"):
                make_ones.remote(big)  # as an argument: refused in the driver, never sent
            # Returned by a worker: the task fails with the error (the worker lives on).
            with pytest.raises(Exception, match=f"ObjectStoreFullError: .*{directory} is full"):
                miniray.get(make_ones.remote(25 << 20), timeout=60)
            # The runtime works on, through the same directory.
            store = Holder.remote()
            small = torch.full((1 << 20,), 2.0)  # 4 MiB: a segment
            assert miniray.get(store.echo_sum.remote(small), timeout=30) == 2.0 * (1 << 20)
            assert float(miniray.get(make_ones.remote(1 << 20), timeout=30).sum()) == 1 << 20
            assert os.listdir(directory)  # the segments are there, not in /dev/shm
            pids = backend().child_pids()
            assert set(workers) <= set(pids)  # no process died of it
        finally:
            miniray.shutdown()
        assert gone(pids)
        assert os.listdir(directory) == []


@miniray.remote
class RefKeeper:
    """Keeps the refs it is lent inside its arguments, as a rollouter keeps the last weights."""

    def keep(self, refs):
        (self.ref,) = refs
        return float(miniray.get(self.ref, timeout=30).sum())

    def kept_sum(self):
        return float(miniray.get(self.ref, timeout=30).sum())

    def drop(self):
        self.ref = None
        return True


def test_refs_lent_in_an_actor_calls_arguments_live_as_long_as_someone_keeps_them(
    local_runtime,
):
    # A ref inside a call's arguments used to pin its object until shutdown: a model handed
    # over as refs=[weights] at every sync stayed in shared memory, one copy per sync. Now the
    # call keeps it until it ends, and the actor for as long as it keeps the ref.
    session = backend().session_id
    keeper = RefKeeper.remote()
    n = (8 << 20) // 4
    for fill in (1.0, 2.0, 3.0, 4.0):
        ref = miniray.put(torch.full((n,), fill))
        assert miniray.get(keeper.keep.remote([ref]), timeout=30) == fill * n
        last = ref.hex()
        del ref
        settle()
        # The kept value and the one before it (still mapped until the next get) at most.
        assert len(shm.list_session(session)) <= 2
    # The driver dropped its ref; the actor's keeps the object.
    assert miniray.get(keeper.kept_sum.remote(), timeout=30) == 4.0 * n
    assert last in backend()._objects
    assert miniray.get(keeper.drop.remote(), timeout=30)
    settle()
    wait_until(lambda: last not in backend()._objects, timeout=10, what="the last value freed")
