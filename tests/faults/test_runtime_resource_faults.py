"""The local runtime under resource faults, end to end in a driver process of its own.

* a shared-memory directory far too small (Docker's 64 MB /dev/shm, in small): every large
  value is an ``ObjectStoreFullError`` in Python, where it used to SIGBUS the driver or a
  worker, and the runtime works on afterwards with nothing left in the directory;
* a driver killed with SIGKILL while every kind of child is stuck in a C call that holds the
  GIL (so none of them can run Python to notice): all die at once, and the session's segments
  are swept, those the children created included.

Each test kills only processes it started (by PID) and checks that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from miniray.runtime import shm
from process_support import gone, wait_until
from tmpfs_support import small_tmpfs

pytestmark = pytest.mark.slow


def kill_if_alive(pids):
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                os.kill(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def start_driver(tmp_path, source, *args, env=None):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
    )


SMALL_SHM_DRIVER = """
    import sys
    import torch
    import miniray

    MB = 1 << 18  # float32 elements per MiB

    def expect_full(what, call):
        try:
            call()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            assert "ObjectStoreFullError" in text and "is full" in text, text
            print(what, "refused", flush=True)
        else:
            raise AssertionError(f"{what}: no error")

    @miniray.remote(max_retries=0)
    def ones(n):
        return torch.ones(n)

    @miniray.remote
    class Store:
        def keep(self, n):
            self.value = torch.ones(n)  # stays in the actor
            return float(self.value.sum())

        def make(self, n):
            return torch.full((n,), 3.0)

        def total(self, tensor):
            return float(tensor.sum())

    miniray.init(backend="local", num_workers=2)
    big = torch.ones(100 * MB)
    expect_full("put", lambda: miniray.put(big))
    expect_full("task argument", lambda: ones.remote(big))
    expect_full("task result", lambda: miniray.get(ones.remote(100 * MB), timeout=60))
    store = Store.remote()
    expect_full("actor argument", lambda: store.total.remote(big))
    expect_full("actor result", lambda: miniray.get(store.make.remote(100 * MB), timeout=60))
    # Fill it with live values, then free them: the space comes back.
    held = [miniray.put(torch.ones(4 * MB)) for _ in range(3)]
    expect_full("put into a full directory", lambda: miniray.put(torch.ones(6 * MB)))
    del held
    import gc; gc.collect()
    miniray.get(miniray.put(1), timeout=10)  # any call hands the released refs to the head
    ref = miniray.put(torch.ones(6 * MB))
    assert miniray.get(store.total.remote(ref), timeout=60) == 6 * MB
    assert miniray.get(store.keep.remote(MB), timeout=60) == MB
    assert float(miniray.get(store.make.remote(2 * MB), timeout=60).sum()) == 6 * MB
    assert float(miniray.get(ones.remote(2 * MB), timeout=60).sum()) == 2 * MB
    miniray.shutdown()
    print("done", flush=True)
"""


def test_a_full_shared_memory_directory_is_an_error_in_every_process_not_sigbus(tmp_path):
    with small_tmpfs(16) as directory:
        proc = start_driver(tmp_path, SMALL_SHM_DRIVER, env={shm.ENV_SHM_DIR: directory})
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            proc.kill()
            proc.wait()
        # Before the fix the driver died of SIGBUS (returncode -7) at the first put.
        assert proc.returncode == 0, f"driver exited with {proc.returncode}:\n{err[-3000:]}"
        assert out.split("\n")[:-1] == [
            "put refused",
            "task argument refused",
            "task result refused",
            "actor argument refused",
            "actor result refused",
            "put into a full directory refused",
            "done",
        ]
        assert "SIGBUS" not in err and "died" not in err
        assert os.listdir(directory) == []


STUCK_DRIVER = """
    import ctypes, json, os, re, sys, time
    import numpy as np
    import miniray
    from miniray.runtime import context

    def report(path):
        with open(path + ".part", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".part", path)

    # Two ways user code holds the GIL for good: a C function called through PyDLL (as a C
    # extension that never releases it), and catastrophic regex backtracking (2**60 steps).
    def stuck_in_c():
        ctypes.PyDLL(None).sleep(600)

    def stuck_in_regex():
        re.match(r"(a+)+$", "a" * 60 + "b")

    @miniray.remote(max_retries=0)
    def task(path):
        report(path)
        stuck_in_regex()

    @miniray.remote
    class Actor:
        def make(self):
            return np.ones(1_000_000)  # a segment this process creates, to be swept

        def stuck(self, path, how):
            report(path)
            {"c": stuck_in_c, "regex": stuck_in_regex}[how]()

    out = sys.argv[1]
    miniray.init(backend="local", num_workers=2)
    plain, threaded = Actor.remote(), Actor.options(max_concurrency=2).remote()
    made = [plain.make.remote(), threaded.make.remote()]
    miniray.wait(made, num_returns=2, timeout=60)
    kept = miniray.put(np.ones(2_000_000))
    refs = [
        task.remote(out + "/task"),
        plain.stuck.remote(out + "/plain", "c"),
        threaded.stuck.remote(out + "/threaded", "regex"),
    ]
    names = ["task", "plain", "threaded"]
    while not all(os.path.exists(f"{out}/{n}") for n in names):
        time.sleep(0.05)
    head = context.current()
    stuck = [int(open(f"{out}/{n}").read()) for n in names]
    print(json.dumps({"pids": head.child_pids(), "stuck": stuck, "session": head.session_id}))
    sys.stdout.flush()
    time.sleep(600)
"""


def test_a_killed_driver_takes_every_stuck_child_with_it_and_its_segments_are_swept(tmp_path):
    proc = start_driver(tmp_path, STUCK_DRIVER, str(tmp_path))
    info = {"pids": []}
    try:
        line = proc.stdout.readline()
        assert line, f"the driver printed nothing:\n{proc.stderr.read()[-3000:]}"
        info = json.loads(line)
        assert set(info["stuck"]) <= set(info["pids"]) and len(info["pids"]) == 4
        created_by_children = [
            name
            for name in shm.list_session(info["session"])
            if int(name.split("_")[2]) != proc.pid
        ]
        assert len(created_by_children) == 2
        time.sleep(0.5)  # deep in their C calls by now
        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: gone(info["pids"]), timeout=5, what="every child to die")
        wait_until(
            lambda: shm.list_session(info["session"]) == [], timeout=10, what="segments swept"
        )
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
        kill_if_alive(info["pids"])
        if "session" in info:
            shm.unlink_session(info["session"])
