"""Trainer checkpoint saves killed part-way: what the next save or resume finds and cleans up.

The kill is simulated in-process (as in tests/ps/test_ps_checkpoint.py): one step of the save
raises ``Killed``, a BaseException, and from then on nothing is cleaned up; the leftovers carry
the pid of a process that has exited, as a killed run's would. The real SIGKILL versions are
in tests/faults/test_checkpoint_faults.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_train_checkpoint import MomentumTrainer

from miniray import atomic_dir
from miniray.errors import RayTaskError
from miniray.train import checkpoint as ckpt
from process_support import dead_pid


class Killed(BaseException):
    """The simulated SIGKILL: a BaseException, so no ``except Exception`` handles it."""


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp" in n or ".old-" in n)


def kill_save_at(monkeypatch, save, step, at):
    """Call ``save()`` and kill it at the ``at``-th call of ``step`` (torch_save or rename)."""
    counts = {"torch_save": 0, "rename": 0}
    killed = False
    real = {"torch_save": torch.save, "rename": os.rename, "replace": os.replace}
    real_rmtree = shutil.rmtree

    def patched(name, real_fn):
        def call(*args, **kwargs):
            nonlocal killed
            if killed:
                raise Killed()
            counts[name] += 1
            if name == step and counts[name] == at:
                killed = True
                raise Killed()
            return real_fn(*args, **kwargs)

        return call

    def rmtree(*args, **kwargs):  # a dead process runs no cleanup
        if not killed:
            real_rmtree(*args, **kwargs)

    pid = dead_pid()
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: pid)
        m.setattr(torch, "save", patched("torch_save", real["torch_save"]))
        m.setattr(os, "rename", patched("rename", real["rename"]))
        m.setattr(os, "replace", patched("rename", real["replace"]))
        m.setattr(shutil, "rmtree", rmtree)
        # A kill inside the parameter server's save comes back from the actor call as a
        # RayTaskError, which the trainer's save does not catch either.
        with pytest.raises((Killed, RayTaskError)):
            save()
    assert killed, f"{step} #{at} never happened"


# A periodic save writes worker_0.pt, worker_1.pt, the server's ps/ (renamed into the temporary
# checkpoint: rename 1), trainer.json, and renames the whole into place (rename 2).
PERIODIC_CRASH_POINTS = [("torch_save", 2), ("rename", 1), ("rename", 2)]


@pytest.mark.parametrize(("step", "at"), PERIODIC_CRASH_POINTS)
def test_a_killed_periodic_save_leaves_nothing_after_the_next_save(monkeypatch, tmp_path, step, at):
    with MomentumTrainer(checkpoint_dir=str(tmp_path)) as trainer:
        trainer.train(epochs=2)
        trainer.epoch = 3  # what the save of epoch 3 would be called
        kill_save_at(monkeypatch, trainer.save_checkpoint, step, at)
        assert leftovers(tmp_path), "the killed save left its temporary directory"
        assert ckpt.resolve(tmp_path) == str(tmp_path / "epoch_000002")
        trainer.epoch = 2
        trainer.train(epochs=4)  # saves epochs 3 and 4, cleaning up first
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["epoch_000003", "epoch_000004", "latest"]
    assert ckpt.read_state(ckpt.resolve(tmp_path))["epoch"] == 4


def test_a_killed_save_leaves_nothing_after_a_resume(monkeypatch, tmp_path):
    with MomentumTrainer(checkpoint_dir=str(tmp_path)) as trainer:
        trainer.train(epochs=2)
        trainer.epoch = 3
        kill_save_at(monkeypatch, trainer.save_checkpoint, "torch_save", 2)
    assert leftovers(tmp_path)
    with MomentumTrainer() as resumed:
        assert resumed.resume_from(tmp_path) == 2
        assert leftovers(tmp_path) == []
        resumed.train(epochs=3)
    assert ckpt.read_state(str(tmp_path / "epoch_000002"))["epoch"] == 2


def test_a_save_over_a_checkpoint_killed_between_its_renames_resumes_the_old_one(
    monkeypatch, tmp_path
):
    # Renames: ps/ into the temporary checkpoint (1), the old checkpoint aside (2), the new
    # one into place (3). Killed before 3, the path is missing and the old one is aside.
    target = tmp_path / "best"
    with MomentumTrainer() as trainer:
        trainer.train(epochs=1)
        trainer.save_checkpoint(target)
        trainer.train(epochs=2)
        kill_save_at(monkeypatch, lambda: trainer.save_checkpoint(target), "rename", 3)
    assert not target.exists()
    with MomentumTrainer() as resumed:
        assert resumed.resume_from(target) == 1
        assert leftovers(tmp_path) == []
        assert sorted(os.listdir(tmp_path)) == ["best"]
        resumed.train(epochs=2)


def test_a_live_writers_temporary_directory_is_kept(tmp_path):
    # Another process may be saving into the same directory right now: its temporary
    # directory carries its pid, which is alive, so cleaning up must leave it alone.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = atomic_dir.temp_name(str(tmp_path / "epoch_000009"), "tmp", pid=live.pid)
        os.makedirs(busy)
        with MomentumTrainer(checkpoint_dir=str(tmp_path)) as trainer:
            trainer.train(epochs=1)
        assert os.path.isdir(busy)
    finally:
        live.kill()
        live.wait()
    with MomentumTrainer() as resumed:
        resumed.resume_from(tmp_path)  # its writer is dead now
    assert not os.path.exists(busy)


def test_a_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    # save_checkpoint(checkpoint_dir) by mistake would otherwise delete every epoch_<k> in it.
    (tmp_path / "epoch_000001").mkdir()
    (tmp_path / "latest").write_text("epoch_000001\n")
    with pytest.raises(ValueError, match=r"holds epoch_000001, latest and is not a checkpoint"):
        ckpt.save(str(tmp_path), state={"num_workers": 0}, worker_states=[])
    assert sorted(os.listdir(tmp_path)) == ["epoch_000001", "latest"]
