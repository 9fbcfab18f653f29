"""UnifiedParameterSynchronizer with fake endpoints: the sync sequence, retries, timeouts,
monotonic versions, the three ways of use (seed 000) and the remote forms (seed 001)."""

from __future__ import annotations

import threading
import time

import pytest
from rl_fakes import (
    SEED_STAT_KEYS,
    WEIGHT_BYTES,
    FakeClock,
    FakeRollouter,
    FakeTrainer,
    SwappingRollouter,
    config,
)

import miniray
from miniray.errors import ActorDiedError, ActorUnavailableError
from miniray.rl import (
    AsyncParameterSynchronizer,
    ParameterSyncError,
    ParameterSynchronizer,
    ParameterSyncManager,
    ParameterSyncTimeoutError,
    UnifiedParameterSynchronizer,
)


def make(trainer=None, rollouter=None, clock=None, **async_training):
    clock = clock or FakeClock()
    sync = UnifiedParameterSynchronizer(
        config(**async_training),
        trainer or FakeTrainer(),
        rollouter or FakeRollouter(),
        clock=clock,
        sleep=clock.sleep,
    )
    return sync, clock


# -- async mode ---------------------------------------------------------------------------------
def test_sync_pauses_loads_bumps_version_and_resumes():
    trainer, rollouter = FakeTrainer(value=7.0), FakeRollouter()
    sync, _ = make(trainer, rollouter)
    assert sync.get_current_version() == 0
    assert sync.sync_to_rollouter(new_version=1) is True
    assert rollouter.events == ["pause", "load:1", "resume"]
    assert rollouter.version == 1 and not rollouter.paused
    assert float(rollouter.weights["layer.weight"][0, 0]) == 7.0
    assert sync.get_current_version() == 1
    stats = sync.get_statistics()
    assert set(stats) >= SEED_STAT_KEYS
    assert "is_ready" not in stats  # only in actor mode
    assert stats["sync_count"] == 1 and stats["sync_failures"] == 0
    assert stats["current_param_version"] == stats["current_version"] == 1
    assert stats["sync_group_initialized"] is True
    assert abs(stats["last_sync_time"] - time.time()) < 60
    last = stats["last_result"]
    assert last["status"] == "ok" and last["attempts"] == 1 and last["resumed"]
    assert last["bytes"] == WEIGHT_BYTES
    assert stats["bytes_total"] == WEIGHT_BYTES
    for phase in ("pause", "transfer", "load", "resume", "total"):
        assert last[f"{phase}_s"] >= 0
        assert stats[f"{phase}_s_p50"] is not None


def test_sync_result_carries_per_phase_timings():
    clock = FakeClock()

    class SlowTrainer(FakeTrainer):
        def get_weights(self):
            clock.advance(2.0)
            return super().get_weights()

    class SlowRollouter(FakeRollouter):
        def pause_rollout(self):
            clock.advance(0.5)
            return super().pause_rollout()

        def load_weights(self, weights, version):
            clock.advance(3.0)
            return super().load_weights(weights, version)

    sync, _ = make(SlowTrainer(), SlowRollouter(), clock=clock)
    result = sync.sync(1)
    assert result.ok
    assert (result.pause_s, result.transfer_s, result.load_s) == (0.5, 2.0, 3.0)
    assert result.total_s == 5.5


# -- a rollouter that swaps (pause, load and resume in one call) -------------------------------
def test_a_rollouter_that_swaps_gets_one_call_and_resumes_itself():
    clock = FakeClock()

    class Timed(SwappingRollouter):
        def swap_weights(self, version, **kwargs):
            clock.advance(4.0)
            answer = super().swap_weights(version, **kwargs)
            return {**answer, "pause_s": 1.5}

    trainer, rollouter = FakeTrainer(value=3.0), Timed()
    sync, _ = make(trainer, rollouter, clock=clock)
    result = sync.sync(1)
    # One call: no pause before it, no resume round trip after it.
    assert rollouter.events == ["swap:1", "pause", "load:1", "resume"]
    assert result.ok and result.resumed and result.attempts == 1
    assert rollouter.version == 1 and not rollouter.paused
    assert float(rollouter.weights["layer.weight"][0, 0]) == 3.0
    assert (result.pause_s, result.load_s, result.resume_s) == (1.5, 2.5, 0.0)
    assert sync.get_current_version() == 1


def test_a_failed_swap_is_retried_and_the_rollouter_left_running():
    rollouter = SwappingRollouter(fail_loads=1)
    sync, clock = make(rollouter=rollouter, max_sync_retries=1, sync_retry_delay=0.5)
    assert sync.sync_to_rollouter(1) is True
    assert rollouter.events == ["swap:1", "pause", "load:1", "resume"] * 2
    assert clock.sleeps == [0.5] and not rollouter.paused and rollouter.version == 1


def test_a_hung_swap_times_out_and_the_synchronizer_resumes_the_rollouter():
    rollouter = SwappingRollouter(hang_on="load")
    sync = UnifiedParameterSynchronizer(
        config(sync_timeout=0.3, max_sync_retries=3), FakeTrainer(), rollouter
    )
    start = time.monotonic()
    try:
        with pytest.raises(ParameterSyncTimeoutError, match="swap_weights") as info:
            sync.sync_to_rollouter(1)
        # The synchronizer's own resume, since the swap (still hung) never resumed itself.
        assert rollouter.events == ["swap:1", "pause", "load:1", "resume"]
        assert info.value.result.resumed and sync.get_current_version() == 0
    finally:
        rollouter.release()
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("stale", [1, 0])
def test_duplicate_or_older_version_is_refused(stale):
    rollouter = FakeRollouter()
    sync, _ = make(rollouter=rollouter)
    assert sync.sync_to_rollouter(1)
    events = list(rollouter.events)
    assert sync.sync_to_rollouter(stale) is False
    assert rollouter.events == events  # refused before touching the rollouter
    assert sync.get_current_version() == 1
    stats = sync.get_statistics()
    assert stats["sync_refused"] == 1 and stats["sync_failures"] == 0


def test_versions_may_skip_but_never_go_back():
    sync, _ = make()
    assert sync.sync_to_rollouter(3)
    assert sync.get_current_version() == 3
    assert sync.sync_to_rollouter(2) is False
    assert sync.sync_to_rollouter(5)


def test_concurrent_syncs_to_the_same_version_apply_once():
    rollouter = FakeRollouter()
    sync, _ = make(rollouter=rollouter)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(sync.sync_to_rollouter(1))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [False, False, False, True]
    assert rollouter.events.count("load:1") == 1


def test_failing_loads_are_retried_after_the_delay():
    rollouter = FakeRollouter(fail_loads=2)
    sync, clock = make(rollouter=rollouter, max_sync_retries=3, sync_retry_delay=1.5)
    assert sync.sync_to_rollouter(1)
    assert clock.sleeps == [1.5, 1.5]
    assert rollouter.events.count("load:1") == 3
    assert rollouter.events[-1] == "resume" and rollouter.events.count("resume") == 1
    stats = sync.get_statistics()
    assert stats["sync_retries"] == 2 and stats["last_result"]["attempts"] == 3


def test_load_that_always_fails_counts_a_failure_and_keeps_the_version():
    rollouter = FakeRollouter()
    sync, clock = make(rollouter=rollouter, max_sync_retries=2, sync_retry_delay=1.0)
    assert sync.sync_to_rollouter(1)
    rollouter.fail_loads = 100
    with pytest.raises(ParameterSyncError, match="could not load") as info:
        sync.sync_to_rollouter(2)
    assert not isinstance(info.value, TimeoutError)
    result = info.value.result
    assert result.status == "failed" and result.attempts == 3
    assert result.current_version == 1 and result.resumed
    assert sync.get_current_version() == 1
    assert rollouter.version == 1 and not rollouter.paused
    assert rollouter.events[-1] == "resume"
    stats = sync.get_statistics()
    assert stats["sync_failures"] == 1 and stats["sync_count"] == 1
    assert clock.sleeps == [1.0, 1.0]


def test_zero_retries_means_one_attempt():
    rollouter = FakeRollouter(fail_loads=1)
    sync, clock = make(rollouter=rollouter, max_sync_retries=0)
    with pytest.raises(ParameterSyncError):
        sync.sync_to_rollouter(1)
    assert rollouter.events == ["pause", "load:1", "resume"]
    assert clock.sleeps == []


class DeadRollouter(FakeRollouter):
    """Answers as a handle of a dead actor does: every call raises ``error``."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def pause_rollout(self):
        self.events.append("pause")
        raise self.error


def test_a_dead_rollouter_is_not_retried():
    rollouter = DeadRollouter(ActorDiedError("The actor FullyAsyncRollouter (a1) died: SIGKILL"))
    sync, clock = make(rollouter=rollouter, max_sync_retries=3, sync_retry_delay=1.0)
    with pytest.raises(ParameterSyncError, match=r"ActorDiedError.*SIGKILL") as info:
        sync.sync_to_rollouter(1)
    assert info.value.result.attempts == 1 and rollouter.events.count("pause") == 1
    assert clock.sleeps == []  # no retry delay spent on an actor that cannot come back
    assert sync.get_current_version() == 0


def test_a_restarting_rollouter_is_still_retried():
    rollouter = DeadRollouter(ActorUnavailableError("The actor (a1) is restarting"))
    sync, clock = make(rollouter=rollouter, max_sync_retries=2, sync_retry_delay=1.0)
    with pytest.raises(ParameterSyncError, match="ActorUnavailableError"):
        sync.sync_to_rollouter(1)
    assert rollouter.events.count("pause") == 3 and clock.sleeps == [1.0, 1.0]


def test_a_killed_rollouter_actor_is_not_retried():
    miniray.init(backend="inline")
    try:
        rollouter = miniray.remote(FakeRollouter).remote()
        miniray.get(rollouter.get_state.remote(), timeout=30)
        miniray.kill(rollouter)
        sync, clock = make(rollouter=rollouter, max_sync_retries=3, sync_retry_delay=1.0)
        with pytest.raises(ParameterSyncError, match="ActorDiedError") as info:
            sync.sync_to_rollouter(1)
        assert info.value.result.attempts == 1 and clock.sleeps == []
    finally:
        miniray.shutdown()


@pytest.mark.parametrize("hang_on", ["load", "pause"])
def test_hanging_rollouter_times_out_is_resumed_and_raises(hang_on):
    rollouter = FakeRollouter(hang_on=hang_on)
    sync = UnifiedParameterSynchronizer(
        config(sync_timeout=0.3, max_sync_retries=3), FakeTrainer(), rollouter
    )
    start = time.monotonic()
    try:
        with pytest.raises(ParameterSyncTimeoutError, match="did not answer") as info:
            sync.sync_to_rollouter(1)
    finally:
        rollouter.release()
    assert time.monotonic() - start < 3.0
    assert isinstance(info.value, TimeoutError)
    assert info.value.result.status == "timeout" and info.value.result.resumed
    assert "resume" in rollouter.events
    assert sync.get_current_version() == 0
    stats = sync.get_statistics()
    assert stats["sync_failures"] == 1 and stats["sync_timeouts"] == 1


def test_a_retry_that_cannot_fit_before_the_deadline_ends_the_sync_as_a_timeout():
    rollouter = FakeRollouter(fail_loads=100)
    sync, clock = make(rollouter=rollouter, sync_timeout=5.0, sync_retry_delay=3.0)
    with pytest.raises(ParameterSyncTimeoutError, match="no time left"):
        sync.sync_to_rollouter(1)
    assert clock.sleeps == [3.0]  # the second retry (at t=6 > 5) was not attempted
    assert rollouter.events.count("load:1") == 2 and rollouter.events[-1] == "resume"


def test_trainer_failure_is_retried_and_the_rollouter_resumed():
    trainer = FakeTrainer(fail_times=1)
    rollouter = FakeRollouter()
    sync, _ = make(trainer, rollouter)
    assert sync.sync_to_rollouter(1)
    assert trainer.calls == 2 and rollouter.events[-1] == "resume"


def test_pause_answering_false_fails_the_attempt():
    rollouter = FakeRollouter(pause_answer=False)
    sync, _ = make(rollouter=rollouter, max_sync_retries=1)
    with pytest.raises(ParameterSyncError, match="pause_rollout"):
        sync.sync_to_rollouter(1)
    assert "load:1" not in rollouter.events and rollouter.events[-1] == "resume"


def test_failed_resume_is_reported_but_the_loaded_version_stands():
    rollouter = FakeRollouter(resume_fails=True)
    sync, _ = make(rollouter=rollouter)
    with pytest.raises(ParameterSyncError, match="resume failed"):
        sync.sync_to_rollouter(1)
    # The weights were loaded, so the version follows what the rollouter runs.
    assert sync.get_current_version() == 1 and rollouter.version == 1


def test_every_rollouter_gets_the_weights_and_all_are_resumed_on_failure():
    good, bad = FakeRollouter(), FakeRollouter(fail_loads=100)
    sync, _ = make(rollouter=[good, bad], max_sync_retries=1)
    with pytest.raises(ParameterSyncError):
        sync.sync_to_rollouter(1)
    assert good.events[-1] == "resume" and bad.events[-1] == "resume"
    assert sync.get_current_version() == 0
    second = FakeRollouter()
    sync2, _ = make(rollouter=[good, second])
    assert sync2.sync_to_rollouter(1)
    assert good.version == second.version == 1


def test_sync_overdue_after_the_monitor_interval():
    sync, clock = make(sync_monitor_interval=60.0)
    assert sync.get_statistics()["sync_overdue"] is False
    clock.advance(61)
    assert sync.get_statistics()["sync_overdue"] is True
    assert sync.sync_to_rollouter(1)
    stats = sync.get_statistics()
    assert stats["sync_overdue"] is False and stats["seconds_since_last_sync"] == 0


def test_weights_info_and_cleanup():
    sync, _ = make()
    info = sync.get_weights_info()
    assert info["layer.weight"] == {"shape": (4, 8), "dtype": "float32", "nbytes": 128}
    assert info["layer.bias"]["dtype"] == "float64"
    sync.cleanup()
    assert sync.get_statistics()["sync_group_initialized"] is False
    with pytest.raises(RuntimeError, match="cleaned up"):
        sync.sync_to_rollouter(1)


def test_endpoints_must_offer_the_protocol():
    class NoLoad:
        def pause_rollout(self):
            return True

        def resume_rollout(self):
            return True

    with pytest.raises(TypeError, match="load_weights"):
        UnifiedParameterSynchronizer({}, FakeTrainer(), NoLoad())
    sync = UnifiedParameterSynchronizer({})
    with pytest.raises(TypeError, match="get_weights"):
        sync.register_workers([object()], [FakeRollouter()])
    with pytest.raises(ValueError, match="rollout_workers is empty"):
        sync.register_workers([FakeTrainer()], [])
    with pytest.raises(RuntimeError, match="no trainer to sync"):
        sync.sync_parameters()


def test_torch_weights_are_measured_in_bytes():
    import torch

    class TorchTrainer:
        def get_weights(self):
            return {"w": torch.zeros(10, 10, dtype=torch.bfloat16), "b": torch.zeros(3)}

    sync, _ = make(TorchTrainer())
    result = sync.sync(1)
    assert result.ok and result.bytes == 10 * 10 * 2 + 3 * 4
    assert sync.get_weights_info()["w"] == {
        "shape": (10, 10),
        "dtype": "torch.bfloat16",
        "nbytes": 200,
    }


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match=r"async_training\.sync_timeout=0"):
        UnifiedParameterSynchronizer({"async_training": {"sync_timeout": 0}})
    with pytest.raises(ValueError, match="max_sync_retry"):
        UnifiedParameterSynchronizer({"async_training": {"max_sync_retry": 3}})
    with pytest.raises(TypeError, match="new_version"):
        make()[0].sync_to_rollouter("1")


# -- actor and classic modes ------------------------------------------------------------------
def test_classic_mode_initialize_then_sync_weights():
    synchronizer = UnifiedParameterSynchronizer(config())
    trainer, rollouter = FakeTrainer(value=3.0), FakeRollouter()
    assert synchronizer.get_statistics()["sync_group_initialized"] is False
    assert synchronizer.initialize_sync_group([trainer], [rollouter]) is True
    assert synchronizer.get_statistics()["sync_group_initialized"] is True
    assert synchronizer.sync_weights([trainer], [rollouter]) is True
    assert synchronizer.sync_weights() is True  # the group from initialize_sync_group
    assert rollouter.version == 2 and synchronizer.get_current_version() == 2


def test_actor_mode_in_process_register_then_sync_parameters():
    synchronizer = UnifiedParameterSynchronizer(config(), as_ray_actor=True)
    assert synchronizer.get_statistics()["is_ready"] is False
    assert synchronizer.register_workers([FakeTrainer()], [FakeRollouter()]) is True
    assert synchronizer.get_statistics()["is_ready"] is True
    assert synchronizer.sync_parameters() is True
    assert synchronizer.sync_parameters() is True
    assert synchronizer.get_statistics()["current_version"] == 2


def test_aliases_are_the_unified_class():
    assert ParameterSynchronizer is UnifiedParameterSynchronizer
    assert AsyncParameterSynchronizer is UnifiedParameterSynchronizer
    assert isinstance(ParameterSyncManager, miniray.ActorClass)
    with pytest.raises(TypeError, match="remote"):
        ParameterSyncManager({})


def test_weights_already_in_the_object_store_are_passed_by_reference():
    # The async loop stages a snapshot with miniray.put before the sync pauses the rollouter;
    # the synchronizer must hand the rollouter that ref, not fail on it or copy it again.
    import torch

    miniray.init(backend="local", num_workers=1)
    try:

        class StagedTrainer:
            def __init__(self):
                self.ref = miniray.put({"layer.weight": torch.full((4, 4), 3.0)})

            def get_weights(self):
                return self.ref

        rollouter = miniray.remote(FakeRollouter).remote()
        sync, _ = make(StagedTrainer(), rollouter)
        assert sync.sync_to_rollouter(1) is True
        assert sync.sync_to_rollouter(2) is True
        state = miniray.get(rollouter.get_state.remote(), timeout=30)
        assert state == {"paused": False, "version": 2, "value": 3.0}
        assert sync.get_statistics()["last_result"]["bytes"] == 4 * 4 * 4
        assert sync.get_weights_info()["layer.weight"]["shape"] == (4, 4)
    finally:
        miniray.shutdown()


class ValueSwappingRollouter(SwappingRollouter):
    """Records how each swap got its weights, and asks for them by value from then on (as
    ``FullyAsyncRollouter`` does with its engine in its own process)."""

    def swap_weights(self, version, *, weights=None, refs=None, timeout=30.0):
        self.events.append("refs" if refs is not None else "value")
        answer = super().swap_weights(version, weights=weights, refs=refs, timeout=timeout)
        return {**answer, "by_value": True}

    def get_events(self):
        return list(self.events)


def test_a_rollouter_that_asks_for_values_gets_the_weights_with_the_next_swap():
    # The first swap sends the ref (the synchronizer cannot know yet); the answer's by_value
    # makes the next one send the staged ref as the call's argument, which the runtime
    # resolves: the rollouter gets the value without fetching it itself.
    import torch

    miniray.init(backend="local", num_workers=1)
    try:

        class StagedTrainer:
            def __init__(self):
                self.ref = None

            def get_weights(self):
                return self.ref

        trainer = StagedTrainer()
        rollouter = miniray.remote(ValueSwappingRollouter).remote()
        sync, _ = make(trainer, rollouter)
        for version, value in ((1, 3.0), (2, 5.0)):
            trainer.ref = miniray.put({"layer.weight": torch.full((4, 4), value)})
            assert sync.sync_to_rollouter(version) is True
            state = miniray.get(rollouter.get_state.remote(), timeout=30)
            assert state == {"paused": False, "version": version, "value": value}
        events = miniray.get(rollouter.get_events.remote(), timeout=30)
        assert [e for e in events if e in ("refs", "value")] == ["refs", "value"]
    finally:
        miniray.shutdown()


def test_a_resumed_run_restores_the_version_before_its_first_sync():
    sync, _ = make()
    assert sync.restore_version(5) == 5
    assert sync.get_current_version() == sync.get_statistics()["current_param_version"] == 5
    assert sync.sync_to_rollouter(5) is False  # not newer than the restored version
    assert sync.sync_to_rollouter(6) is True
    with pytest.raises(RuntimeError, match="after a sync"):
        sync.restore_version(9)
    with pytest.raises(ValueError, match="version=-1"):
        make()[0].restore_version(-1)


def test_a_swap_sent_before_its_weights_exist_runs_once_they_are_stored():
    # WeightPublisher.sent: the swap goes out with the trainer's step, its argument the ref of
    # weights not made yet; the runtime delivers it when they are, and the sync only waits for
    # its answer. A started swap that fails (here: its weights' task failed) is retried
    # through the trainer's weights as any failed attempt.
    import torch

    from miniray.rl.param_sync import swap_call

    @miniray.remote
    def weights_after(delay, value):
        time.sleep(delay)
        if value is None:
            raise RuntimeError("the trainer's weights call failed")
        return {"layer.weight": torch.full((4, 4), value)}

    miniray.init(backend="local", num_workers=2)
    try:
        rollouter = miniray.remote(ValueSwappingRollouter).remote()
        trainer = FakeTrainer(value=9.0)
        sync, _ = make(trainer, rollouter, max_sync_retries=1, sync_retry_delay=0.0)
        started = swap_call(rollouter, weights_after.remote(0.5, 3.0), 1, 30.0, by_value=True)
        ready, _ = miniray.wait([started.ref], timeout=0.2)
        assert not ready  # the weights are not there yet: the swap has not run
        result = sync.sync(1, started=started)
        assert result.ok and result.attempts == 1 and result.transfer_s == 0.0
        state = miniray.get(rollouter.get_state.remote(), timeout=30)
        assert state == {"paused": False, "version": 1, "value": 3.0}
        assert trainer.calls == 0  # the trainer was never asked
        failed = swap_call(rollouter, weights_after.remote(0.0, None), 2, 30.0, by_value=True)
        result = sync.sync(2, started=failed)
        assert result.ok and result.attempts == 2
        state = miniray.get(rollouter.get_state.remote(), timeout=30)
        assert state == {"paused": False, "version": 2, "value": 9.0}  # the retry's weights
        assert sync.wants_value(rollouter) is True
    finally:
        miniray.shutdown()
