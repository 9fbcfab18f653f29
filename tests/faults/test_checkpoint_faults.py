"""Checkpoint saves killed with SIGKILL part-way, then loaded, saved again, or resumed.

This file is also the child: ``python test_checkpoint_faults.py ps|train ...`` starts a save
that stops at a chosen step (the ``at``-th call of os.fsync, a rename, shutil.rmtree or
torch.save), writes a marker file and sleeps; the test SIGKILLs it there, so what is on disk
is exactly what a killed save leaves. The in-process versions of these tests, which simulate
the kill, are tests/ps/test_ps_checkpoint.py and tests/train/test_train_checkpoint_crash.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))  # train_workers

import pytest  # noqa: E402
import torch  # noqa: E402

import miniray  # noqa: E402

MARKER_TIMEOUT_S = 120


# -- the child ---------------------------------------------------------------------------------
def hang_at(step: str, at: int, marker: str) -> None:
    """Make the ``at``-th call of ``step`` write ``marker`` and sleep until killed."""
    counts = {"fsync": 0, "rename": 0, "rmtree": 0, "torch_save": 0}

    def wrap(name, real):
        def call(*args, **kwargs):
            counts[name] += 1
            if name == step and counts[name] == at:
                with open(marker, "w") as f:
                    f.write(f"{step} #{at}\n")
                while True:
                    time.sleep(60)
            return real(*args, **kwargs)

        return call

    os.fsync = wrap("fsync", os.fsync)
    # The writer may move files with either call: both count as the save's renames.
    os.rename = wrap("rename", os.rename)
    os.replace = wrap("rename", os.replace)
    shutil.rmtree = wrap("rmtree", shutil.rmtree)
    torch.save = wrap("torch_save", torch.save)


def ps_tensors(version: int) -> dict[str, torch.Tensor]:
    # Large enough that writing it takes a moment; every entry says which save it is from.
    return {
        "weight.0": torch.full((1 << 18,), float(version)),
        "shard0.momentum.0": torch.full((1 << 18,), -float(version)),
    }


def ps_state(version: int) -> dict:
    return {"version": version, "strategy": "MomentumStrategy", "counters": {"n": version}}


def make_trainer(**kwargs):
    from train_workers import RegressionWorker

    from miniray.train import DataParallelTrainer

    class FaultTrainer(DataParallelTrainer):
        def create_worker(self, worker_id, **kw):
            return RegressionWorker.remote(worker_id, model="mlp", lr=0.05, momentum=0.9)

    kwargs.setdefault("num_workers", 2)
    return FaultTrainer(
        backend="inline", sync_interval=1, sync_strategy="momentum", momentum=0.5, **kwargs
    )


def child(argv: list[str]) -> None:
    kind, path, step, at, marker = argv[0], argv[1], argv[2], int(argv[3]), argv[4]
    if kind == "ps":
        from miniray.ps import checkpoint as ckpt

        hang_at(step, at, marker)
        ckpt.save(path, ps_tensors(7), ps_state(7))
    else:  # train: two epochs checkpointed, then the save of the third one hangs
        with make_trainer(checkpoint_dir=path, progress=False) as trainer:
            trainer.train(epochs=2)
            hang_at(step, at, marker)
            trainer.train(epochs=3)
    raise SystemExit(f"the save finished without reaching {step} #{at}")


# -- the tests ---------------------------------------------------------------------------------
def kill_mid_save(tmp_path, kind: str, path, step: str, at: int) -> None:
    marker = tmp_path / f"reached-{step}-{at}"
    args = [sys.executable, os.path.abspath(__file__), kind, str(path), step, str(at), marker]
    proc = subprocess.Popen([str(a) for a in args])
    try:
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while not marker.exists():
            assert proc.poll() is None, f"the child exited with {proc.returncode} before {step}"
            assert time.monotonic() < deadline, f"the child never reached {step} #{at}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp" in n or ".old-" in n)


def loaded_ps_version(path) -> int:
    from miniray.ps import checkpoint as ckpt

    tensors, state = ckpt.load(str(path))
    version = state["version"]
    assert state["counters"] == {"n": version}
    for key, want in ps_tensors(version).items():
        assert torch.equal(tensors[key], want), f"state.json says {version}, {key} disagrees"
    return version


# Each point of a parameter-server save: files written (fsync 1), the old checkpoint moved
# aside (rename 1), the new one moved into place (rename 2), the old one deleted (rmtree 1).
PS_POINTS = [("fsync", 1), ("rename", 1), ("rename", 2), ("rmtree", 1)]


@pytest.mark.slow
@pytest.mark.parametrize(("step", "at"), PS_POINTS)
def test_ps_save_sigkilled_at_each_step_loads_old_or_new(tmp_path, step, at):
    from miniray.ps import checkpoint as ckpt

    path = tmp_path / "ckpt"
    ckpt.save(str(path), ps_tensors(0), ps_state(0))
    kill_mid_save(tmp_path, "ps", path, step, at)
    assert loaded_ps_version(path) in (0, 7)  # never version 0 with version-7 weights
    assert leftovers(tmp_path), "a save killed part-way leaves its temporary directory"

    ckpt.save(str(path), ps_tensors(8), ps_state(8))  # the killed writer's pid is dead
    assert leftovers(tmp_path) == []
    assert loaded_ps_version(path) == 8


# The trainer's save of epoch 3: worker_1.pt (torch.save 2), the server's ps/ into the temporary
# checkpoint (rename 1), the temporary checkpoint into place (rename 2).
TRAIN_POINTS = [("torch_save", 2), ("rename", 1), ("rename", 2)]


def final_state(trainer) -> list[torch.Tensor]:
    workers = miniray.get([w.get_weights.remote() for w in trainer.workers])
    return [t for ws in workers for t in ws] + miniray.get(
        trainer.param_server.pull_weights.remote()
    )


@pytest.mark.slow
@pytest.mark.parametrize(("step", "at"), TRAIN_POINTS)
def test_train_save_sigkilled_then_resumed_leaves_no_temporary_dirs(tmp_path, step, at):
    ckpt_dir = tmp_path / "ckpt"
    kill_mid_save(tmp_path, "train", ckpt_dir, step, at)
    left = leftovers(ckpt_dir)
    assert left and all(n.startswith("epoch_000003.tmp-") for n in left), left

    with make_trainer(progress=False) as trainer:
        assert trainer.resume_from(ckpt_dir) == 2  # the killed save of epoch 3 never happened
        assert leftovers(ckpt_dir) == []
        trainer.train(epochs=3)
        resumed = final_state(trainer)
    with make_trainer(progress=False) as trainer:
        trainer.train(epochs=3)
        straight = final_state(trainer)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))
    assert sorted(os.listdir(ckpt_dir)) == ["epoch_000001", "epoch_000002", "latest"]


if __name__ == "__main__":
    child(sys.argv[1:])
