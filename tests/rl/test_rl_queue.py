"""MessageQueue: staleness on put and by sweep, bounded, oldest-first, close semantics,
blocking with timeouts (woken by condition variables), statistics on a fake clock."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rl_fakes import FakeClock

from miniray.rl import (
    MessageQueue,
    MessageQueueClient,
    ProducerCrashedError,
    PutResult,
    QueueFinished,
    QueueTimeoutError,
    Sample,
)


def sample(v_start: int, n_tokens: int = 3, **kw) -> Sample:
    return Sample(
        prompt_token_ids=[1, 2], response_token_ids=list(range(n_tokens)), v_start=v_start, **kw
    )


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns (thread, box) where box gets 'value' or 'error'."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# -- the seed's test ------------------------------------------------------------------------------
def test_seed_stale_sample_is_not_returned():
    queue = MessageQueueClient(max_staleness=3)
    assert queue.put_samples("sample", param_version=1) is PutResult.ACCEPTED
    assert queue.get_samples(current_param_version=5) is None
    assert queue.get_statistics()["evicted_stale"] == 1


# -- put says what happened -----------------------------------------------------------------------
def test_put_results():
    queue = MessageQueue(max_queue_size=2, staleness_threshold=1)
    queue.update_param_version(5)
    assert queue.put_samples(sample(4)) is PutResult.ACCEPTED
    assert queue.put_samples(sample(3)) is PutResult.REJECTED_STALE  # age 2 > 1
    assert not PutResult.REJECTED_STALE
    assert queue.put_samples(sample(9)) is PutResult.ACCEPTED  # newer than the trainer: fresh
    assert queue.put_samples(sample(5)) is PutResult.REJECTED_FULL
    queue.close()
    assert queue.put_samples(sample(5)) is PutResult.CLOSED
    stats = queue.get_statistics()
    assert (stats["accepted"], stats["rejected_stale"], stats["rejected_full"]) == (2, 1, 1)
    assert stats["rejected_closed"] == 1 and stats["total_put"] == 5


def test_put_many_puts_each_item_in_order_with_its_own_result():
    queue = MessageQueue(max_queue_size=2, staleness_threshold=1)
    queue.update_param_version(5)
    results = queue.put_many([sample(4), sample(3), sample(5), sample(5)], [4, 3, 5, 5])
    assert results == [
        PutResult.ACCEPTED,
        PutResult.REJECTED_STALE,  # age 2 > 1
        PutResult.ACCEPTED,
        PutResult.REJECTED_FULL,
    ]
    assert [queue.get_samples(5).v_start for _ in range(2)] == [4, 5]
    with pytest.raises(ValueError, match="3 items but 2 param_versions"):
        queue.put_many([sample(5)] * 3, [5, 5])


def test_full_queue_never_evicts_a_queued_item():
    queue = MessageQueue(max_queue_size=1, staleness_threshold=3)
    assert queue.put_samples("old", param_version=0)
    assert queue.put_samples("new", param_version=2) is PutResult.REJECTED_FULL
    assert queue.get_samples() == "old"


def test_param_version_must_agree_with_the_stamp():
    queue = MessageQueue()
    with pytest.raises(ValueError, match="disagrees with the item's v_start=2"):
        queue.put_samples(sample(2), param_version=3)
    with pytest.raises(TypeError, match="param_version is required"):
        queue.put_samples({"text": "no stamp"})
    with pytest.raises(ValueError, match="param_version=-1"):
        queue.put_samples("x", param_version=-1)
    # A group is as old as its oldest member.
    assert queue.put_samples([sample(3), sample(2)]) is PutResult.ACCEPTED
    assert queue.get_statistics()["queued_age_histogram"] == {-2: 1}


# -- staleness ------------------------------------------------------------------------------------
def test_strictly_on_policy_never_hands_out_older_data():
    queue = MessageQueue(staleness_threshold=0)
    assert queue.put_samples(sample(3), param_version=3) is PutResult.ACCEPTED
    assert queue.get_samples(current_param_version=4) is None
    assert queue.put_samples(sample(3)) is PutResult.REJECTED_STALE
    assert queue.put_samples(sample(4)) is PutResult.ACCEPTED
    assert queue.get_samples(current_param_version=4).v_start == 4


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(0, 3),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 3)),  # generated this many versions ago
            st.tuples(st.just("advance"), st.integers(0, 2)),
            st.tuples(st.just("tell"), st.just(0)),  # the trainer reports its version
            st.tuples(st.just("get"), st.just(0)),
        ),
        max_size=40,
    ),
)
def test_no_item_older_than_k_is_ever_handed_out(k, ops):
    queue = MessageQueue(staleness_threshold=k, max_queue_size=8)
    version = 0
    for op, arg in ops:
        if op == "put":
            v_start = max(0, version - arg)
            result = queue.put_samples(sample(v_start))
            known = queue.current_param_version  # put can only judge by what it was told
            assert (result is PutResult.REJECTED_STALE) == (known - v_start > k)
        elif op == "advance":
            version += arg
        elif op == "tell":
            queue.update_param_version(version)
        else:
            item = queue.get_samples(current_param_version=version)
            if item is not None:
                assert version - item.v_start <= k
    stats = queue.get_statistics()
    assert stats["consumed_age_max"] <= k
    assert all(age <= k for age in stats["queued_age_histogram"])


def test_sweep_on_version_advance_evicts_and_frees_room():
    queue = MessageQueue(max_queue_size=2, staleness_threshold=1)
    queue.put_samples(sample(0, n_tokens=10))
    queue.put_samples(sample(1, n_tokens=2))
    thread, box = in_thread(queue.put_samples, sample(2), timeout=10)
    time.sleep(0.05)
    assert "value" not in box  # blocked: the queue is full
    assert queue.update_param_version(2) == 1  # v_start=0 is now 2 versions old
    thread.join(5)
    assert box["value"] is PutResult.ACCEPTED
    stats = queue.get_statistics()
    assert stats["evicted_stale"] == 1 and stats["queue_size"] == 2
    assert stats["evicted_stale_tokens_mean"] == 10
    # The version never goes backwards: an older report does not revive stale items.
    queue.update_param_version(0)
    assert queue.current_param_version == 2


def test_consumed_oldest_first():
    queue = MessageQueue(staleness_threshold=5)
    for name, v in [("a2", 2), ("a1", 1), ("b2", 2), ("b1", 1), ("c0", 0)]:
        queue.put_samples(name, param_version=v)
    order = [queue.get_samples(current_param_version=2) for _ in range(5)]
    assert order == ["c0", "a1", "b1", "a2", "b2"]
    assert queue.get_statistics()["consumed_age_histogram"] == {0: 2, 1: 2, 2: 1}


# -- blocking, timeouts and close ---------------------------------------------------------------
def test_blocking_get_is_woken_by_a_put_not_by_polling():
    queue = MessageQueue()
    thread, box = in_thread(queue.get_samples, 0, timeout=10)
    time.sleep(0.05)
    start = time.monotonic()
    queue.put_samples("x", param_version=0)
    thread.join(5)
    assert box["value"] == "x"
    assert time.monotonic() - start < 0.5


def test_get_samples_returns_none_after_its_timeout():
    queue = MessageQueue()
    start = time.monotonic()
    assert queue.get_samples(0, timeout=0.1) is None
    assert 0.09 <= time.monotonic() - start < 2


def test_get_batch_times_out_naming_what_it_waited_for_and_takes_nothing():
    queue = MessageQueue(staleness_threshold=2)
    queue.put_samples("x", param_version=0)
    with pytest.raises(QueueTimeoutError, match=r"3 fresh items at version 1.*holds 1") as info:
        queue.get_batch(3, 1, timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert queue.get_queue_size() == 1


def test_get_batch_checks_its_size():
    queue = MessageQueue(max_queue_size=4)
    with pytest.raises(ValueError, match=r"batch_size=5.*max_queue_size=4"):
        queue.get_batch(5, timeout=1)
    with pytest.raises(ValueError, match="batch_size=0"):
        queue.get_batch(0, timeout=1)
    with pytest.raises(ValueError, match="timeout=-1"):
        queue.get_samples(timeout=-1)


def test_close_wakes_every_waiter():
    empty = MessageQueue(max_queue_size=1)
    getters = [in_thread(empty.get_samples, 0, timeout=30) for _ in range(2)]
    batcher = in_thread(empty.get_batch, 1, 0, timeout=30)
    full = MessageQueue(max_queue_size=1)
    full.put_samples("full", param_version=0)
    putter = in_thread(full.put_samples, "more", param_version=0, timeout=30)
    time.sleep(0.05)
    start = time.monotonic()
    empty.close()
    full.close()
    for thread, _ in [*getters, batcher, putter]:
        thread.join(5)
    assert time.monotonic() - start < 1
    for _, box in [*getters, batcher]:
        assert isinstance(box["error"], QueueFinished)
    assert putter[1]["value"] is PutResult.CLOSED


def test_finished_queue_drains_then_signals_the_end():
    queue = MessageQueue()
    for v in range(3):
        queue.put_samples(v, param_version=0)
    queue.close()
    assert queue.get_batch(2, timeout=1) == [0, 1]
    assert queue.get_batch(2, timeout=1) == [2]  # a last, short batch
    with pytest.raises(QueueFinished):
        queue.get_batch(2, timeout=1)
    with pytest.raises(QueueFinished):
        queue.get_samples()


def test_producer_crash_is_an_error_not_a_clean_end():
    queue = MessageQueue()
    queue.put_samples("x", param_version=0)
    thread, box = in_thread(MessageQueue.get_batch, queue, 5, timeout=30)
    time.sleep(0.05)
    queue.close(error=RuntimeError("CUDA out of memory"))
    thread.join(5)
    assert isinstance(box["error"], ProducerCrashedError)
    assert "CUDA out of memory" in str(box["error"])
    assert not isinstance(box["error"], QueueFinished)
    # Even with an item left, every later get raises the crash.
    with pytest.raises(ProducerCrashedError, match="RuntimeError: CUDA out of memory"):
        queue.get_samples()
    assert queue.get_statistics()["producer_error"] == "RuntimeError: CUDA out of memory"


def test_a_crash_after_a_clean_close_is_still_reported():
    queue = MessageQueue()
    queue.close()
    queue.close(error="rollouter died")
    with pytest.raises(ProducerCrashedError, match="rollouter died"):
        queue.get_samples()


# -- statistics -----------------------------------------------------------------------------------
def test_time_averaged_utilization_on_a_fake_clock():
    clock = FakeClock()
    queue = MessageQueue(max_queue_size=4, staleness_threshold=3, clock=clock)
    clock.advance(10)  # empty for 10 s
    queue.put_samples("a", param_version=0)
    queue.put_samples("b", param_version=0)
    clock.advance(10)  # half full for 10 s
    queue.put_samples("c", param_version=0)
    queue.put_samples("d", param_version=0)
    clock.advance(20)  # full for 20 s
    assert queue.get_samples() == "a"
    stats = queue.get_statistics()
    assert stats["utilization_time_avg"] == pytest.approx((0 * 10 + 0.5 * 10 + 1.0 * 20) / 40)
    assert stats["time_empty_fraction"] == pytest.approx(0.25)
    assert stats["time_full_fraction"] == pytest.approx(0.5)
    assert stats["utilization"] == 0.75
    assert stats["in_queue_seconds_mean"] == 30 and stats["in_queue_seconds_max"] == 30


def test_statistics_report_tokens_of_accepted_and_rejected_samples():
    queue = MessageQueue(staleness_threshold=0)
    queue.update_param_version(1)
    queue.put_samples(sample(1, n_tokens=4))
    queue.put_samples(sample(1, n_tokens=6))
    queue.put_samples(sample(0, n_tokens=50))
    stats = queue.get_statistics()
    assert stats["accepted_tokens_mean"] == 5 and stats["rejected_stale_tokens_mean"] == 50


def test_clear_counts_what_it_dropped():
    queue = MessageQueue()
    queue.put_samples("a", param_version=0)
    assert queue.clear_queue() == 1
    assert queue.get_statistics()["cleared"] == 1 and queue.qsize() == 0


# -- configuration ------------------------------------------------------------------------------
def test_config_sources_and_errors():
    queue = MessageQueue({"async_training": {"max_queue_size": 7, "staleness_threshold": 1}})
    assert (queue.max_queue_size, queue.staleness_threshold) == (7, 1)
    queue = MessageQueue({"staleness_threshold": 2}, max_queue_size=3)
    assert (queue.max_queue_size, queue.staleness_threshold) == (3, 2)
    with pytest.raises(ValueError, match=r"async_training\.max_queue_size=0 is invalid"):
        MessageQueue(max_queue_size=0)
    with pytest.raises(TypeError, match=r"staleness_threshold=0\.1"):
        MessageQueue(max_staleness=0.1)
    with pytest.raises(ValueError, match="disagree"):
        MessageQueue(staleness_threshold=1, max_staleness=2)
