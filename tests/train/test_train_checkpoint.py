"""Checkpoint and resume in one process: what a checkpoint holds, where it goes, what it restores.

The SIGKILL version (a real run killed and resumed in fresh processes) is in
test_train_resume.py; these run on the inline backend and check the pieces.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from train_workers import RegressionWorker, WeightsOnlyWorker

import miniray
from miniray.train import DataParallelTrainer, WorkerContractError
from miniray.train import checkpoint as ckpt

# Momentum and shuffled mini-batches: a resume that lost the optimizer's momentum buffers or a
# worker's shuffling generator would produce different weights.
WORKER_OPTIONS = {"model": "mlp", "lr": 0.05, "momentum": 0.9, "batch_size": 8}


class MomentumTrainer(DataParallelTrainer):
    worker_cls = RegressionWorker

    def __init__(self, **kwargs):
        kwargs.setdefault("num_workers", 2)
        kwargs.setdefault("sync_interval", 2)
        kwargs.setdefault("sync_strategy", "momentum")
        kwargs.setdefault("momentum", 0.5)  # a strategy with state: the server's must resume too
        super().__init__(backend="inline", **kwargs)

    def create_worker(self, worker_id, **kwargs):
        return self.worker_cls.remote(worker_id, **WORKER_OPTIONS)


class WeightsOnlyTrainer(MomentumTrainer):
    worker_cls = WeightsOnlyWorker


def final_state(trainer):
    workers = [miniray.get(w.get_weights.remote()) for w in trainer.workers]
    server = miniray.get(trainer.param_server.pull_weights.remote())
    return workers, server


def assert_bitwise_equal(a, b):
    (workers_a, server_a), (workers_b, server_b) = a, b
    for wa, wb in zip([*workers_a, server_a], [*workers_b, server_b]):
        for x, y in zip(wa, wb):
            assert torch.equal(x, y)


def uninterrupted(epochs=5, cls=MomentumTrainer):
    with cls() as trainer:
        out = trainer.train(epochs=epochs)
        return final_state(trainer), out


def test_resume_after_k_epochs_is_bitwise_identical(tmp_path):
    want, want_out = uninterrupted()
    with MomentumTrainer(checkpoint_dir=str(tmp_path)) as first:
        first.train(epochs=3)  # epochs 0..2, then "the machine goes down"
    with MomentumTrainer() as second:
        assert second.resume_from(tmp_path) == 3
        out = second.train(epochs=5)
        got = final_state(second)
        stats = second.get_sync_stats()
    assert_bitwise_equal(got, want)
    assert len(out["history"]) == 5
    for a, b in zip(out["history"], want_out["history"]):
        assert a["loss"] == b["loss"]  # restored history, then the same losses
    # Server state resumed too: syncs after epochs 2 and 4 and the final one after 5.
    assert stats["num_syncs"] == 3


def test_resume_after_the_last_epoch_sync(tmp_path):
    """Resuming exactly at a sync boundary (epoch 4, interval 2) also lands on the same weights."""
    want, _ = uninterrupted()
    with MomentumTrainer(checkpoint_dir=str(tmp_path)) as first:
        first.train(epochs=4)
    with MomentumTrainer() as second:
        second.resume_from(tmp_path)
        second.train(epochs=5)
        assert_bitwise_equal(final_state(second), want)


def test_without_state_dict_only_weights_are_saved_and_resume_differs(tmp_path, caplog):
    want, _ = uninterrupted(cls=WeightsOnlyTrainer)
    level = caplog.at_level(logging.WARNING, logger="miniray.train.trainer")
    with level, WeightsOnlyTrainer(checkpoint_dir=str(tmp_path)) as first:
        first.train(epochs=3)
    assert "has no state_dict()/load_state_dict()" in caplog.text
    state = ckpt.read_state(ckpt.resolve(tmp_path))
    assert state["worker_state"] == "weights"
    with WeightsOnlyTrainer() as second:
        second.resume_from(tmp_path)
        second.train(epochs=5)
        got = final_state(second)
    # Momentum buffers and shuffling restart: the run continues, but not identically. This is
    # what the state_dict contract buys (and shows the bitwise test above can fail).
    assert any(not torch.equal(x, y) for x, y in zip(got[1], want[1])), (
        "weights-only resume should not reproduce the momentum run"
    )


def test_periodic_checkpoints_keep_the_newest_and_point_latest_at_it(tmp_path):
    with MomentumTrainer(
        checkpoint_dir=str(tmp_path), checkpoint_interval=2, num_checkpoints_kept=2
    ) as trainer:
        trainer.train(epochs=7)
    # Every 2 epochs and at the end: 2, 4, 6, 7 -> the newest two remain.
    assert [k for k, _ in ckpt.list_periodic(str(tmp_path))] == [6, 7]
    assert (tmp_path / "latest").read_text().strip() == "epoch_000007"
    assert ckpt.resolve(tmp_path) == str(tmp_path / "epoch_000007")
    state = json.loads((tmp_path / "epoch_000007" / "trainer.json").read_text())
    assert state["epoch"] == 7 and state["num_workers"] == 2 and len(state["history"]) == 7
    assert state["worker_state"] == "state_dict"
    saved = torch.load(tmp_path / "epoch_000007" / "worker_1.pt", weights_only=True)
    assert set(saved) == {"model", "optimizer", "rng"}
    assert saved["optimizer"]["state"], "momentum buffers are in the checkpoint"
    assert os.path.isfile(tmp_path / "epoch_000007" / "ps" / "state.json")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_save_checkpoint_to_a_path_replaces_an_older_one(tmp_path):
    target = tmp_path / "best"
    with MomentumTrainer() as trainer:
        trainer.train(epochs=1)
        assert trainer.save_checkpoint(str(target)) == str(target)
        trainer.train(epochs=2)
        trainer.save_checkpoint(target)
    assert ckpt.read_state(str(target))["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["best"]


def test_checkpoint_errors_are_clear(tmp_path):
    trainer = MomentumTrainer()
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        trainer.resume_from(tmp_path / "nothing-here")
    with pytest.raises(
        ValueError, match=r"save_checkpoint\(\) without a path needs the checkpoint_dir"
    ):
        trainer.save_checkpoint()
    with pytest.raises(TypeError, match=r"path must be a directory name"):
        trainer.save_checkpoint(3)
    with MomentumTrainer(checkpoint_dir=str(tmp_path)) as other:
        other.train(epochs=1)
    three = MomentumTrainer(num_workers=3)
    with pytest.raises(
        ValueError, match=r"the checkpoint has num_workers=2, this trainer num_workers=3"
    ):
        three.resume_from(tmp_path)


def test_resuming_state_dicts_into_workers_without_load_state_dict_is_refused(tmp_path):
    with MomentumTrainer(checkpoint_dir=str(tmp_path)) as first:
        first.train(epochs=1)
    with WeightsOnlyTrainer() as second:
        second.resume_from(tmp_path)
        with pytest.raises(WorkerContractError, match=r"has no method load_state_dict\(\)"):
            second.train(epochs=2)
        # The workers exist but were never restored: training on would silently start over.
        with pytest.raises(RuntimeError, match="failed half-way"):
            second.train(epochs=2)
