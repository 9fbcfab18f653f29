"""Each RL invariant as a pure function: age, staleness rule, admission capacity, version bumps,
freshness metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from miniray.rl.staleness import (
    admission_capacity,
    freshness_metrics,
    in_flight_span,
    is_too_stale,
    is_valid_version_bump,
    max_admissible_samples,
    sample_age,
    version_after_sync,
)


def test_sample_age_is_trainer_version_minus_v_start():
    assert sample_age(5, 1) == 4
    assert sample_age(3, 3) == 0
    assert sample_age(2, 4) == -2  # generated with newer weights than the consumer knows
    with pytest.raises(ValueError, match="v_start=-1"):
        sample_age(3, -1)
    with pytest.raises(TypeError, match=r"v_trainer_now=1\.5"):
        sample_age(1.5, 0)


def test_too_stale_means_age_greater_than_k():
    assert is_too_stale(1, 5, 3)  # the seed's case: age 4 > 3
    assert not is_too_stale(2, 5, 3)  # age 3 == k: still usable
    assert is_too_stale(4, 5, 0)  # k = 0: strictly on-policy
    assert not is_too_stale(5, 5, 0)
    with pytest.raises(TypeError, match="verl's fractional budget"):
        is_too_stale(1, 1, 0.1)
    with pytest.raises(ValueError, match="staleness_threshold=-1"):
        is_too_stale(1, 1, -1)


def test_a_negative_age_is_fresh_not_an_error():
    # The queue hears of version v after the rollouter loaded it: samples stamped v arrive
    # while the queue is still at v - 1. They are the freshest there are, even for k = 0.
    assert sample_age(4, 5) == -1
    assert not is_too_stale(5, 4, 0)
    assert freshness_metrics([SimpleNamespace(v_start=5)], 4)["age_max"] == -1.0


def test_in_flight_span():
    assert in_flight_span(2, 4) == 2
    assert in_flight_span(3, 3) == 0
    with pytest.raises(ValueError, match="v_end=1 is invalid: must be >= v_start=2"):
        in_flight_span(2, 1)


def test_admission_capacity_concurrency_limit():
    kw = {"current_version": 0, "staleness_threshold": 10, "consumer_batch_size": 4}
    assert admission_capacity(**kw, max_concurrent=3, accepted=0, running=0) == 3
    assert admission_capacity(**kw, max_concurrent=3, accepted=0, running=2) == 1


def test_admission_capacity_staleness_limit_grows_with_the_version():
    kw = {"staleness_threshold": 1, "consumer_batch_size": 4, "max_concurrent": 100}
    assert max_admissible_samples(0, 1, 4) == 8
    assert admission_capacity(current_version=0, **kw, accepted=0, running=0) == 8
    assert admission_capacity(current_version=0, **kw, accepted=6, running=2) == 0
    assert admission_capacity(current_version=1, **kw, accepted=6, running=2) == 4
    # Negative: more were started than may ever be used at this version; start nothing.
    assert admission_capacity(current_version=0, **kw, accepted=9, running=3) == -4


def test_admission_counts_offered_groups_against_staleness_not_concurrency():
    # Groups sent to the queue whose answer is not back may still be accepted: they take
    # staleness room, but they are not generating, so the next call may start.
    kw = {"current_version": 0, "staleness_threshold": 1, "consumer_batch_size": 4}
    assert admission_capacity(**kw, max_concurrent=2, accepted=0, running=0, offered=2) == 2
    assert admission_capacity(**kw, max_concurrent=9, accepted=3, running=1, offered=2) == 2
    assert admission_capacity(**kw, max_concurrent=9, accepted=3, running=1, offered=4) == 0
    with pytest.raises(ValueError, match="offered=-1 is invalid"):
        admission_capacity(**kw, max_concurrent=9, accepted=0, running=0, offered=-1)


def test_zero_staleness_admits_exactly_one_batch_per_version():
    for v in range(3):
        cap = admission_capacity(
            current_version=v,
            staleness_threshold=0,
            consumer_batch_size=4,
            max_concurrent=100,
            accepted=4 * v,
            running=0,
        )
        assert cap == 4


def test_admission_capacity_rejects_bad_counts():
    with pytest.raises(ValueError, match="running=-1"):
        admission_capacity(
            current_version=0,
            staleness_threshold=1,
            consumer_batch_size=1,
            max_concurrent=1,
            accepted=0,
            running=-1,
        )
    with pytest.raises(ValueError, match="consumer_batch_size=0"):
        max_admissible_samples(0, 1, 0)


@pytest.mark.parametrize(("k", "duration"), [(0, 1), (1, 3), (3, 5), (2, 9)])
def test_admission_control_keeps_every_consumed_sample_within_k(k, duration):
    """Simulate a producer that admits by capacity, generations that finish in admission
    order, and a trainer consuming B samples per version oldest first: no sample is ever
    older than k, so the queue never has to reject one. (With out-of-order completion this
    is not guaranteed, which is why the queue also enforces k on put and by sweep.)"""
    batch, version, accepted, t = 4, 0, 0, 0
    running: list[tuple[int, int]] = []  # (finish time, v_start)
    ready: list[int] = []  # v_start of finished samples, in admission order
    ages: list[int] = []
    while version < 30:
        cap = admission_capacity(
            current_version=version,
            staleness_threshold=k,
            consumer_batch_size=batch,
            max_concurrent=16,
            accepted=accepted,
            running=len(running),
        )
        for _ in range(max(0, cap)):
            running.append((t + duration, version))
        t += 1
        done = sorted(r for r in running if r[0] <= t)
        running = [r for r in running if r[0] > t]
        ready.extend(v for _, v in done)
        accepted += len(done)
        ready.sort()
        if len(ready) >= batch:
            ages += [version - v for v in ready[:batch]]
            ready = ready[batch:]
            version += 1
    assert ages and max(ages) <= k
    assert max(ages) == k  # tight: the producer is not throttled more than needed


def test_version_bump_rule():
    assert is_valid_version_bump(0, 1)
    assert is_valid_version_bump(3, 7)  # skipping is fine (a failed publish in between)
    assert not is_valid_version_bump(3, 3)  # duplicate
    assert not is_valid_version_bump(3, 2)  # older
    assert version_after_sync(3, 4, succeeded=True) == 4
    assert version_after_sync(3, 4, succeeded=False) == 3  # a failed sync keeps the old one
    assert version_after_sync(3, 2, succeeded=True) == 3


def test_freshness_metrics():
    samples = [
        SimpleNamespace(v_start=5, v_end=5, created_at=100.0),
        SimpleNamespace(v_start=4, v_end=5, created_at=90.0),
        SimpleNamespace(v_start=3, v_end=3, created_at=80.0),
        SimpleNamespace(v_start=5, v_end=5, created_at=100.0),
    ]
    m = freshness_metrics(samples, 5, now=110.0)
    assert m["count"] == 4
    assert m["age_mean"] == pytest.approx(0.75) and m["age_max"] == 2
    assert m["age_p50"] == 0 and m["age_p95"] == 2
    assert m["stale_fraction"] == 0.5
    assert m["in_flight_span_max"] == 1 and m["partial_ratio"] == 0.25
    assert m["version_diversity"] == 3
    assert m["age_seconds_mean"] == pytest.approx(17.5) and m["age_seconds_max"] == 30
    assert freshness_metrics([], 3) == {"count": 0.0}
