"""The parameter-server checkpoint on disk: written whole or not at all, its parts checked on load.

A crash is simulated in-process at each step of a save: the step raises ``Killed`` (a
BaseException, as nothing catches a SIGKILL) and from then on nothing is cleaned up, which is
what a killed process leaves behind. The leftovers carry the pid of a process that has exited,
as a killed writer's would. The SIGKILL versions (a real child process killed mid-save) are in
tests/faults/test_checkpoint_faults.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from miniray import atomic_dir
from miniray.ps import checkpoint as ckpt
from process_support import dead_pid


class Killed(BaseException):
    """The simulated SIGKILL: a BaseException, so no ``except Exception`` handles it."""


def tensors_of(version: int) -> dict[str, torch.Tensor]:
    # Every tensor says which save it belongs to, so a mix of two saves is visible.
    return {
        "weight.0": torch.full((64,), float(version)),
        "weight.1": torch.full((3, 5), float(version)),
        "shard0.momentum.0": torch.full((64,), -float(version)),
    }


def state_of(version: int) -> dict:
    return {"version": version, "strategy": "AverageStrategy", "counters": {"n": version}}


def loaded_version(path) -> int:
    """The version a load returns, after checking that every part is of that same save."""
    tensors, state = ckpt.load(str(path))
    version = state["version"]
    assert state["counters"] == {"n": version}
    for key, want in tensors_of(version).items():
        assert torch.equal(tensors[key], want), (
            f"state.json says version {version}, but {key} holds {tensors[key].flatten()[0]}"
        )
    return version


def leftovers(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp" in n or ".old-" in n)


# The steps of a save, in order; the crash happens when the step's call count reaches ``at``.
#   fsync 1: files written, not yet synced      rename 1: the old checkpoint moved aside
#   rename 2: the new one moved into place       rmtree 1: the old one being deleted
CRASH_POINTS = [("fsync", 1), ("rename", 1), ("rename", 2), ("rmtree", 1)]


def crash_during_save(monkeypatch, path, version, step, at):
    """Run ``ckpt.save`` and kill it at the ``at``-th call of ``step``, leaving what a kill would."""
    counts = {"fsync": 0, "rename": 0, "rmtree": 0}
    killed = False
    real = {"fsync": os.fsync, "rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}

    def patched(name, real_fn):
        def call(*args, **kwargs):
            nonlocal killed
            if killed:  # a dead process runs no cleanup
                if name == "rmtree":
                    return None
                raise Killed()
            counts[name] += 1
            if name == step and counts[name] == at:
                killed = True
                raise Killed()
            return real_fn(*args, **kwargs)

        return call

    pid = dead_pid()
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: pid)  # the leftovers are a dead writer's
        m.setattr(os, "fsync", patched("fsync", real["fsync"]))
        # The writer may move files with either call: both count as the save's renames.
        m.setattr(os, "rename", patched("rename", real["rename"]))
        m.setattr(os, "replace", patched("rename", real["replace"]))
        m.setattr(shutil, "rmtree", patched("rmtree", real["rmtree"]))
        with pytest.raises(Killed):
            ckpt.save(str(path), tensors_of(version), state_of(version))
    return killed


@pytest.mark.parametrize(("step", "at"), CRASH_POINTS)
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(
    monkeypatch, tmp_path, step, at
):
    path = tmp_path / "ckpt"
    ckpt.save(str(path), tensors_of(0), state_of(0))
    assert crash_during_save(monkeypatch, path, 7, step, at), f"{step} #{at} never happened"
    assert loaded_version(path) in (0, 7)  # never version 0 with version-7 weights

    # The next save removes the dead writer's leftovers and leaves one complete checkpoint.
    ckpt.save(str(path), tensors_of(8), state_of(8))
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(path)) == sorted(ckpt.CHECKPOINT_FILES)
    assert loaded_version(path) == 8


def test_a_save_killed_between_its_renames_leaves_the_old_checkpoint_loadable(
    monkeypatch, tmp_path
):
    # The old one is aside and the new one not yet in place: the path itself is missing for a
    # moment, and a loader must still find the old, complete checkpoint.
    path = tmp_path / "ckpt"
    ckpt.save(str(path), tensors_of(0), state_of(0))
    crash_during_save(monkeypatch, path, 7, "rename", 2)
    assert loaded_version(path) == 0
    # A save that finds the previous checkpoint aside puts it back (rename 1) before anything
    # else: killed again after moving it aside once more (rename 2), version 0 is still there.
    crash_during_save(monkeypatch, path, 9, "rename", 3)
    assert not path.exists()
    assert len([n for n in os.listdir(tmp_path) if ".old-" in n]) == 1
    assert loaded_version(path) == 0


def test_leftovers_of_a_live_writer_are_kept(tmp_path):
    # Another process may be writing the same checkpoint right now: its temporary directory
    # carries its pid, which is alive, so a save here must not delete it.
    path = tmp_path / "ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = atomic_dir.temp_name(str(path), "tmp", pid=live.pid)
        os.makedirs(busy)
        ckpt.save(str(path), tensors_of(1), state_of(1))
        assert os.path.isdir(busy)
    finally:
        live.kill()
        live.wait()
    ckpt.save(str(path), tensors_of(2), state_of(2))  # now its writer is dead
    assert not os.path.exists(busy)
    assert loaded_version(path) == 2


def make_mixed(tmp_path):
    """A checkpoint whose tensors come from version 7 and whose state from version 0."""
    old, new = tmp_path / "v0", tmp_path / "v7"
    ckpt.save(str(old), tensors_of(0), state_of(0))
    ckpt.save(str(new), tensors_of(7), state_of(7))
    shutil.copy(new / ckpt.TENSORS_FILE, old / ckpt.TENSORS_FILE)
    return old


def test_a_checkpoint_whose_parts_disagree_is_refused(tmp_path):
    mixed = make_mixed(tmp_path)
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        ckpt.load(str(mixed))
    message = str(err.value)
    assert str(mixed / ckpt.TENSORS_FILE) in message and "sha256" in message


def test_a_state_file_from_another_save_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    ckpt.save(str(path), tensors_of(3), state_of(3))
    state_file = path / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["version"] = 4
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"state\.json"):
        ckpt.load(str(path))


def test_a_truncated_or_missing_part_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    ckpt.save(str(path), tensors_of(3), state_of(3))
    tensors_file = path / ckpt.TENSORS_FILE
    tensors_file.write_bytes(tensors_file.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"100 bytes.*manifest"):
        ckpt.load(str(path))
    tensors_file.unlink()
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"tensors\.safetensors.*missing"):
        ckpt.load(str(path))


def test_a_manifest_from_another_version_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    ckpt.save(str(path), tensors_of(3), state_of(3))
    manifest = path / ckpt.MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"format_version": 2', '"format_version": 9'))
    with pytest.raises(ValueError, match=r"format_version=9.*reads 2"):
        ckpt.load(str(path))


def write_format_1(path, version):
    """A checkpoint as miniray wrote it before the manifest (format_version 1)."""
    from safetensors.torch import save_file

    os.makedirs(path)
    save_file(tensors_of(version), os.path.join(path, ckpt.TENSORS_FILE))
    with open(os.path.join(path, ckpt.STATE_FILE), "w") as f:
        json.dump({"format_version": 1, **state_of(version)}, f)


def test_format_1_checkpoints_still_load_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old"
    write_format_1(path, 5)
    with caplog.at_level(logging.WARNING, logger="miniray.ps.checkpoint"):
        assert loaded_version(path) == 5
    assert "format_version 1" in caplog.text and str(path) in caplog.text
    # Saving over it replaces it with a checked one.
    ckpt.save(str(path), tensors_of(6), state_of(6))
    assert os.path.isfile(path / ckpt.MANIFEST_FILE)
    assert loaded_version(path) == 6


def test_a_format_1_checkpoint_torn_between_its_renames_is_refused(tmp_path):
    # The old writer renamed tensors.safetensors.tmp, then state.json.tmp: killed in between,
    # the directory holds the new tensors, the old state, and the new state still as .tmp.
    path = tmp_path / "old"
    write_format_1(path, 5)
    os.rename(path / ckpt.STATE_FILE, path / (ckpt.STATE_FILE + ".tmp"))
    write_format_1(tmp_path / "older", 4)
    shutil.copy(tmp_path / "older" / ckpt.STATE_FILE, path / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"state\.json\.tmp"):
        ckpt.load(str(path))


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    # A save replaces the whole directory; one holding something else is not its to delete.
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt.*not a parameter-server checkpoint"):
        ckpt.save(str(tmp_path), tensors_of(1), state_of(1))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_into_an_empty_directory_and_over_a_checkpoint(tmp_path):
    ckpt.save(str(tmp_path), tensors_of(1), state_of(1))  # tmp_path exists and is empty
    assert loaded_version(tmp_path) == 1
    ckpt.save(str(tmp_path), tensors_of(2), state_of(2))
    assert loaded_version(tmp_path) == 2
