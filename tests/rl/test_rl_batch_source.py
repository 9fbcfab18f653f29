"""BatchSource on its own: the async source's queue (order, a producer that crashed or died,
a timeout, the background poll), the sync source's generation, dynamic sampling through both,
the version hand-off, and stop() closing the queue.

The rollouter is ``FakeProducer`` (an inline actor: the sources call it with ``.remote``); the
queue is the real ``MessageQueue`` as an inline actor, which the test fills as the rollouter's
sender would.
"""

from __future__ import annotations

import threading
import time

import pytest

import miniray
from miniray.errors import ActorDiedError
from miniray.rl.batch_source import GeneratedSource, QueueSource, batch_source
from miniray.rl.errors import ParameterSyncError, ProducerCrashedError, QueueTimeoutError
from miniray.rl.queue import MessageQueue, PutResult
from miniray.rl.rollouter import as_rl_config
from miniray.rl.types import Sample


def group(tag: str, rewards=(0.0, 1.0), v_start: int = 0) -> list[Sample]:
    """A group of ``len(rewards)`` samples of one prompt, named by ``tag``."""
    return [
        Sample(
            prompt_token_ids=[1],
            response_token_ids=[2],
            v_start=v_start,
            reward=float(r),
            metadata={"tag": tag},
        )
        for r in rewards
    ]


def tags(groups) -> list[str]:
    return [g[0].metadata["tag"] for g in groups]


class FakeProducer:
    """The rollouter's calls the sources make. ``generate_batch`` hands out the groups of
    ``script`` in order (stamped with the version asked for), then spread groups.
    ``end(error)`` ends the 'generation loop' that ``wait_loop_end`` waits for; ``die`` makes
    that call fail as the runtime fails it when the process dies."""

    def __init__(self, script=(), *, fail_stop: bool = False):
        self.script = [list(g) for g in script]
        self.fail_stop = fail_stop
        self.calls: list = []
        self.discarded = 0
        self._ended = threading.Event()
        self._error: str | None = None
        self._die = False

    def start(self) -> bool:
        self.calls.append("start")
        return True

    def wait_loop_end(self) -> str | None:
        self._ended.wait(30)  # bounded: a test that forgets to end it cannot hang the suite
        if self._die:
            raise ActorDiedError("The actor died unexpectedly: FakeProducer (SIGKILL)")
        return self._error

    def end(self, error: str | None = None, *, die: bool = False) -> None:
        self._error, self._die = error, die
        self._ended.set()

    def stop(self) -> bool:
        self.calls.append("stop")
        self._ended.set()
        if self.fail_stop:
            raise RuntimeError("the rollouter could not stop")
        return True

    def get_statistics(self) -> dict:
        return {"groups_generated": 7}

    def discard_groups(self, count: int) -> int:
        self.calls.append(("discard", count))
        self.discarded += count
        return self.discarded

    def generate_batch(self, num_groups: int, version: int) -> list[list[Sample]]:
        self.calls.append(("generate", num_groups, version))
        out = []
        for i in range(num_groups):
            script = self.script.pop(0) if self.script else group(f"spread{i}")
            out.append([_at(s, version) for s in script])
        return out

    def get_calls(self) -> list:
        return list(self.calls)


def _at(sample: Sample, version: int) -> Sample:
    sample.v_start = sample.v_end = version
    return sample


def rl_config(mode="async", *, timeout=30.0, filtering=False, max_batches=0, queue_size=8):
    return as_rl_config(
        {
            "data": {"train_files": ["unused.parquet"], "train_batch_size": 2},
            "actor_rollout_ref": {"model": {"path": "unused"}},
            "algorithm": {
                "filter_groups": {"enable": filtering, "max_num_gen_batches": max_batches}
            },
            "async_training": {
                "mode": mode,
                "generation_timeout": timeout,
                "max_queue_size": queue_size,
                "staleness_threshold": 3,
            },
        }
    )


@pytest.fixture
def inline():
    miniray.init(backend="inline")
    try:
        yield
    finally:
        miniray.shutdown()


def parts(cfg, script=(), **producer):
    """The producer (threaded: ``wait_loop_end`` stays in flight) and the queue actors."""
    rollouter = miniray.remote(max_concurrency=4)(FakeProducer).remote(script, **producer)
    return rollouter, MessageQueue.remote(cfg)


def put(queue, *groups) -> None:
    for g in groups:
        assert miniray.get(queue.put_samples.remote(g), timeout=10) is PutResult.ACCEPTED


def queue_stats(queue) -> dict:
    return miniray.get(queue.get_statistics.remote(), timeout=10)


def calls(rollouter) -> list:
    return miniray.get(rollouter.get_calls.remote(), timeout=10)


# -- async mode: the queue -----------------------------------------------------------------------
def test_the_async_source_takes_batches_from_the_queue_oldest_first(inline):
    cfg = rl_config()
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    assert isinstance(source, QueueSource)
    with pytest.raises(RuntimeError, match=r"fetch\(\) before start\(\)"):
        source.next_batch(0)
    source.start()
    try:
        assert calls(rollouter) == ["start"]
        put(queue, group("new", v_start=1), group("a"), group("b"), group("c", v_start=1))
        first = source.next_batch(1)
        assert tags(first.groups) == ["a", "b"]  # the oldest version first, then arrival
        assert tags(source.next_batch(1).groups) == ["new", "c"]
        assert first.dropped == [] and first.metrics == {}  # no dynamic sampling
        assert source.queue_size() == 0
        # A batch not there yet is waited for, and the wait is measured.
        timer = threading.Timer(0.3, put, (queue, group("d"), group("e")))
        timer.start()
        late = source.next_batch(1)
        timer.join()
        assert tags(late.groups) == ["d", "e"] and late.wait_s >= 0.25
    finally:
        source.stop()


def test_a_prefetched_batch_waits_in_the_queue_and_is_the_next_one_taken(inline):
    cfg = rl_config()
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    assert source.batch_by_ref
    with pytest.raises(RuntimeError, match=r"prefetch\(\) before start\(\)"):
        source.prefetch(0)
    source.start()
    try:
        source.prefetch(2)  # the batch a trainer at version 2 will train
        with pytest.raises(RuntimeError, match="prefetch\\(\\) twice"):
            source.prefetch(2)
        ref = source.prefetched_ref()
        put(queue, group("a", v_start=1), group("b", v_start=2), group("c", v_start=2))
        # The call took the batch in the queue, at the version asked: the queue is there now.
        assert tags(miniray.get(ref, timeout=10)) == ["a", "b"]
        assert queue_stats(queue)["current_param_version"] == 2
        assert tags(source.next_batch(2).groups) == ["a", "b"]  # that answer, not a new call
        assert source.queue_size() == 1
        # A prefetched batch asked for at another version would lose its groups: refused.
        source.prefetch(2)
        with pytest.raises(RuntimeError, match=r"prefetched for version 2, but 2 groups .*3"):
            source.next_batch(3)
    finally:
        source.stop()


def test_a_source_with_dynamic_sampling_or_in_sync_mode_sends_no_batch_by_ref(inline):
    rollouter, queue = parts(rl_config())
    assert not batch_source(rl_config(filtering=True), rollouter, queue).batch_by_ref
    sync = batch_source(rl_config("sync"), rollouter, queue)
    sync.prefetch(1)  # nothing: a sync batch is generated when asked, at the version then
    assert not sync.batch_by_ref and calls(rollouter) == []


def test_a_crashed_producer_is_a_producer_crashed_error_at_once(inline):
    cfg = rl_config(timeout=30.0)
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    source.start()
    try:
        put(queue, group("a"))  # half a batch: the wait would go on for 30 s
        threading.Timer(0.2, lambda: rollouter.end.remote("Traceback\nRuntimeError: boom")).start()
        start = time.monotonic()
        with pytest.raises(
            ProducerCrashedError, match=r"(?s)the rollouter crashed:\n.*boom"
        ) as info:
            source.next_batch(0)
        assert time.monotonic() - start < 5  # not at generation_timeout
        assert "boom" in info.value.producer_error
        # The queue is closed with the crash, so no other get_batch waits for it either.
        deadline = time.monotonic() + 5
        while not queue_stats(queue)["closed"]:
            assert time.monotonic() < deadline, "the queue was not closed"
            time.sleep(0.01)
        with pytest.raises(ProducerCrashedError, match="boom"):
            miniray.get(queue.get_batch.remote(1, 0, timeout=5), timeout=10)
        # A failure the crash caused elsewhere is reported as the crash.
        with pytest.raises(ProducerCrashedError, match="boom") as info:
            source.check(RuntimeError("a call to the rollouter failed"))
        assert isinstance(info.value.__cause__, RuntimeError)
    finally:
        source.stop()


def test_a_dead_producer_and_a_loop_that_just_stopped_are_named(inline):
    cfg = rl_config()
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    source.start()
    try:
        miniray.get(rollouter.end.remote(die=True), timeout=10)
        with pytest.raises(ProducerCrashedError, match=r"the rollouter died: .*SIGKILL"):
            source.next_batch(0)
    finally:
        source.stop()
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    source.start()
    try:
        miniray.get(rollouter.end.remote(None), timeout=10)
        with pytest.raises(ProducerCrashedError, match="generation loop stopped before the run"):
            source.next_batch(0)
    finally:
        source.stop()


def test_a_batch_that_does_not_come_times_out_saying_what_it_waited_for(inline):
    cfg = rl_config(timeout=0.5)
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    source.start()
    try:
        put(queue, group("a"))
        start = time.monotonic()
        with pytest.raises(QueueTimeoutError) as info:
            source.next_batch(0)
        assert 0.4 < time.monotonic() - start < 10
        message = str(info.value)
        assert "get_batch() waited 0.5 s for 2 fresh items at version 0" in message
        assert "holds 1" in message and "is the rollouter running and not paused?" in message
        source.check(info.value)  # the producer is alive: not turned into a crash
    finally:
        source.stop()


def test_the_wait_for_a_batch_ends_when_the_poll_raises(inline):
    cfg = rl_config(timeout=30.0)
    rollouter, queue = parts(cfg)
    polls = []

    def poll():
        polls.append(time.monotonic())
        raise ParameterSyncError("weight sync to version 1 failed")

    source = batch_source(cfg, rollouter, queue, poll=poll)
    source.start()
    try:
        start = time.monotonic()
        with pytest.raises(ParameterSyncError, match="version 1 failed"):
            source.next_batch(0)
        assert len(polls) == 1 and time.monotonic() - start < 5
    finally:
        source.stop()


# -- sync mode: generated when asked -------------------------------------------------------------
def test_the_sync_source_generates_each_batch_at_the_trainers_version(inline):
    cfg = rl_config("sync")
    rollouter, queue = parts(cfg, [group("a"), group("b"), group("c")])
    source = batch_source(cfg, rollouter, queue)
    assert isinstance(source, GeneratedSource)
    source.start()  # nothing to start: the rollouter generates only when asked
    try:
        batch = source.next_batch(3)
        assert tags(batch.groups) == ["a", "b"]
        assert {s.v_start for g in batch.groups for s in g} == {3}
        assert tags(source.next_batch(4).groups) == ["c", "spread1"]
        assert calls(rollouter) == [("generate", 2, 3), ("generate", 2, 4)]
    finally:
        source.stop()


def test_a_dead_rollouter_in_sync_mode_is_a_producer_crashed_error(inline):
    class Dead(FakeProducer):
        def generate_batch(self, num_groups, version):
            raise ActorDiedError("The actor died unexpectedly: Dead")

    cfg = rl_config("sync")
    source = batch_source(cfg, miniray.remote(Dead).remote(), MessageQueue.remote(cfg))
    try:
        with pytest.raises(ProducerCrashedError, match=r"the rollouter died: .*Dead"):
            source.next_batch(0)
    finally:
        source.stop()


# -- dynamic sampling ----------------------------------------------------------------------------
def test_dynamic_sampling_drops_all_equal_groups_and_fills_the_batch(inline):
    cfg = rl_config("sync", filtering=True)
    script = [
        group("same1", (1.0, 1.0)),
        group("kept1", (0.0, 1.0)),
        group("same2", (0.0, 0.0)),
        group("kept2", (1.0, 0.5)),
        group("same3", (0.5, 0.5)),
        group("kept3", (0.0, 1.0)),
        group("kept4", (1.0, 0.0)),
    ]
    rollouter, queue = parts(cfg, script)
    source = batch_source(cfg, rollouter, queue)
    try:
        batch = source.next_batch(0)
        assert tags(batch.groups) == ["kept1", "kept2"]
        assert tags(batch.dropped) == ["same1", "same2"]
        assert batch.metrics == {
            "filter_groups/dropped": 2,
            "filter_groups/dropped_total": 2,
            "filter_groups/fetches": 3,
        }
        # Never more groups fetched than the batch still needs; each fetch's drops handed
        # back to the rollouter (their staleness room) before next_batch returned.
        assert calls(rollouter) == [
            ("generate", 2, 0),
            ("discard", 1),
            ("generate", 1, 0),
            ("discard", 1),
            ("generate", 1, 0),
        ]
        second = source.next_batch(1)
        assert tags(second.groups) == ["kept3", "kept4"] and tags(second.dropped) == ["same3"]
        assert second.metrics["filter_groups/dropped_total"] == 3
        assert source.groups_discarded == 3
        assert miniray.get(rollouter.discard_groups.remote(0), timeout=10) == 3
    finally:
        source.stop()


def test_dynamic_sampling_fills_from_the_queue_in_async_mode(inline):
    cfg = rl_config(filtering=True)
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    source.start()
    try:
        put(queue, group("same1", (1.0, 1.0)), group("kept1"), group("same2", (0.0, 0.0)))
        threading.Timer(0.2, put, (queue, group("kept2"))).start()
        batch = source.next_batch(0)
        assert tags(batch.groups) == ["kept1", "kept2"]
        assert tags(batch.dropped) == ["same1", "same2"]
        assert ("discard", 1) in calls(rollouter) and source.groups_discarded == 2
    finally:
        source.stop()


def test_dynamic_sampling_stops_after_max_num_gen_batches(inline):
    cfg = rl_config("sync", filtering=True, max_batches=2)
    script = [group(f"same{i}", (1.0, 1.0)) for i in range(4)]
    rollouter, queue = parts(cfg, script)
    source = batch_source(cfg, rollouter, queue)
    try:
        with pytest.raises(RuntimeError, match=r"kept 0 of the 2 .*max_num_gen_batches=2"):
            source.next_batch(0)
    finally:
        source.stop()


# -- the version hand-off and stop() -------------------------------------------------------------
def test_hand_off_gives_the_queue_the_new_version(inline):
    cfg = rl_config()
    rollouter, queue = parts(cfg)
    source = batch_source(cfg, rollouter, queue)
    source.start()
    try:
        source.hand_off(5)
        source.finish()  # reads the queue's answer
        assert queue_stats(queue)["current_param_version"] == 5
        # Groups more than staleness_threshold=3 versions old are swept, never handed out.
        put(queue, group("fresh", v_start=4))
        assert miniray.get(queue.put_samples.remote(group("stale")), timeout=10).name == (
            "REJECTED_STALE"
        )
        put(queue, group("fresh2", v_start=5))
        assert tags(source.next_batch(5).groups) == ["fresh", "fresh2"]
    finally:
        source.stop()


@pytest.mark.parametrize("fail_stop", [False, True])
def test_stop_closes_the_queue_so_a_blocked_producer_wakes(inline, fail_stop):
    """Regression: stop() stopped the rollouter but left the queue open, so a producer waiting
    in a put on a full queue (or a rollouter whose stop failed) had no consumer left to wake
    it and waited out its whole timeout."""
    cfg = rl_config(queue_size=2)
    rollouter, queue = parts(cfg, fail_stop=fail_stop)
    source = batch_source(cfg, rollouter, queue)
    source.start()
    put(queue, group("a"), group("b"))  # full
    answers = []

    def producer():
        ref = queue.put_samples.remote(group("c"), timeout=30)
        answers.append(miniray.get(ref, timeout=60))

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    time.sleep(0.2)  # the put waits for room
    start = time.monotonic()
    stopped_queue, rollouter_stats = source.stop()
    thread.join(10)
    assert not thread.is_alive() and answers == [PutResult.CLOSED]
    assert time.monotonic() - start < 5
    assert queue_stats(queue)["closed"]
    assert "stop" in calls(rollouter)
    # The queue's statistics whether or not the rollouter stopped; its own only if it did.
    assert stopped_queue["accepted"] == 2 and stopped_queue["producer_error"] is None
    assert rollouter_stats == ({} if fail_stop else {"groups_generated": 7})
