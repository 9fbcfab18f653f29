"""sync_rollout_weights on the real local backend: success, and dead/hung/raising workers; on a
``ReplicaPool`` (the GKD path), whose statistics say which worker missed a sync."""

from __future__ import annotations

import logging
import re
import time

import pytest
from weight_sync_workers import RolloutWorker, Trainer

import miniray
from miniray.rl.distill.weight_sync import (
    RolloutWeightSyncError,
    RolloutWeightSyncTimeoutError,
    sync_rollout_weights,
)
from miniray.rl.param_sync import ParameterSyncError
from miniray.rl.replica_pool import ReplicaPool

LOGGER = "miniray.rl.distill"


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER)]


def _workers(*modes):
    actor = miniray.remote(RolloutWorker)
    workers = [actor.remote(mode) for mode in modes]
    # Started and answering before the sync's clock starts (an actor start takes ~1 s here).
    miniray.get([w.ping.remote() for w in workers], timeout=60)
    return workers


@pytest.fixture
def kill_after(local_runtime):
    """Actors a test registers here are killed by PID before the runtime shuts down."""
    started = []
    yield started
    for handle in started:
        miniray.kill(handle)


def test_sync_loads_every_worker_and_logs_the_seed_lines(local_runtime, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    workers = _workers("ok", "ok", "ok")
    result = sync_rollout_weights(Trainer(), workers, version=3, timeout=30)
    assert result.version == 3 and result.num_workers == 3
    assert result.bytes == 4 * 8 * 4 + 8 * 8
    states = miniray.get([w.state.remote() for w in workers], timeout=30)
    assert states == [(3, ["layer.bias", "layer.weight"])] * 3
    lines = _messages(caplog)
    assert lines[:3] == [
        "Starting rollout weight synchronization...",
        "Actor weight sync completed",
        "Waiting for rollout weight sync with timeout=30s...",
    ]
    assert re.fullmatch(r"Rollout weight sync completed in \d+\.\d\ds", lines[3])
    assert len(lines) == 4


def test_actor_side_may_be_an_actor_handle(local_runtime):
    trainer = miniray.remote(Trainer).remote()
    (worker,) = _workers("ok")
    assert sync_rollout_weights(trainer, [worker], version=1, timeout=30).version == 1
    assert miniray.get(worker.state.remote(), timeout=30)[0] == 1


def test_a_raising_worker_fails_fast_and_is_named(local_runtime, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    workers = _workers("ok", "raise")
    start = time.monotonic()
    with pytest.raises(RolloutWeightSyncError) as info:
        sync_rollout_weights(Trainer(), workers, version=1, timeout=30)
    assert time.monotonic() - start < 10  # not the 30 s timeout: the error ends the wait
    err = info.value
    assert isinstance(err, ParameterSyncError) and not isinstance(err, TimeoutError)
    assert "rollout_worker_1: raised ValueError: bad weights" in str(err)
    assert list(err.failures) == ["rollout_worker_1"]
    assert err.version == 1 and err.elapsed_s > 0
    last = _messages(caplog)[-1]
    assert re.match(r"Rollout weight sync failed after \d+\.\d\ds: .*rollout_worker_1", last)


def test_a_dead_worker_makes_the_sync_raise_naming_it(local_runtime, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    workers = _workers("ok", "ok")
    miniray.kill(workers[0])
    start = time.monotonic()
    with pytest.raises(RolloutWeightSyncError, match=r"gen-a: died \(ActorDiedError") as info:
        sync_rollout_weights(Trainer(), workers, version=1, timeout=20, names=["gen-a", "gen-b"])
    assert time.monotonic() - start < 10
    assert list(info.value.failures) == ["gen-a"]
    assert "gen-a: died" in _messages(caplog)[-1]


def test_a_hung_worker_raises_at_the_timeout_naming_it(kill_after, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    workers = _workers("ok", "hang")
    kill_after.extend(workers[1:])
    start = time.monotonic()
    with pytest.raises(
        RolloutWeightSyncTimeoutError, match=r"rollout_worker_1 did not load"
    ) as info:
        sync_rollout_weights(Trainer(), workers, version=2, timeout=1.5)
    elapsed = time.monotonic() - start
    assert 1.4 < elapsed < 6
    assert isinstance(info.value, TimeoutError)
    assert info.value.failures == {"rollout_worker_1": "timeout"}
    lines = _messages(caplog)
    assert "Waiting for rollout weight sync with timeout=1.5s..." in lines
    assert re.match(r"Rollout weight sync failed after 1\.\d\ds: timeout: ", lines[-1])


def test_a_worker_that_loads_the_wrong_version_fails(local_runtime):
    workers = _workers("wrong_version")
    with pytest.raises(RolloutWeightSyncError, match="loaded version 4, expected 5"):
        sync_rollout_weights(Trainer(), workers, version=5, timeout=20)


def test_a_hung_actor_side_raises_at_its_own_timeout(local_runtime, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    (worker,) = _workers("ok")
    start = time.monotonic()
    with pytest.raises(RolloutWeightSyncTimeoutError, match=r"actor .* exporting its weights"):
        sync_rollout_weights(Trainer(hang=True), [worker], version=1, timeout=1.0)
    assert time.monotonic() - start < 5
    lines = _messages(caplog)
    assert lines[0] == "Starting rollout weight synchronization..."
    assert "Actor weight sync completed" not in lines
    assert lines[-1].startswith("Rollout weight sync failed after 1.")
    assert miniray.get(worker.state.remote(), timeout=10)[0] == 0  # nothing was loaded


def test_bad_arguments_are_named(local_runtime):
    with pytest.raises(ValueError, match="nccl_timeout=0 is invalid"):
        sync_rollout_weights(Trainer(), [object()], version=1, timeout=0)
    with pytest.raises(ValueError, match="rollout_workers is empty"):
        sync_rollout_weights(Trainer(), [], version=1, timeout=1)


def _pool(workers):
    return ReplicaPool(workers, names=[f"rollout_worker_{i}" for i in range(len(workers))])


def test_on_the_pool_a_dead_worker_is_named_and_the_stats_say_it_missed_the_sync(local_runtime):
    workers = _workers("ok", "ok")
    pool = _pool(workers)
    assert sync_rollout_weights(Trainer(), pool, version=1, timeout=30).num_workers == 2
    miniray.kill(workers[1])
    with pytest.raises(RolloutWeightSyncError, match=r"rollout_worker_1: died") as info:
        sync_rollout_weights(Trainer(), pool, version=2, timeout=30)
    assert list(info.value.failures) == ["rollout_worker_1"]
    stats = pool.statistics(1.0)
    assert [s["missed_syncs"] for s in stats] == [0, 1]
    assert stats[1]["loaded_version"] == 1  # the last sync it took
    with pytest.raises(ValueError, match="names with a ReplicaPool"):
        sync_rollout_weights(Trainer(), pool, version=3, timeout=30, names=["a", "b"])


def test_on_the_pool_a_hung_worker_misses_the_sync_at_the_deadline(kill_after):
    workers = _workers("ok", "hang")
    kill_after.extend(workers[1:])
    pool = _pool(workers)
    with pytest.raises(RolloutWeightSyncTimeoutError, match=r"rollout_worker_1 did not load"):
        sync_rollout_weights(Trainer(), pool, version=2, timeout=1.5)
    stats = pool.statistics(1.0)
    assert [s["loaded_version"] for s in stats] == [2, None]
    assert [s["missed_syncs"] for s in stats] == [0, 1]
