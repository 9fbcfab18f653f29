"""WeightPublisher on its own: the snapshot and its extrapolation, the finiteness check, the
background sync (overlap, order, its errors and timeouts), close(), and the blocking mode.

The rollouter is ``rl_fakes.FakeRollouter``: a plain object in async mode (the synchronizer
calls it on helper threads), an inline actor in sync mode (the publisher calls ``.remote``).
The trainer is a small torch fake whose values say which 'step' made them.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch
from rl_fakes import FakeRollouter, config

import miniray
from miniray.rl.errors import NonFiniteWeightsError, ParameterSyncError, ParameterSyncTimeoutError
from miniray.rl.rollouter import as_rl_config
from miniray.rl.weight_publisher import (
    PublishedWeights,
    WeightPublisher,
    check_finite_weights,
    finite_metrics,
)


class TorchTrainer:
    """``get_weights`` returns fresh tensors filled with ``value``; ``poison`` puts a NaN in
    one entry, as a diverged update does."""

    def __init__(self, value: float = 1.0):
        self.value = value
        self.poison: str | None = None

    def set_value(self, value: float) -> None:
        self.value = value

    def get_weights(self) -> dict[str, torch.Tensor]:
        weights = {
            "layer.weight": torch.full((4, 8), float(self.value)),
            "layer.bias": torch.full((8,), float(self.value)),
            "steps": torch.tensor([7]),  # an integer entry: a counter, never extrapolated
        }
        if self.poison is not None:
            weights[self.poison][0] = math.nan
        return weights


class SlowLoadRollouter(FakeRollouter):
    """A load that takes until ``release()`` (at most ``hang_limit`` s) and then succeeds:
    ``FakeRollouter(hang_on="load")`` is a hung one, whose version is never adopted."""

    def load_weights(self, weights, version):
        self._release.wait(self.hang_limit)
        return super().load_weights(weights, version)


@pytest.fixture
def inline():
    miniray.init(backend="inline")
    try:
        yield
    finally:
        miniray.shutdown()


def background(trainer, rollouter, *, extrapolation=0.0, wait_timeout=10.0, **async_training):
    return WeightPublisher(
        trainer,
        rollouter,
        config=config(max_sync_retries=0, **async_training),
        background=True,
        extrapolation=extrapolation,
        wait_timeout=wait_timeout,
        load_timeout=10.0,
    )


def blocking(trainer, rollouter, *, extrapolation=0.0, load_timeout=10.0):
    return WeightPublisher(
        trainer,
        rollouter,
        config=config(),
        background=False,
        extrapolation=extrapolation,
        wait_timeout=10.0,
        load_timeout=load_timeout,
    )


def publisher_in(mode, trainer):
    """A publisher in ``mode`` ("background": async, the rollouter a plain object; "blocking":
    sync mode, the rollouter an inline actor) and its rollouter."""
    if mode == "background":
        rollouter = FakeRollouter()
        return background(trainer, rollouter), rollouter
    rollouter = miniray.remote(FakeRollouter).remote()
    return blocking(trainer, rollouter), rollouter


def events_of(mode, rollouter) -> list[str]:
    if mode == "background":
        return rollouter.get_events()
    return miniray.get(rollouter.get_events.remote(), timeout=10)


def sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("weight-sync")]


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def release_after(rollouter: FakeRollouter, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, rollouter.release)
    timer.start()
    return timer


# -- the snapshot and its extrapolation --------------------------------------------------------
def test_the_snapshot_extrapolates_along_the_last_trained_step(inline):
    snapshot = PublishedWeights(0.5)
    published = []
    for value in (1.0, 3.0, 2.0):
        snapshot.take(TorchTrainer(value).get_weights())
        snapshot.stage()
        assert isinstance(snapshot.get_weights(), miniray.ObjectRef)  # staged: put once
        published.append(miniray.get(snapshot.get_weights(), timeout=10))
    # 1: nothing to extrapolate from; 3 + 0.5 * (3 - 1) = 4; then 2 + 0.5 * (2 - 3) = 1.5,
    # from the trained snapshots (3), not from the extrapolated one (4).
    for weights, expected in zip(published, (1.0, 4.0, 1.5)):
        torch.testing.assert_close(weights["layer.weight"], torch.full((4, 8), expected))
        torch.testing.assert_close(weights["layer.bias"], torch.full((8,), expected))
        assert torch.equal(weights["steps"], torch.tensor([7]))


def test_without_extrapolation_the_snapshot_is_the_ref_put_at_publish(inline):
    snapshot = PublishedWeights()
    with pytest.raises(RuntimeError, match="no weights to publish yet"):
        snapshot.get_weights()
    ref = miniray.put(TorchTrainer(2.0).get_weights())
    snapshot.take(ref)
    snapshot.stage()
    assert snapshot.get_weights() is ref  # no second copy


class GroupLike(TorchTrainer):
    """A trainer that offers ``published_weights`` as ``TrainerGroup`` does: the rank checks
    and puts its own weights; the publisher must pass that ref on, not put a second copy."""

    def __init__(self, value: float = 1.0):
        super().__init__(value)
        self.calls: list[tuple[int, int]] = []
        self.refs: list[miniray.ObjectRef] = []
        self.extrapolations: list[float] = []

    def published_weights(self, step, finite_at, metrics, *, extrapolation=0.0):
        self.calls.append((step, finite_at))
        self.extrapolations.append(extrapolation)
        weights = self.get_weights()
        check_finite_weights(weights, step, finite_at, metrics)
        self.refs.append(miniray.put(weights))
        return self.refs[-1]


@pytest.mark.parametrize("mode", ["background", "blocking"])
def test_a_groups_published_ref_travels_as_it_is(inline, mode, monkeypatch):
    trainer = GroupLike(2.0)
    publisher, rollouter = publisher_in(mode, trainer)
    puts = []
    real_put = miniray.put
    monkeypatch.setattr(miniray, "put", lambda value: puts.append(1) or real_put(value))
    try:
        publisher.publish(1, step=3, metrics={})
        publisher.wait()
        publisher.publish(2, step=5, metrics={})
        publisher.wait()
    finally:
        publisher.close()
    assert trainer.calls == [(3, 0), (5, 3)]  # each check knows the last finite step
    assert len(puts) == 2  # the group's own puts, none by the publisher
    if mode == "background":
        assert publisher.snapshot.get_weights() is trainer.refs[-1]
    loads = [e for e in events_of(mode, rollouter) if e.startswith("load")]
    assert loads == ["load:1", "load:2"]


@pytest.mark.parametrize("extrapolation", [0.0, 1.0])
def test_prepare_asks_a_group_for_the_weights_call_the_publish_will_make(inline, extrapolation):
    trainer = GroupLike(2.0)
    prepared = []
    trainer.prepare_publish = lambda step, finite_at, *, extrapolation: prepared.append(
        (step, finite_at, extrapolation)
    )
    publisher = background(trainer, FakeRollouter(), extrapolation=extrapolation)
    try:
        publisher.prepare(3)
        publisher.publish(1, step=3, metrics={})
        publisher.wait()
        publisher.prepare(5)
    finally:
        publisher.close()
    # The group's checked weights, extrapolated by its rank: the same call either way.
    assert prepared == [(3, 0, extrapolation), (5, 3, extrapolation)]
    assert trainer.extrapolations == [extrapolation]
    assert publisher.snapshot.extrapolation == 0.0  # nothing extrapolated in the driver
    publisher_in("background", TorchTrainer())[0].prepare(1)  # a trainer without it: nothing


def test_the_publisher_sends_the_extrapolated_weights_in_async_mode(inline):
    trainer, rollouter = TorchTrainer(1.0), FakeRollouter()
    publisher = background(trainer, rollouter, extrapolation=1.0)
    try:
        publisher.publish(1, step=1, metrics={})
        publisher.wait()
        assert rollouter.get_state() == {"paused": False, "version": 1, "value": 1.0}
        trainer.set_value(2.0)
        publisher.publish(2, step=2, metrics={})
        publisher.wait()
        assert rollouter.get_state()["value"] == 3.0  # 2 + 1.0 * (2 - 1)
        assert torch.equal(rollouter.weights["steps"], torch.tensor([7]))
    finally:
        publisher.close()


def test_the_blocking_mode_ignores_extrapolation_and_loads_inline(inline):
    rollouter = miniray.remote(FakeRollouter).remote()
    trainer = TorchTrainer(1.0)
    publisher = blocking(trainer, rollouter, extrapolation=1.0)
    try:
        publisher.publish(1, step=1, metrics={})
        trainer.set_value(2.0)
        publisher.publish(2, step=2, metrics={})
        # Loaded by the time publish returned, without a pause (the rollouter is idle), and
        # not extrapolated: that is async mode's guess at the weights its samples train at.
        state = miniray.get(rollouter.get_state.remote(), timeout=10)
        assert state == {"paused": False, "version": 2, "value": 2.0}
        events = miniray.get(rollouter.get_events.remote(), timeout=10)
        assert events == ["load:1", "load:2"]
        assert len(publisher.blocking_ms) == 2 and all(ms >= 0 for ms in publisher.blocking_ms)
        assert not sync_threads()  # nothing ran in the background
    finally:
        publisher.close()


def test_a_blocking_load_that_hangs_fails_at_load_timeout(inline):
    rollouter = miniray.remote(max_concurrency=2)(FakeRollouter).remote(hang_on="load")
    publisher = blocking(TorchTrainer(), rollouter, load_timeout=0.3)
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            publisher.publish(1, step=1, metrics={})
        assert time.monotonic() - start < 5
        assert publisher.blocking_ms == []  # a failed publish is not counted as one
    finally:
        miniray.get(rollouter.release.remote(), timeout=10)
        publisher.close()


def test_for_run_reads_the_mode_and_timeouts_of_the_config(inline):
    base = {
        "data": {"train_files": ["unused.parquet"]},
        "actor_rollout_ref": {"model": {"path": "unused"}},
    }
    timeouts = {"sync_timeout": 5.0, "generation_timeout": 7.0, "weight_extrapolation": 0.5}
    cfg = as_rl_config({**base, "async_training": {"mode": "async", **timeouts}})
    publisher = WeightPublisher.for_run(cfg, TorchTrainer(), FakeRollouter())
    assert (publisher.background, publisher.extrapolating) == (True, True)
    assert (publisher.wait_timeout, publisher.load_timeout) == (2 * 5.0 + 30, 7.0)
    assert publisher.snapshot.extrapolation == 0.5
    cfg = as_rl_config({**base, "async_training": {"mode": "sync", **timeouts}})
    publisher = WeightPublisher.for_run(cfg, TorchTrainer(), FakeRollouter())
    assert (publisher.background, publisher.extrapolating) == (False, False)
    assert publisher.snapshot.extrapolation == 0.0


# -- non-finite weights --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["background", "blocking"])
def test_non_finite_weights_are_refused_naming_step_and_parameter(inline, mode):
    trainer = TorchTrainer()
    publisher, rollouter = publisher_in(mode, trainer)
    try:
        publisher.restore(0, 1)  # finite after step 1 (a checkpoint's weights)
        trainer.poison = "layer.bias"
        metrics = {"loss": math.nan, "grad_norm": 3.0, "lr": 1e-3}
        with pytest.raises(NonFiniteWeightsError) as info:
            publisher.publish(1, step=4, metrics=metrics)
        assert (info.value.step, info.value.parameter) == (4, "layer.bias")
        message = str(info.value)
        assert "step 4: the trainer's weights are not finite: 'layer.bias'" in message
        assert "steps 2-4 (finite after step 1" in message  # where the divergence began
        assert "'loss': nan" in message
        publisher.wait()
        assert events_of(mode, rollouter) == []  # never published, not even paused for
    finally:
        publisher.close()


def test_check_weights_checks_when_asked_or_when_the_step_diverged(inline):
    trainer = TorchTrainer()
    trainer.poison = "layer.weight"
    publisher = background(trainer, FakeRollouter())
    # A finite step not checkpointed is not checked (a full scan of the model per step).
    publisher.check_weights(3, {"loss": 0.5, "grad_norm": 1.0}, always=False)
    with pytest.raises(NonFiniteWeightsError, match=r"step 3: .*'layer\.weight'"):
        publisher.check_weights(3, {"loss": 0.5}, always=True)
    with pytest.raises(NonFiniteWeightsError, match=r"step 3: .*'layer\.weight'"):
        publisher.check_weights(3, {"loss": 0.5, "grad_norm": math.inf}, always=False)
    trainer.poison = None
    publisher.check_weights(4, {"loss": 0.5}, always=True)
    assert publisher.finite_at == 4
    assert finite_metrics({"loss": 1.0, "grad_norm": 2, "lr": math.nan})  # only loss, norm
    assert not finite_metrics({"loss": -math.inf})


def test_check_finite_weights_counts_the_bad_entries_and_names_the_first():
    weights = {
        "a": torch.zeros(2),
        "b": torch.tensor([math.inf]),
        "c": torch.tensor([math.nan]),
    }
    with pytest.raises(NonFiniteWeightsError, match=r"'b' holds NaN or inf \(2 of 3 entries"):
        check_finite_weights(weights, 5, 4, {})
    check_finite_weights({"a": torch.zeros(2)}, 5, 4, {})  # finite: returns


# -- the background sync -----------------------------------------------------------------------
def test_publish_returns_while_the_sync_runs_and_the_snapshot_is_what_travels(inline):
    # The pause waits for release(): the sync reads its weights only after the trainer
    # has moved on, so weights read from the trainer rather than the snapshot would show.
    trainer, rollouter = TorchTrainer(1.0), FakeRollouter(hang_on="pause", hang_limit=10)
    publisher = background(trainer, rollouter)
    try:
        start = time.monotonic()
        publisher.publish(1, step=1, metrics={})
        assert time.monotonic() - start < 2  # did not wait for the slow sync
        wait_for(lambda: "pause" in rollouter.get_events())
        assert "resume" not in rollouter.get_events()  # the sync is still running
        trainer.set_value(9.0)  # the next step changes the live weights meanwhile
        publisher.check()  # nothing failed yet: returns at once
        rollouter.release()
        publisher.wait()
        assert rollouter.get_state() == {"paused": False, "version": 1, "value": 1.0}
        assert rollouter.get_events() == ["pause", "load:1", "resume"]
        assert len(publisher.blocking_ms) == 1
        assert publisher.statistics()["sync_count"] == 1
    finally:
        publisher.close()


def test_a_publish_waits_for_the_previous_sync_so_versions_stay_in_order(inline):
    trainer, rollouter = TorchTrainer(1.0), SlowLoadRollouter()
    publisher = background(trainer, rollouter)
    timer = release_after(rollouter, 0.3)
    try:
        publisher.publish(1, step=1, metrics={})
        trainer.set_value(2.0)
        publisher.publish(2, step=2, metrics={})  # waits for version 1 to be in place
        publisher.wait()
        events = rollouter.get_events()
        assert events == ["pause", "load:1", "resume", "pause", "load:2", "resume"]
        assert rollouter.get_state() == {"paused": False, "version": 2, "value": 2.0}
    finally:
        timer.join()
        publisher.close()


def test_a_failed_background_sync_is_raised_by_check_without_a_publish(inline):
    rollouter = FakeRollouter(fail_loads=5)
    publisher = background(TorchTrainer(), rollouter)
    try:
        publisher.publish(1, step=1, metrics={})
        deadline = time.monotonic() + 5
        with pytest.raises(ParameterSyncError, match=r"version 1 failed .*could not load"):
            while time.monotonic() < deadline:
                publisher.check()
                time.sleep(0.01)
        assert rollouter.get_events()[-1] == "resume"  # the failed sync resumed it
    finally:
        publisher.close()


def test_a_wait_that_runs_out_says_what_it_waited_for(inline):
    rollouter = FakeRollouter(hang_on="load", hang_limit=10)
    publisher = background(TorchTrainer(), rollouter, wait_timeout=0.3)
    try:
        publisher.publish(1, step=1, metrics={})
        with pytest.raises(TimeoutError) as info:
            publisher.wait()
        assert not isinstance(info.value, ParameterSyncError)  # the sync itself is not done
        message = str(info.value)
        assert "the weight sync did not finish within 0.3s" in message
        assert "pause_rollout/load_weights" in message and "async_training.sync_timeout" in message
    finally:
        rollouter.release()
        publisher.close()


def test_a_syncs_own_timeout_reaches_the_caller_as_itself(inline):
    """Regression: concurrent.futures' TimeoutError is the builtin one, which the sync's
    ParameterSyncTimeoutError also is, so wait() took the sync's own timeout for its wait
    running out and replaced the phase that hung with a message blaming the wait."""
    rollouter = FakeRollouter(hang_on="load", hang_limit=10)
    publisher = background(TorchTrainer(), rollouter, sync_timeout=0.3, wait_timeout=10.0)
    try:
        publisher.publish(1, step=1, metrics={})
        with pytest.raises(ParameterSyncTimeoutError) as info:
            publisher.wait()
        assert "load_weights() of" in str(info.value)
        assert "async_training.sync_timeout" in str(info.value)
        assert info.value.result is not None and info.value.result.status == "timeout"
        assert rollouter.get_events()[-1] == "resume"  # resumed despite the hung load
    finally:
        rollouter.release()
        publisher.close()


# -- close() -----------------------------------------------------------------------------------
def test_close_lets_the_running_sync_finish_and_leaves_no_thread(inline):
    rollouter = SlowLoadRollouter()
    publisher = background(TorchTrainer(4.0), rollouter)
    timer = release_after(rollouter, 0.3)
    publisher.publish(1, step=1, metrics={})
    assert sync_threads()  # the sync runs on its own thread
    publisher.close()
    timer.join()
    assert rollouter.get_state() == {"paused": False, "version": 1, "value": 4.0}
    assert not sync_threads()
    publisher.close()  # idempotent


def test_close_awaits_a_sync_a_timed_out_wait_gave_up_on(inline):
    """Regression: wait() dropped a sync it had stopped waiting for, so close() returned at
    once while that sync's thread went on calling a rollouter the run then stopped."""
    rollouter = SlowLoadRollouter(hang_limit=10)
    publisher = background(TorchTrainer(), rollouter, wait_timeout=1.0)
    publisher.publish(1, step=1, metrics={})
    with pytest.raises(TimeoutError, match="did not finish within 1s"):
        publisher.wait()
    timer = release_after(rollouter, 0.3)
    publisher.close()
    timer.join()
    assert rollouter.get_events() == ["pause", "load:1", "resume"]
    assert rollouter.get_state()["version"] == 1
    assert not sync_threads()


def test_close_is_bounded_when_the_sync_never_ends_and_says_so(inline, caplog):
    rollouter = FakeRollouter(hang_on="load", hang_limit=10)
    publisher = background(TorchTrainer(), rollouter, wait_timeout=0.3)
    publisher.publish(1, step=1, metrics={})
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="miniray.rl.weight_publisher"):
        publisher.close()
    assert time.monotonic() - start < 3
    assert "did not finish within 0.3s" in caplog.text
    rollouter.release()
    wait_for(lambda: not sync_threads())  # it ends once its call returns


def test_close_keeps_the_runs_error_and_logs_a_failed_sync(inline, caplog):
    rollouter = FakeRollouter(fail_loads=5)
    publisher = background(TorchTrainer(), rollouter)
    publisher.publish(1, step=1, metrics={})
    with caplog.at_level(logging.WARNING, logger="miniray.rl.weight_publisher"):
        publisher.close()  # does not raise: the run is ending because of another error
    assert "the weight sync running at shutdown failed too" in caplog.text
    assert "could not load" in caplog.text
    assert not sync_threads()
