"""What a user sees: metrics files (JSONL, TensorBoard) and the progress bar."""

from __future__ import annotations

import glob
import io
import json

import pytest
from train_workers import RegressionWorker

from miniray.train import DataParallelTrainer, MetricsWriter, read_jsonl
from miniray.train.metrics import jsonable
from miniray.train.progress import EpochProgress, summary, wanted


class SmallTrainer(DataParallelTrainer):
    def __init__(self, **kwargs):
        super().__init__(num_workers=2, backend="inline", **kwargs)

    def create_worker(self, worker_id, **kwargs):
        return RegressionWorker.remote(worker_id, lr=0.1)


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_epochs_and_evaluations_go_to_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    with SmallTrainer(log_dir=str(tmp_path), progress=False) as trainer:
        out = trainer.train(epochs=3)
        trainer.evaluate()
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    train = [r for r in records if r["phase"] == "train"]
    assert [r["epoch"] for r in train] == [1, 2, 3]  # epochs completed
    assert [r["loss"] for r in train] == [h["loss"] for h in out["history"]]
    assert train[0]["num_samples"] == 48 and train[0]["synced"] is True
    (evaluation,) = [r for r in records if r["phase"] == "eval"]
    assert evaluation["epoch"] == 3 and evaluation["num_samples"] == 48
    scalars = tensorboard_scalars(str(tmp_path))
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["train/loss"][0][1] == pytest.approx(out["history"][0]["loss"], rel=1e-6)
    assert "eval/mse" in scalars
    assert "train/synced" not in scalars  # flags are not plotted


def test_tensorboard_can_be_turned_off(tmp_path):
    with SmallTrainer(log_dir=str(tmp_path), tensorboard=False, progress=False) as trainer:
        trainer.train(epochs=1)
    assert glob.glob(str(tmp_path / "events.out.tfevents.*")) == []
    assert len(read_jsonl(str(tmp_path / "metrics.jsonl"))) == 1


def test_a_resumed_run_drops_the_killed_runs_later_records(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    first = MetricsWriter(str(tmp_path), tensorboard=False)
    for epoch in range(1, 6):
        first.write(epoch, {"loss": float(epoch)})
    first.close()
    resumed = MetricsWriter(str(tmp_path), tensorboard=False, resume_epoch=3)
    resumed.write(4, {"loss": 40.0})
    resumed.close()
    assert [(r["epoch"], r["loss"]) for r in read_jsonl(path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    fresh = MetricsWriter(str(tmp_path), tensorboard=False)  # a new run replaces the file
    fresh.close()
    assert read_jsonl(path) == []


def test_jsonable_turns_anything_into_json():
    import torch

    value = {"t": torch.tensor(2.5), "nan": float("nan"), "obj": object, "list": (1, "a")}
    out = jsonable(value)
    json.dumps(out)
    assert out["t"] == 2.5 and out["nan"] == "nan" and out["list"] == [1, "a"]


def test_progress_bar_when_asked(capsys):
    with SmallTrainer(progress=True) as trainer:
        trainer.train(epochs=2)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "2/2" in err and "loss=" in err


def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys):
    with SmallTrainer() as trainer:  # progress=None: automatic; pytest's stderr is no TTY
        trainer.train(epochs=1)
    assert capsys.readouterr().err == ""
    with SmallTrainer(progress=False) as trainer:
        trainer.train(epochs=1)
    assert capsys.readouterr().err == ""


def test_progress_helpers(monkeypatch):
    assert wanted(True) and not wanted(False)
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", tty)
    assert wanted(None)
    assert summary({"loss": 0.123456, "flag": True, "name": "x", "acc": 1}) == "loss=0.1235, acc=1"
    bar = EpochProgress(enabled=True, total=3, initial=1, num_workers=2)
    bar.epoch_started(1)
    bar.workers_done(1, 2)
    assert "epoch 2/3" in tty.getvalue() and "workers 1/2" in tty.getvalue()
    bar.epoch_done({"loss": 0.5})
    bar.workers_done(2, 2)  # e.g. a checkpoint's calls after the epoch: not shown
    bar.close()
    assert "loss=0.5" in tty.getvalue() and "workers 2/2" not in tty.getvalue()
    tty.seek(0)
    tty.truncate()
    disabled = EpochProgress(enabled=False, total=3, initial=0, num_workers=2)
    disabled.epoch_started(0)
    disabled.epoch_done({"loss": 1.0})
    disabled.close()
    assert tty.getvalue() == ""
