"""The foundations together: a threaded fake rollouter, the queue and the synchronizer running
an asynchronous loop. Regression for verl #4449: with k = 0 the trainer never sees older data."""

from __future__ import annotations

import threading

import pytest
from rl_fakes import FakeTrainer

from miniray.rl import MessageQueue, PutResult, Sample, UnifiedParameterSynchronizer


class ThreadedRollouter:
    """Generates samples stamped with its version until stopped; honours pause/resume/load."""

    def __init__(self, queue: MessageQueue):
        self.queue = queue
        self.version = 0
        self.paused = False
        self.stopped = False
        self.results: list[PutResult] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self.paused and not self.stopped:
                    self._cv.wait(1.0)
                if self.stopped:
                    return
                v_start = self.version
            sample = Sample(prompt_token_ids=[1], response_token_ids=[2, 3], v_start=v_start)
            # A full queue is back-pressure: wait a little for room.
            self.results.append(self.queue.put_samples(sample, timeout=0.01))

    def pause_rollout(self) -> bool:
        with self._cv:
            self.paused = True
        return True

    def resume_rollout(self) -> bool:
        with self._cv:
            self.paused = False
            self._cv.notify_all()
        return True

    def load_weights(self, weights, version: int) -> bool:
        with self._cv:
            self.version = version
        return True

    def stop(self) -> None:
        with self._cv:
            self.stopped = True
            self._cv.notify_all()
        self._thread.join(5)


@pytest.mark.parametrize("k", [0, 2])
def test_trainer_never_consumes_samples_older_than_k(k):
    queue = MessageQueue(max_queue_size=16, staleness_threshold=k)
    rollouter = ThreadedRollouter(queue)
    sync = UnifiedParameterSynchronizer(
        {"async_training": {"sync_retry_delay": 0.0}}, FakeTrainer(), rollouter
    )
    ages = []
    try:
        for version in range(12):
            batch = queue.get_batch(4, current_param_version=version, timeout=10)
            ages += [s.age(version) for s in batch]
            assert sync.sync_to_rollouter(version + 1)
    finally:
        rollouter.stop()
    assert len(ages) == 48 and max(ages) <= k
    stats = queue.get_statistics()
    assert stats["consumed_age_max"] <= k
    assert sync.get_statistics()["sync_count"] == 12 and rollouter.version == 12
    if k == 0:
        assert set(ages) == {0}
        # The queue was full of samples from the old weights at every sync: they were turned
        # away, not handed to the trainer.
        assert stats["rejected_stale"] + stats["evicted_stale"] > 0
