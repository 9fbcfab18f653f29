"""rl.endpoints: one call with a deadline on a plain object or an actor, our timeout told apart
from a timeout the call raised itself."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future

import pytest

import miniray
from miniray.errors import GetTimeoutError
from miniray.rl.endpoints import CallTimeoutError, Pending, call


class Endpoint:
    def __init__(self):
        self.release = threading.Event()

    def add(self, a, b=0):
        return a + b

    def fail(self):
        raise ValueError("bad input")

    def own_timeout(self):
        raise TimeoutError("my own upstream timed out")

    def hang(self, seconds=30.0):
        self.release.wait(seconds)
        return "late"


def test_a_plain_object_answers_with_its_value_or_its_own_error():
    target = Endpoint()
    deadline = time.monotonic() + 10
    assert call(target, "add", 2, b=3).result(deadline) == 5
    with pytest.raises(ValueError, match="bad input"):
        call(target, "fail").result(deadline)
    # A TimeoutError the method raised is its failure, not the caller's timeout.
    with pytest.raises(TimeoutError, match="upstream") as info:
        call(target, "own_timeout").result(deadline)
    assert not isinstance(info.value, CallTimeoutError)


def test_an_object_that_answers_at_once_runs_in_the_callers_thread():
    class Snapshot(Endpoint):
        answers_at_once = True

        def where(self):
            return threading.get_ident()

    target, deadline = Snapshot(), time.monotonic() + 10
    assert call(target, "where").result(deadline) == threading.get_ident()
    assert call(Endpoint(), "add", 1).result(deadline) == 1
    pending = call(target, "fail")  # its error waits for the caller, as a thread's would
    with pytest.raises(ValueError, match="bad input"):
        pending.result(deadline)
    # Other plain objects still run on a thread of their own (a deadline can cut them short).
    other = call(type("Plain", (), {"where": Snapshot.where})(), "where")
    assert other.result(deadline) != threading.get_ident()


def test_a_hung_plain_call_ends_at_the_deadline_with_a_named_timeout():
    target = Endpoint()
    pending = call(target, "hang")
    start = time.monotonic()
    with pytest.raises(CallTimeoutError, match=r"hang\(\) of .*Endpoint.* did not answer") as info:
        pending.result(start + 0.2)
    assert time.monotonic() - start < 5
    assert isinstance(info.value, GetTimeoutError) and isinstance(info.value, TimeoutError)
    assert info.value.what == pending.what
    assert not pending.wait(time.monotonic() + 0.05)
    target.release.set()
    assert pending.wait(time.monotonic() + 10) and pending.result(math.inf) == "late"


def test_the_caller_may_raise_its_own_timeout_error():
    class SyncLate(TimeoutError):
        pass

    pending = call(Endpoint(), "hang", 5.0)
    with pytest.raises(SyncLate, match="hang"):
        pending.result(time.monotonic() + 0.1, timeout_error=SyncLate)


def test_an_injected_clock_sets_the_deadline():
    now = [100.0]
    future: Future = Future()
    with pytest.raises(CallTimeoutError):
        Pending(future, "x").result(100.0, clock=lambda: now[0])  # already due: no wait
    future.set_result(1)
    assert Pending(future, "x").result(100.0, clock=lambda: now[0]) == 1


def test_work_started_elsewhere_and_finished_values():
    future: Future = Future()
    pending = Pending.of(future, "scores")
    assert Pending.of(pending, "other") is pending and not pending.done()
    future.set_result("s")
    assert pending.done() and pending.result(time.monotonic()) == "s"
    done = Pending.completed(7)
    assert done.done() and done.ref is None and done.result(0.0) == 7
    with pytest.raises(TypeError, match="ObjectRef"):
        Pending(object(), "nothing")


def test_an_actor_answers_and_its_timeouts_are_told_apart():
    miniray.init(backend="local", num_workers=1)
    try:
        actor = miniray.remote(Endpoint).remote()
        deadline = time.monotonic() + 30
        pending = call(actor, "add", 1, b=2)
        assert pending.ref is not None and pending.result(deadline) == 3
        with pytest.raises(ValueError, match="bad input"):
            call(actor, "fail").result(deadline)
        with pytest.raises(TimeoutError, match="upstream") as info:
            call(actor, "own_timeout").result(deadline)
        assert not isinstance(info.value, CallTimeoutError)
        hung = call(actor, "hang", 1.0)
        with pytest.raises(CallTimeoutError, match="hang"):
            hung.result(time.monotonic() + 0.2)
        both = Pending([call(actor, "add", 1).ref, call(actor, "add", 2).ref], "both")
        assert both.result(deadline) == [1, 2]
    finally:
        miniray.shutdown()
