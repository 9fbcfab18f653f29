"""Failures flowing through the local backend's head: it must survive them, free each object and
segment exactly once, and never decode a user's exception in its router thread.

The behaviour every backend shares is in tests/runtime/test_conformance.py; these tests look at
the multi-process backend's own machinery (segments, the router thread, child processes), and
the slow ones repeat each failure until a leak or a corrupted table would show.
"""

from __future__ import annotations

import collections
import gc
import threading
import time

import numpy as np
import pytest

import miniray
from miniray.exceptions import ActorDiedError, RayTaskError
from miniray.runtime import context, shm
from process_support import wait_until

LARGE = 1_000_000  # float64s: 8 MB, far above serialization.INLINE_LIMIT


class LargeError(Exception):
    """Carries an array big enough that, pickled on its own, it would go to shared memory."""

    def __init__(self, payload):
        super().__init__(payload)
        self.payload = payload


@miniray.remote(max_retries=0)
def raise_large_error(seconds):
    time.sleep(seconds)
    raise LargeError(np.ones(LARGE))


@miniray.remote(max_retries=0, num_returns=2)
def raise_large_error_twice():
    raise LargeError(np.ones(LARGE))


@miniray.remote(max_retries=0)
def fail_after(message, seconds):
    time.sleep(seconds)
    raise ValueError(message)


@miniray.remote
def identity(value):
    return value


@miniray.remote
def pair(a, b):
    return a, b


@miniray.remote
def total(a, b):
    return float(a.sum() + b.sum())


@miniray.remote
def filled(value):
    return np.full(LARGE, value)


# Thread names in which this process unpickled a RecordedError.
DECODED_IN: list[str] = []


def _rebuild_recorded(message):
    DECODED_IN.append(threading.current_thread().name)
    return RecordedError(message)


class RecordedError(Exception):
    """Notes which thread unpickles it (a user's __reduce__ is user code run by the decoder)."""

    def __reduce__(self):
        return (_rebuild_recorded, (str(self),))


@miniray.remote(max_retries=0)
def raise_recorded(seconds):
    time.sleep(seconds)
    raise RecordedError("recorded")


@miniray.remote
class Holder:
    def __init__(self, value=None):
        self.value = value

    def echo(self, value):
        return value

    def read(self):
        return self.value


@miniray.remote
class RaisesRecordedInInit:
    def __init__(self):
        raise RecordedError("recorded in init")

    def read(self):
        return 1


@miniray.remote
class RaisesUndecodableInInit:
    def __init__(self):
        raise UndecodableError(1, "in init")

    def read(self):
        return 1


class UndecodableError(Exception):
    """Pickles, does not unpickle (``__init__`` wants two arguments, ``args`` holds one)."""

    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")


@miniray.remote(max_retries=0)
def raise_undecodable():
    raise UndecodableError(2, "in a task")


def head():
    return context.current()


def settle():
    """Let released refs and unmap reports reach the head (any call drains the queue)."""
    gc.collect()
    miniray.get(miniray.put(1), timeout=10)
    time.sleep(0.2)
    miniray.get(miniray.put(1), timeout=10)


def spy_on_reclaims(monkeypatch, backend):
    """Count, per segment, how often the head hands it back for reuse."""
    counts: collections.Counter[str] = collections.Counter()
    ledger = backend._ledger  # the head's SegmentLedger decides every reclaim
    original = ledger._reclaim

    def counting(name):
        counts[name] += 1
        original(name)

    monkeypatch.setattr(ledger, "_reclaim", counting)
    return counts


def test_large_error_copied_to_dependents_frees_no_segment_twice(local_runtime, monkeypatch):
    # The error becomes the value of every dependent (and of both returns): if it owned a
    # segment, each of those objects would free it, and a segment reclaimed twice is later
    # handed to two values at once.
    reclaims = spy_on_reclaims(monkeypatch, head())
    chain = identity.remote(identity.remote(raise_large_error.remote(0.3)))
    first, second = raise_large_error_twice.remote()
    for ref in (chain, first, identity.remote(second)):
        with pytest.raises(LargeError) as info:
            miniray.get(ref, timeout=30)
        assert info.value.payload.shape == (LARGE,)
    del chain, first, second, ref
    settle()
    values = [filled.remote(float(i)) for i in range(4)]  # large values reuse freed segments
    assert [float(miniray.get(v, timeout=30)[0]) for v in values] == [0.0, 1.0, 2.0, 3.0]
    del values
    settle()
    assert all(count == 1 for count in reclaims.values()), reclaims


def test_argument_passed_twice_is_reused_once_the_call_is_done(local_runtime):
    # The worker receives one copy of a ref given twice; counting two deliveries kept its
    # segment waiting for a second "unmapped" report that never comes.
    session = head().session_id
    big = miniray.put(np.ones(LARGE))
    names = shm.list_session(session)
    assert miniray.get(total.remote(big, big), timeout=30) == 2 * LARGE
    del big
    settle()
    again = miniray.put(np.zeros(LARGE))
    assert shm.list_session(session) == names  # the freed segment was reused
    assert float(miniray.get(again, timeout=10).sum()) == 0.0


def test_failed_argument_does_not_run_the_task(local_runtime):
    # Failed before the consumer is submitted: the worker must not get the error as a value.
    failed = fail_after.remote("already failed", 0)
    with pytest.raises(ValueError):
        miniray.get(failed, timeout=30)
    with pytest.raises(ValueError, match="already failed"):
        miniray.get(identity.remote(failed), timeout=30)
    # One argument failed, the other is still running: the failure wins when it arrives.
    pending = identity.remote(fail_after.remote("not yet", 0.5))
    with pytest.raises(ValueError, match="already failed"):
        miniray.get(pair.remote(failed, pending), timeout=30)


def test_user_exceptions_are_never_unpickled_in_the_router_thread(local_runtime):
    DECODED_IN.clear()
    with pytest.raises(ActorDiedError, match="recorded in init"):
        miniray.get(RaisesRecordedInInit.remote().read.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match="recorded"):
        miniray.get(Holder.remote(raise_recorded.remote(0.3)).read.remote(), timeout=30)
    with pytest.raises(RecordedError):
        miniray.get(identity.remote(raise_recorded.remote(0.3)), timeout=30)
    assert "miniray-router" not in DECODED_IN, DECODED_IN
    assert [threading.current_thread().name] == DECODED_IN  # the get() above, in its caller


def fail_every_way_once(keeper):
    """Each failure that used to break the head, once; ``keeper`` is a live actor."""
    with pytest.raises(ValueError):
        miniray.get(identity.remote(fail_after.remote("temporary", 0.05)), timeout=30)
    with pytest.raises(ValueError):
        miniray.get(identity.remote(identity.remote(fail_after.remote("chain", 0.05))), timeout=30)
    with pytest.raises(ValueError):
        miniray.get(keeper.echo.remote(fail_after.remote("method", 0.05)), timeout=30)
    with pytest.raises(ActorDiedError, match="constructor"):
        miniray.get(Holder.remote(fail_after.remote("constructor", 0.05)).read.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match="in init"):
        miniray.get(RaisesUndecodableInInit.remote().read.remote(), timeout=30)
    with pytest.raises(RayTaskError, match="in a task"):
        miniray.get(identity.remote(raise_undecodable.remote()), timeout=30)
    with pytest.raises(LargeError):
        miniray.get(identity.remote(raise_large_error.remote(0.05)), timeout=30)


@pytest.mark.slow
def test_runtime_keeps_working_after_20_rounds_of_failures_and_leaks_nothing(local_runtime):
    backend = head()
    keeper = Holder.remote("kept")
    assert miniray.get(keeper.read.remote(), timeout=30) == "kept"
    settle()
    objects_before = len(backend._objects)
    segments_before = set(shm.list_session(backend.session_id))
    for _ in range(20):
        fail_every_way_once(keeper)
    settle()
    # Later calls work, on tasks and on the actor that saw failed arguments.
    assert miniray.get(identity.remote(5), timeout=30) == 5
    assert miniray.get(keeper.echo.remote(6), timeout=30) == 6
    assert float(miniray.get(filled.remote(7.0), timeout=30)[0]) == 7.0
    settle()
    # Nothing piles up: every failed object was freed, every dead actor's process is gone,
    # and no segment was created for an error.
    assert len(backend._objects) == objects_before
    assert not backend._tasks
    wait_until(
        lambda: len(backend.child_pids()) == 3, timeout=15.0, what="dead actors' processes to exit"
    )
    # (At most one new segment: the one filled(7.0) wrote, if no freed one was free to reuse.)
    assert len(set(shm.list_session(backend.session_id)) - segments_before) <= 1


@pytest.mark.slow
def test_20_large_errors_through_chains_never_share_a_segment(local_runtime):
    # Segments are reused round after round, so the check is what a double free breaks: two
    # values alive at once must never land in the same segment.
    for round_ in range(20):
        with pytest.raises(LargeError):
            miniray.get(identity.remote(identity.remote(raise_large_error.remote(0))), timeout=30)
        expected = [float(round_ * 4 + i) for i in range(4)]
        values = [filled.remote(x) for x in expected]
        assert [float(miniray.get(v, timeout=30)[0]) for v in values] == expected, round_
        del values
        settle()
