"""The remote forms on every backend: ``MessageQueueClient.remote(max_staleness=3)``,
``ParameterSyncManager.remote(config)``, ``ParameterSynchronizer.remote(config, actor_wg,
rollout_wg)`` and synchronizers driving actor handles.

Grouped in one module because the ``runtime`` fixture starts one Ray instance per module
(10-20 s on two cores); the in-process behaviour is tested in test_rl_queue/test_rl_param_sync.
"""

from __future__ import annotations

import pytest
from rl_fakes import (
    SEED_STAT_KEYS,
    WEIGHT_BYTES,
    FakeRollouter,
    FakeTrainer,
    config,
    ship_by_value_to_ray,
)

import miniray
from miniray.rl import (
    MessageQueue,
    MessageQueueClient,
    ParameterSyncError,
    ParameterSynchronizer,
    ParameterSyncManager,
    ParameterSyncTimeoutError,
    ProducerCrashedError,
    PutResult,
    QueueFinished,
    Sample,
    UnifiedParameterSynchronizer,
)


def sample(v_start: int) -> Sample:
    return Sample(prompt_token_ids=[1, 2], response_token_ids=[3, 4, 5], v_start=v_start)


# -- the queue as an actor ----------------------------------------------------------------------
def test_seed_stale_sample_is_not_returned_by_the_actor(runtime):
    queue = MessageQueueClient.remote(max_staleness=3)
    queue.put_samples.remote("sample", param_version=1)
    result = miniray.get(queue.get_samples.remote(current_param_version=5), timeout=30)
    assert result is None


def test_actor_queue_hands_out_fresh_items_and_blocks_with_timeout(runtime):
    queue = MessageQueueClient.remote(max_staleness=3, max_queue_size=4)
    put = miniray.get(queue.put_samples.remote(sample(4), param_version=4), timeout=30)
    assert put is PutResult.ACCEPTED and bool(put)
    got = miniray.get(queue.get_samples.remote(current_param_version=5), timeout=30)
    assert isinstance(got, Sample) and got.v_start == 4
    # A blocked get (one actor thread) does not stop a put (another) from waking it.
    waiting = queue.get_batch.remote(2, 5, timeout=20)
    for v in (5, 6):
        miniray.get(queue.put_samples.remote(sample(v)), timeout=30)
    batch = miniray.get(waiting, timeout=30)
    assert [s.v_start for s in batch] == [5, 6]
    stats = miniray.get(queue.get_statistics.remote(), timeout=30)
    assert stats["accepted"] == 3 and stats["total_consumed"] == 3


def test_producer_crash_reaches_a_remote_consumer(runtime):
    queue = MessageQueueClient.remote(max_staleness=1)
    waiting = queue.get_batch.remote(1, 0, timeout=20)
    miniray.get(queue.close.remote("rollouter died"), timeout=30)
    with pytest.raises(ProducerCrashedError, match="rollouter died"):
        miniray.get(waiting, timeout=30)
    finished = MessageQueueClient.remote()
    miniray.get(finished.close.remote(), timeout=30)
    with pytest.raises(QueueFinished):
        miniray.get(finished.get_batch.remote(1, timeout=5), timeout=30)


def test_remote_and_options_are_not_actor_methods(runtime):
    actor_class = miniray.remote(MessageQueue)
    assert "remote" not in actor_class.methods and "options" not in actor_class.methods
    assert "put_samples" in actor_class.methods
    queue = MessageQueueClient.options(max_concurrency=2).remote(max_queue_size=3)
    stats = miniray.get(queue.get_statistics.remote(), timeout=30)
    assert stats["max_queue_size"] == 3 and stats["staleness_threshold"] == 3


# -- the synchronizer and actor endpoints ------------------------------------------------------
def _actors(**rollouter_kwargs):
    if miniray.backend_name() == "ray":
        ship_by_value_to_ray()
    trainer = miniray.remote(FakeTrainer).remote(value=5.0)
    # Threaded, as a real rollouter must be: it answers pause/resume while loading.
    rollouter = miniray.remote(FakeRollouter).options(max_concurrency=4).remote(**rollouter_kwargs)
    # Wait until both run, so that tight sync timeouts measure the sync, not process start-up.
    miniray.get([trainer.get_calls.remote(), rollouter.get_events.remote()], timeout=60)
    return trainer, rollouter


def test_parameter_sync_manager_remote_actor_mode(runtime):
    trainer, rollouter = _actors()
    manager = ParameterSyncManager.remote(config())
    assert miniray.get(manager.register_workers.remote([trainer], [rollouter]), timeout=30)
    assert miniray.get(manager.sync_parameters.remote(), timeout=30) is True
    assert miniray.get(manager.sync_parameters.remote(), timeout=30) is True
    stats = miniray.get(manager.get_statistics.remote(), timeout=30)
    assert set(stats) >= SEED_STAT_KEYS
    assert stats["is_ready"] is True and stats["current_version"] == 2
    assert stats["last_result"]["bytes"] == WEIGHT_BYTES
    state = miniray.get(rollouter.get_state.remote(), timeout=30)
    assert state == {"paused": False, "version": 2, "value": 5.0}


def test_seed_001_parameter_synchronizer_remote_with_worker_groups(runtime):
    actor_wg, rollout_wg = _actors()
    sync = ParameterSynchronizer.remote(config(), actor_wg, rollout_wg)
    result = miniray.get(sync.sync_weights.remote(), timeout=30)
    assert result is True
    assert miniray.get(sync.get_current_version.remote(), timeout=30) == 1
    # The trainer's new weights reach the rollouter on the next sync, through the object store.
    miniray.get(actor_wg.set_value.remote(9.0), timeout=30)
    assert miniray.get(sync.sync_to_rollouter.remote(2), timeout=30) is True
    assert miniray.get(rollout_wg.get_state.remote(), timeout=30)["value"] == 9.0


def test_handles_in_process_synchronizer_timeout_resumes_actor(runtime):
    trainer, rollouter = _actors(hang_on="load")
    sync = UnifiedParameterSynchronizer(config(sync_timeout=0.5), trainer, rollouter)
    try:
        with pytest.raises(ParameterSyncTimeoutError):
            sync.sync_to_rollouter(1)
        events = miniray.get(rollouter.get_events.remote(), timeout=30)
        assert events[:2] == ["pause", "load:1"] and "resume" in events
        assert sync.get_current_version() == 0
    finally:
        miniray.get(rollouter.release.remote(), timeout=30)


def test_handles_failing_load_is_retried_then_counted(runtime):
    trainer, rollouter = _actors(fail_loads=100)
    sync = UnifiedParameterSynchronizer(config(max_sync_retries=2), trainer, rollouter)
    with pytest.raises(ParameterSyncError, match="could not load"):
        sync.sync_to_rollouter(1)
    events = miniray.get(rollouter.get_events.remote(), timeout=30)
    assert events.count("load:1") == 3 and events[-1] == "resume"
    assert sync.get_statistics()["sync_failures"] == 1


def test_remote_sync_failure_keeps_its_type_and_result(runtime):
    trainer, rollouter = _actors(fail_loads=100)
    manager = ParameterSyncManager.remote(config(max_sync_retries=1))
    miniray.get(manager.register_workers.remote([trainer], [rollouter]), timeout=30)
    with pytest.raises(ParameterSyncError, match="could not load") as info:
        miniray.get(manager.sync_parameters.remote(), timeout=30)
    assert info.value.result.status == "failed" and info.value.result.attempts == 2
    stats = miniray.get(manager.get_statistics.remote(), timeout=30)
    assert stats["sync_failures"] == 1 and stats["current_version"] == 0
