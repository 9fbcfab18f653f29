"""ReplicaPool: one load fanned out under one deadline on a fake clock (the late and the failed
named, the statistics say which replica missed it), fail-fast, a restart with the last
weights, pause under a fake clock, and routing by pull (a fast replica takes more)."""

from __future__ import annotations

import threading
import time

import pytest

import miniray
from miniray.rl.replica_pool import ReplicaPool


class FakeClock:
    """``clock()`` for the pool; replicas move it as if their work took that long."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance_to(self, t):
        self.now = max(self.now, t)


# Module-level: the inline backend runs actors in this process, where they find these.
CLOCK = FakeClock()
RELEASE = threading.Event()  # set at the end of a test: a hung replica returns
ANSWERED = threading.Semaphore(0)  # released by each replica that answers a load


class Replica:
    """``mode``: ok (a load takes 2 s of the fake clock) | slow (8 s) | hang (the deadline passes
    while it loads) | stuck (no answer, the clock stands still) | raise | wrong (answers another
    version). Loads run in parallel: each moves the clock to its own end, not by its length."""

    def __init__(self, mode="ok"):
        self.mode = mode
        self.version = None

    def node(self):
        return f"node-{self.mode}"

    def load_weights(self, weights, version):
        if self.mode == "hang":
            # Once the others answered (their answers stored a moment later), the deadline
            # passes on the fake clock: the pool then stops waiting at once.
            for _ in range(2):
                ANSWERED.acquire(timeout=10)
            time.sleep(0.2)
            CLOCK.advance_to(1e6)
            RELEASE.wait(60)
            return version
        if self.mode == "stuck":
            RELEASE.wait(60)
            return version
        if self.mode == "raise":
            raise ValueError("bad weights: layer.weight has the wrong shape")
        CLOCK.advance_to(8.0 if self.mode == "slow" else 2.0)
        self.version = version if self.mode != "wrong" else version - 1
        ANSWERED.release()
        return self.version


@pytest.fixture
def inline():
    CLOCK.now = 0.0
    RELEASE.clear()
    while ANSWERED.acquire(blocking=False):
        pass
    miniray.init(backend="inline")
    yield
    RELEASE.set()
    miniray.shutdown()


def pool_of(*modes, **options):
    actor = miniray.remote(Replica)
    return ReplicaPool(
        [actor.remote(mode) for mode in modes], clock=CLOCK, load_timeout=10.0, **options
    )


def column(pool, key):
    return [s[key] for s in pool.statistics(1.0)]


def test_a_load_waits_once_for_all_and_names_the_replica_that_missed_it(inline):
    pool = pool_of("ok", "slow", "hang")
    start = time.monotonic()
    loads = pool.load("weights", 3)
    assert time.monotonic() - start < 5.0  # the fake deadline, not a real 10 s wait
    assert loads.values == {0: 3, 1: 3}  # slow: 8 s, within the one 10 s deadline
    assert (loads.late, loads.failures, loads.missed) == ([2], {}, [2])
    assert "no answer before the deadline" in loads.why(2)
    assert column(pool, "loaded_version") == [3, 3, None]
    assert column(pool, "missed_syncs") == [0, 0, 1]


def test_fail_fast_ends_the_wait_at_the_first_failure(inline):
    pool = pool_of("ok", "stuck", "raise")
    start = time.monotonic()
    loads = pool.load("weights", 3, fail_fast=True)
    assert time.monotonic() - start < 5.0 and CLOCK.now < 10.0  # before the deadline
    assert loads.failures == {2: "raised ValueError: bad weights: layer.weight has the wrong shape"}
    assert 1 in loads.abandoned and not loads.late  # not given the time: not missed
    assert column(pool, "missed_syncs") == [0, 0, 1]


def test_a_replica_that_loads_another_version_failed_the_load(inline):
    pool = pool_of("ok", "wrong")
    loads = pool.load("weights", 5)
    assert loads.failures == {1: "loaded version 4, expected 5"}
    assert column(pool, "loaded_version") == [5, None]


def test_a_failed_replica_restarts_with_the_last_weights_until_none_is_left(inline):
    actor = miniray.remote(Replica)
    started = []

    def start_one(index):
        started.append(index)
        return actor.remote("ok")

    pool = ReplicaPool.start(
        2, start_one, max_restarts=1, clock=CLOCK, names=["r0", "r1"], load_timeout=10.0
    )
    assert column(pool, "node") == ["node-ok", "node-ok"]
    pool.load("weights", 7)
    first = pool.handle(1)
    pool.failed(1, "died in a test")
    assert pool.handle(1) is not first and started == [0, 1, 1]
    assert column(pool, "loaded_version") == [7, 7]  # the restart loaded the last weights
    assert (pool.failures, pool.restarts, column(pool, "failures")) == (1, 1, [0, 1])
    pool.failed(1, "died again")  # no restarts left: gone, the other goes on
    assert pool.live() == [0] and column(pool, "alive") == [True, False]
    pool.failed(0, "died")  # its one restart
    assert pool.live() == [0] and pool.restarts == 2
    with pytest.raises(RuntimeError, match=r"every rollout replica failed.*r0: died for good"):
        pool.failed(0, "died for good")


def test_a_replica_that_does_not_come_up_is_named_when_all_are_required(inline):
    actor = miniray.remote(Replica)
    with pytest.raises(RuntimeError, match=r"w1 did not start: raised ValueError: no node"):
        ReplicaPool.start(
            2,
            lambda i: actor.remote("ok") if i == 0 else miniray.remote(NoNode).remote(),
            require_all=True,
            names=["w0", "w1"],
        )


class NoNode:
    def node(self):
        raise ValueError("no node")


def test_pause_waits_for_every_call_in_flight_and_names_one_that_does_not_stop():
    pool = ReplicaPool([object(), object()], clock=CLOCK, names=["r0", "r1"])
    CLOCK.now = 0.0
    pool.pause(timeout=1.0, grace_s=5.0)  # nothing in flight: at once
    assert pool.paused and not pool.should_stop()  # within the grace
    CLOCK.advance_to(5.0)
    assert pool.should_stop()
    pool.resume()
    assert not pool.paused and not pool.should_stop()
    with pool.cond:
        pool.begin_call(0)
        pool.begin_call(1)

    def replica_0_stops_then_time_passes():
        while not pool.paused:
            time.sleep(0.001)
        CLOCK.advance_to(100.0)  # past the pause's deadline, r1 still generating
        pool.end_call(0)

    helper = threading.Thread(target=replica_0_stops_then_time_passes)
    helper.start()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not stop within 10s \(r1 still generating\)"):
        pool.pause(timeout=10)
    helper.join()
    assert time.monotonic() - start < 5.0
    pool.end_call(1)
    pool.pause(timeout=10.0)  # none in flight now
    assert pool.in_call() == []


def test_gather_routes_by_pull_a_fast_replica_makes_more():
    pool = ReplicaPool([object(), object()])
    seconds = [0.001, 0.05]  # far apart: sleeps stretch on 2 busy cores
    calls = []

    def make(lane, count):
        calls.append((lane, count))
        time.sleep(seconds[lane])
        return [lane] * count

    made = pool.gather(40, 2, make)
    assert len(made) == 40 and all(count <= 2 for _, count in calls)
    fast, slow = made.count(0), made.count(1)
    assert fast > 3 * slow, (fast, slow)


def test_gather_raises_a_lanes_error_in_the_caller():
    pool = ReplicaPool([object(), object()])

    def make(lane, count):
        if lane == 1:
            raise ValueError("replica 1 broke")
        time.sleep(0.001)
        return [lane] * count

    with pytest.raises(ValueError, match="replica 1 broke"):
        pool.gather(10, 2, make)
