"""A run killed with SIGKILL after epoch k and resumed ends bitwise where an uninterrupted run does.

Two processes of tests/train/train_resume_run.py on the local backend (each with its own worker
and server processes): one killed while epoch K runs (the checkpoint of the K epochs before it
is on disk), and one resumed from that checkpoint. The uninterrupted reference runs the same
code in this process on the inline backend while the first one trains: the arithmetic is the
same single-threaded torch either way, so its weights must match bitwise too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import train_resume_run

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_resume_run.py")
EPOCHS = 5
KILL_AT = 3  # epochs 0..2 are done and checkpointed when epoch 3 starts


def run(*args, timeout=240):
    subprocess.run([sys.executable, SCRIPT, *map(str, args)], check=True, timeout=timeout)


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_weights_bitwise(tmp_path):
    ckpt = tmp_path / "ckpt"
    marker = tmp_path / "epoch-started"
    args = [tmp_path / "killed.pt", "--epochs", EPOCHS, "--checkpoint-dir", ckpt]
    args += ["--hang-at-epoch", KILL_AT, "--marker", marker]
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, args)])
    try:
        straight = train_resume_run.run(EPOCHS, backend="inline")
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the run exited early with status {proc.returncode}"
            assert time.monotonic() < deadline, "epoch 3 never started"
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the run's workers and server are processes of their own"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # The runtime's promise, which resuming relies on: the killed run's workers (one of
        # them asleep in train_epoch) do not linger and compete with the resumed run.
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"processes of the killed run still alive: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "killed.pt").exists()
    assert (ckpt / "latest").read_text().strip() == f"epoch_{KILL_AT:06d}"

    run(tmp_path / "resumed.pt", "--epochs", EPOCHS, "--checkpoint-dir", ckpt, "--resume")
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["losses"] == straight["losses"]
    for got, want in zip(
        [*resumed["workers"], resumed["server"]], [*straight["workers"], straight["server"]]
    ):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
