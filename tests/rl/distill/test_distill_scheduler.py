"""Schedulers: the exact order of gen/sync/train, versions, staleness, timeouts, overlap."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from miniray.rl.distill.scheduler import (
    Event,
    GenerationTimeoutError,
    TeacherTimeoutError,
    pipeline_depth,
    run_schedule,
)


def _done(value):
    future = Future()
    future.set_result(value)
    return future


class FakeStages:
    """Rollout workers that remember the weights version they hold; a trainer that counts."""

    def __init__(self, *, gen_s=0.0, train_s=0.0, hang_gen_at=None, hang_teacher_at=None):
        self.rollout_version = 0
        self.trainer_version = 0
        self.generated = []  # (batch, version the weights had when generation started)
        self.trained = []  # (batch, generated with version, trainer version)
        self.gen_s, self.train_s = gen_s, train_s
        self.hang_gen_at, self.hang_teacher_at = hang_gen_at, hang_teacher_at
        self.busy = False

    def sync_weights(self, version):
        assert not self.busy, "weights must only be loaded while the rollout workers are idle"
        assert version == self.trainer_version
        self.rollout_version = version

    def start_generation(self, batch_index):
        assert not self.busy, "one generation at a time on the rollout workers"
        self.generated.append((batch_index, self.rollout_version))
        value = {"batch": batch_index, "version": self.rollout_version}
        if batch_index == self.hang_gen_at:
            return Future()  # never completes
        if not self.gen_s:
            return _done(value)
        future = Future()
        self.busy = True

        def work():
            time.sleep(self.gen_s)
            self.busy = False
            future.set_result(value)

        threading.Thread(target=work, daemon=True).start()
        return future

    def start_scoring(self, batch_index, generated):
        assert generated["batch"] == batch_index
        if batch_index == self.hang_teacher_at:
            return Future()
        return _done({"scores_of": batch_index})

    def train(self, batch_index, generated, scores):
        assert scores == {"scores_of": batch_index}
        time.sleep(self.train_s)
        self.trained.append((batch_index, generated["version"], self.trainer_version))
        self.trainer_version += 1
        return {"loss": float(batch_index)}


def _run(scheduler, n, stages=None, **kwargs):
    stages = stages or FakeStages()
    events = []
    records = list(
        run_schedule(
            stages,
            num_batches=n,
            scheduler=scheduler,
            generation_timeout=kwargs.pop("generation_timeout", 5.0),
            teacher_timeout=kwargs.pop("teacher_timeout", 5.0),
            on_event=events.append,
        )
    )
    return stages, events, records


def test_serial_generates_with_the_latest_weights():
    _, events, records = _run("serial", 3)
    assert events == [
        Event("gen", 0, 0),
        Event("train", 0, 0),
        Event("sync", None, 1),
        Event("gen", 1, 1),
        Event("train", 1, 1),
        Event("sync", None, 2),
        Event("gen", 2, 2),
        Event("train", 2, 2),
    ]
    assert [r.staleness for r in records] == [0, 0, 0]


def test_one_step_off_overlaps_generation_of_k_plus_1_with_training_on_k():
    stages, events, records = _run("one_step_off", 4)
    assert events == [
        Event("gen", 0, 0),
        Event("gen", 1, 0),  # no sync: the trainer has not moved yet
        Event("train", 0, 0),
        Event("sync", None, 1),
        Event("gen", 2, 1),
        Event("train", 1, 1),
        Event("sync", None, 2),
        Event("gen", 3, 2),
        Event("train", 2, 2),
        Event("train", 3, 3),
    ]
    assert [(r.batch_index, r.gen_version, r.trainer_version) for r in records] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 2),
        (3, 2, 3),
    ]
    assert [r.staleness for r in records] == [0, 1, 1, 1]
    assert stages.trained == [(r.batch_index, r.gen_version, r.trainer_version) for r in records]


def test_one_step_off_regression_verl_trained_the_first_batch_twice():
    stages, events, records = _run("one_step_off", 6)
    generated = [e.batch for e in events if e.kind == "gen"]
    trained = [e.batch for e in events if e.kind == "train"]
    assert generated == list(range(6)), "every batch generated exactly once"
    assert trained == list(range(6)), "every batch trained exactly once, in order"
    assert [b for b, _ in stages.generated] == list(range(6))
    assert max(r.staleness for r in records) == 1
    assert all(r.staleness == 1 for r in records[1:])  # after warm-up, exactly one step off


def test_two_step_off_runs_two_batches_ahead():
    _, events, records = _run("two_step_off", 5)
    assert events == [
        Event("gen", 0, 0),
        Event("gen", 1, 0),
        Event("gen", 2, 0),
        Event("train", 0, 0),
        Event("sync", None, 1),
        Event("gen", 3, 1),
        Event("train", 1, 1),
        Event("sync", None, 2),
        Event("gen", 4, 2),
        Event("train", 2, 2),
        Event("train", 3, 3),
        Event("train", 4, 4),
    ]
    assert [r.staleness for r in records] == [0, 1, 2, 2, 2]
    assert [r.batch_index for r in records] == list(range(5))


@pytest.mark.parametrize("scheduler", ["serial", "one_step_off", "two_step_off"])
@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_every_batch_once_and_staleness_bounded(scheduler, n):
    stages, _, records = _run(scheduler, n)
    assert [r.batch_index for r in records] == list(range(n))
    assert sorted(b for b, _ in stages.generated) == list(range(n))
    # >= 0: a batch is never generated with weights the trainer has not produced yet.
    assert all(0 <= r.staleness <= pipeline_depth(scheduler) for r in records)
    assert stages.trainer_version == n
    for r in records:  # the scheduler's bookkeeping matches what the workers really held
        assert (r.batch_index, r.gen_version, r.trainer_version) in stages.trained


def test_a_hung_generation_raises_within_the_timeout():
    stages = FakeStages(hang_gen_at=2)
    start = time.monotonic()
    with pytest.raises(
        GenerationTimeoutError, match=r"generation of batch 2 .*generation_timeout=0.3s"
    ):
        _run("one_step_off", 4, stages, generation_timeout=0.3)
    assert time.monotonic() - start < 3
    assert [b for b, _, _ in stages.trained] == [0, 1]


def test_a_hung_teacher_raises_within_the_timeout():
    stages = FakeStages(hang_teacher_at=1)
    with pytest.raises(
        TeacherTimeoutError, match=r"teacher scores of batch 1 .*request_timeout=0.2s"
    ):
        _run("serial", 3, stages, teacher_timeout=0.2)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"trainer.scheduler='three_step_off' is unknown"):
        _run("three_step_off", 2)
    with pytest.raises(ValueError, match="generation_timeout=0 is invalid"):
        _run("serial", 2, generation_timeout=0)


def test_one_step_off_is_faster_than_serial_when_stages_take_time():
    def wall(scheduler):
        start = time.monotonic()
        _, _, records = _run(scheduler, 5, FakeStages(gen_s=0.12, train_s=0.12))
        assert len(records) == 5
        return time.monotonic() - start

    serial, overlapped = wall("serial"), wall("one_step_off")
    # serial ~ 5 * 0.24 s; one_step_off ~ 0.12 + 5 * 0.12 s: generation hides behind training.
    assert overlapped < 0.8 * serial, (serial, overlapped)


def test_timings_are_reported_per_step():
    _, _, records = _run("one_step_off", 3, FakeStages(train_s=0.01))
    assert {"wait_teacher", "train", "wait_gen"} <= set(records[1].timing)
    assert "sync_rollout_weights" in records[1].timing
    assert records[1].timing["train"] >= 0.01
