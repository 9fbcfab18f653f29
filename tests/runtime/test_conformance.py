"""The runtime's Ray semantics, run against every backend (the `runtime` fixture).

A new backend passes these tests or it does not ship. Functions and classes live at module level
because the multi-process backend imports them by module in its children.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

import miniray
from miniray.exceptions import (
    ActorAlreadyExistsError,
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RaySystemError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)


@miniray.remote
def double(x):
    return x * 2


@miniray.remote
def add(a, b=0):
    return a + b


@miniray.remote
def identity(x):
    return x


@miniray.remote
def sleep_then(value, seconds):
    time.sleep(seconds)
    return value


@miniray.remote
def fail_with_value_error(message):
    raise ValueError(message)


@miniray.remote
def kind_of(value):
    return type(value).__name__


@miniray.remote(num_returns=3)
def three_values():
    return 1, "two", [3]


@miniray.remote
def call_actor(counter, times):
    return miniray.get([counter.increment.remote() for _ in range(times)], timeout=30)


@miniray.remote
def nested_sum(depth):
    if depth == 0:
        return 1
    return 1 + sum(miniray.get([nested_sum.remote(depth - 1) for _ in range(2)], timeout=60))


@miniray.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, by=1):
        self.value += by
        return self.value

    def read(self):
        return self.value

    def fail(self):
        raise KeyError("no such key")

    def slow(self, seconds):
        time.sleep(seconds)
        return self.value

    def pid(self):
        return os.getpid()


@miniray.remote
class Caller:
    """An actor that calls another actor through a handle it was given."""

    def __init__(self, counter):
        self.counter = counter

    def bump(self, times):
        return miniray.get([self.counter.increment.remote() for _ in range(times)], timeout=30)


@miniray.remote
class AsyncSleeper:
    async def nap(self, seconds):
        await asyncio.sleep(seconds)
        return seconds


@miniray.remote(max_concurrency=4)
class Threaded:
    def nap(self, seconds):
        time.sleep(seconds)
        return threading.get_ident()


@miniray.remote
class BrokenInit:
    def __init__(self):
        raise RuntimeError("cannot start")

    def anything(self):
        return 1


@miniray.remote
class TensorStore:
    def __init__(self):
        self.tensor = None

    def store(self, tensor):
        self.tensor = tensor
        return float(tensor.sum())

    def fetch(self):
        return self.tensor

    def add_in_place(self, amount):
        self.tensor.add_(amount)
        return float(self.tensor.sum())

    def echo(self, value):
        return value


@miniray.remote(max_retries=0)
def fail_after(message, seconds):
    """Fails late, so that its consumers are already queued waiting for it."""
    time.sleep(seconds)
    raise ValueError(message)


@miniray.remote
def get_first(refs):
    return miniray.get(refs[0], timeout=30)


@miniray.remote(num_returns=2)
def two_failures():
    raise ValueError("both returns fail")


def _make_two_arg_error():
    class TwoArgError(Exception):
        """Pickles, but does not unpickle: unpickling calls ``TwoArgError(*args)`` with the one
        message ``super().__init__`` stored, and ``__init__`` wants two."""

        def __init__(self, code, detail):
            super().__init__(f"code {code}: {detail}")

    return TwoArgError


# Made in a function so that cloudpickle ships the class by value: Ray's workers cannot import
# this test module by name (the local backend's can).
TwoArgError = _make_two_arg_error()


@miniray.remote
def raise_two_arg_error():
    raise TwoArgError(7, "undecodable")


@miniray.remote
class TwoArgErrorInInit:
    def __init__(self):
        raise TwoArgError(8, "undecodable in init")

    def anything(self):
        return 1


@miniray.remote
class Echo:
    def __init__(self, value=None):
        self.value = value

    def echo(self, value):
        return value

    def first_of(self, refs):
        return miniray.get(refs[0], timeout=30)

    def raise_two_arg_error(self):
        raise TwoArgError(9, "undecodable in a method")

    def read(self):
        return self.value


@miniray.remote(max_retries=2, retry_exceptions=[ConnectionError])
def flaky(path):
    """Fails with ConnectionError twice (counted in a file), then succeeds."""
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        attempts = len(f.read())
    if attempts < 3:
        raise ConnectionError(f"attempt {attempts}")
    return attempts


@miniray.remote(max_retries=2)
def exit_on_attempts(path, exits, code=0, raise_first=None, value="done"):
    """Counts its attempts in a file; attempts in ``exits`` call sys.exit(code), attempt 1
    raises ``raise_first`` when given, any other returns ``value``."""
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        attempt = len(f.read())
    if attempt == 1 and raise_first is not None:
        raise raise_first(f"attempt {attempt}")
    if attempt in exits:
        sys.exit(code)
    return value


def attempts_in(path):
    with open(path) as f:
        return len(f.read())


@miniray.remote
def count_up(n, fail_at=None, hold=None):
    """Yields 0..n-1; raises at ``fail_at``; after the first value waits (30 s at most) for the
    file ``hold`` to exist."""
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"failed at {i}")
        yield i
        deadline = time.monotonic() + 30
        while i == 0 and hold is not None and not os.path.exists(hold):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{hold} never appeared")
            time.sleep(0.01)


@miniray.remote(max_retries=2, retry_exceptions=[ConnectionError])
def replayed_stream(path, n, how):
    """Yields (attempt, i) for i < n; attempt 1 fails after two values, by ``how``: "raise"
    (ConnectionError) or "exit" (sys.exit)."""
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        attempt = len(f.read())
    for i in range(n):
        if attempt == 1 and i == 2:
            if how == "exit":
                sys.exit(1)
            raise ConnectionError("first attempt")
        yield attempt, i


@miniray.remote
class Streamer:
    """Generator methods (sync): each yields into ``self.log`` as well as to its caller."""

    def __init__(self):
        self.log = []
        self.attempts = 0

    def count(self, n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"failed at {i}")
            time.sleep(0.01)
            self.log.append(i)
            yield i

    def exit_after(self, n, code):
        yield from range(n)
        sys.exit(code)

    @miniray.method(max_task_retries=1, retry_exceptions=[ConnectionError])
    def replayed(self, n):
        """Yields (attempt, i); attempt 1 raises ConnectionError after two values."""
        self.attempts += 1
        for i in range(n):
            if self.attempts == 1 and i == 2:
                raise ConnectionError("first attempt")
            yield self.attempts, i

    def read(self):
        return self.log


@miniray.remote
class AsyncStreamer:
    async def count(self, n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"failed at {i}")
            await asyncio.sleep(0.01)
            yield i

    def sync_count(self, n):  # a sync generator method of an async actor streams too
        yield from range(n)


@miniray.remote
class Cancellee:
    """Calls that mark their start (a file) and log how they ended in ``self.log``."""

    def __init__(self):
        self.log = []

    def slow(self, started, seconds):
        open(started, "w").close()
        time.sleep(seconds)  # a cancel does not interrupt it (as in Ray)
        self.log.append("finished")
        return "finished"

    def quick(self):
        self.log.append("quick ran")
        return "quick"

    def read(self):
        return self.log


@miniray.remote
class AsyncCancellee:
    def __init__(self):
        self.log = []

    async def slow(self, started, swallow=False):
        open(started, "w").close()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.log.append("cancelled")
            if swallow:  # Ray's caller still gets TaskCancelledError
                return "swallowed"
            raise
        return "finished"

    async def read(self):
        return self.log


def _make_task_helpers():
    def touch(path):
        with open(path, "w"):
            pass

    def spin(seconds):
        """Busy for ``seconds`` in short sleeps: a cancel's KeyboardInterrupt lands between
        bytecodes (on Ray and inline it does not cut a long ``time.sleep`` short)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)

    return touch, spin


# Made in a function so that cloudpickle ships them by value with the tasks that call them
# (as TwoArgError below): Ray's workers cannot import this module by name.
touch, spin = _make_task_helpers()


@miniray.remote
def spin_marked(started, seconds=60, interrupted=None, finished=None):
    """Touches ``started``, spins, touches ``finished``; ``interrupted`` if cancelled."""
    try:  # the marker is inside: the interrupt may land as soon as the file exists
        touch(started)
        spin(seconds)
    except KeyboardInterrupt:
        if interrupted is not None:
            touch(interrupted)
        raise
    if finished is not None:
        touch(finished)
    return "finished"


@miniray.remote
def catch_cancel(started):
    try:  # the marker is inside: the interrupt may land as soon as it exists
        touch(started)
        spin(60)
    except KeyboardInterrupt:
        return "caught"
    return "finished"


@miniray.remote
def parent_of_spinner(started, child_started, child_seconds, interrupted, finished):
    """Submits a spinning child and waits for it (a task blocked in get on its child)."""
    child = spin_marked.remote(child_started, child_seconds, interrupted, finished)
    touch(started)
    return miniray.get(child, timeout=120)


def wait_until(*args, **kwargs):
    # Imported here, in the driver: Ray's workers import this module and cannot import that one.
    from process_support import wait_until as poll

    poll(*args, **kwargs)


def started(ref, marker):
    """Wait until the task behind ``ref`` touched ``marker``: a cancel then meets it running."""
    wait_until(lambda: os.path.exists(marker), timeout=60, what=f"{ref!r} to start")
    return ref


@miniray.remote(max_task_retries=2)
class FlakyActor:
    """Counts attempts in its state; ``fail_until(n)`` raises until its n-th attempt."""

    def __init__(self):
        self.attempts = 0

    def fail_until(self, succeed_at):
        self.attempts += 1
        if self.attempts < succeed_at:
            raise ValueError(f"attempt {self.attempts}")
        return self.attempts

    @miniray.method(retry_exceptions=True)
    def fail_until_retried(self, succeed_at):
        return self.fail_until(succeed_at)

    def made(self):
        attempts, self.attempts = self.attempts, 0
        return attempts


@miniray.remote(max_task_retries=2)
class AsyncFlakyActor:
    def __init__(self):
        self.attempts = 0

    async def fail_until(self, succeed_at):
        self.attempts += 1
        await asyncio.sleep(0)
        if self.attempts < succeed_at:
            raise ValueError(f"attempt {self.attempts}")
        return self.attempts


@miniray.remote
class Exiter:
    """Ends itself by sys.exit (a crash or a clean exit, by code) or by exit_actor()."""

    def __init__(self):
        self.calls = 0

    def bump(self):
        self.calls += 1
        return self.calls

    def slow(self, seconds):
        time.sleep(seconds)
        return self.calls

    def exit(self, code):
        sys.exit(code)

    def quit(self):
        miniray.actor.exit_actor()
        return "unreachable"

    def quit_catching_exceptions(self):
        try:
            miniray.actor.exit_actor()
        except Exception:  # exit_actor raises a SystemExit, as Ray's: not caught here
            return "swallowed"
        return "unreachable"


# ------------------------------------------------------------------------------- tasks


def test_task_returns_value(runtime):
    assert miniray.get(double.remote(21), timeout=30) == 42


def test_top_level_refs_are_resolved_nested_refs_are_not(runtime):
    ref = double.remote(2)
    assert miniray.get(add.remote(ref, b=double.remote(3)), timeout=30) == 10
    assert miniray.get(kind_of.remote([ref]), timeout=30) == "list"
    assert miniray.get(kind_of.remote(ref), timeout=30) == "int"


def test_num_returns_gives_one_ref_per_value(runtime):
    refs = three_values.remote()
    assert len(refs) == 3
    assert miniray.get(refs, timeout=30) == [1, "two", [3]]


def test_options_override_num_returns(runtime):
    a, b = identity.options(num_returns=2).remote((1, 2))
    assert miniray.get([a, b], timeout=30) == [1, 2]


def test_get_keeps_list_order(runtime):
    refs = [sleep_then.remote(i, 0.2 - i * 0.05) for i in range(4)]
    assert miniray.get(refs, timeout=30) == [0, 1, 2, 3]


def test_put_and_get(runtime):
    ref = miniray.put({"a": [1, 2, 3]})
    assert miniray.get(ref, timeout=5) == {"a": [1, 2, 3]}
    assert miniray.get(kind_of.remote(ref), timeout=30) == "dict"


def test_put_ref_passed_to_task(runtime):
    ref = miniray.put(7)
    assert miniray.get(double.remote(ref), timeout=30) == 14


def test_get_timeout_raises_get_timeout_error_which_is_timeout_error(runtime):
    ref = sleep_then.remote(1, 3)
    start = time.monotonic()
    with pytest.raises(GetTimeoutError) as info:
        miniray.get(ref, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 2


def test_get_timeout_zero_returns_ready_values_and_raises_for_pending(runtime):
    ready = miniray.put(1)
    assert miniray.get(ready, timeout=0) == 1
    with pytest.raises(TimeoutError):
        miniray.get(sleep_then.remote(1, 2), timeout=0)


def test_get_rejects_negative_timeout(runtime):
    with pytest.raises(ValueError, match="timeout"):
        miniray.get(miniray.put(1), timeout=-1)


def test_remote_error_is_both_ray_task_error_and_original_type(runtime):
    with pytest.raises(ValueError) as info:
        miniray.get(fail_with_value_error.remote("bad input 17"), timeout=30)
    error = info.value
    assert isinstance(error, RayTaskError)
    assert isinstance(error.cause, ValueError)
    text = str(error)
    assert "bad input 17" in text
    assert "fail_with_value_error" in text  # the remote traceback names the function
    assert "Traceback" in text


def test_error_propagates_to_dependent_task(runtime):
    failed = fail_with_value_error.remote("upstream broke")
    with pytest.raises(ValueError, match="upstream broke"):
        miniray.get(double.remote(failed), timeout=30)


def assert_still_works():
    """After a failure the runtime must still run tasks and actors."""
    assert miniray.get(double.remote(21), timeout=30) == 42
    counter = Counter.remote(1)
    assert miniray.get(counter.increment.remote(), timeout=30) == 2


def assert_is_the_upstream_value_error(error, message):
    assert isinstance(error, RayTaskError)
    assert isinstance(error.cause, ValueError)
    assert message in str(error)
    assert "fail_after" in str(error)  # the text names the function that raised


def test_failed_temporary_argument_fails_the_consumer_and_later_calls_work(runtime):
    # The failed ref is not held by the driver: the consumer is its last user.
    with pytest.raises(ValueError) as info:
        miniray.get(double.remote(fail_after.remote("no value", 0.3)), timeout=30)
    assert_is_the_upstream_value_error(info.value, "no value")
    assert_still_works()


def test_error_propagates_through_a_chain_of_dependent_tasks(runtime):
    ref = fail_after.remote("deep failure", 0.3)
    for _ in range(3):
        ref = identity.remote(ref)
    with pytest.raises(ValueError) as info:
        miniray.get(ref, timeout=30)
    assert_is_the_upstream_value_error(info.value, "deep failure")
    del ref
    assert_still_works()


def test_failed_argument_fails_the_actor_method_and_the_actor_goes_on(runtime):
    actor = Echo.remote("kept")
    assert miniray.get(actor.read.remote(), timeout=30) == "kept"  # alive, waiting for calls
    with pytest.raises(ValueError) as info:
        miniray.get(actor.echo.remote(fail_after.remote("bad method arg", 0.3)), timeout=30)
    assert_is_the_upstream_value_error(info.value, "bad method arg")
    assert miniray.get(actor.echo.remote(5), timeout=30) == 5
    assert_still_works()


def test_failed_argument_of_the_constructor_kills_the_actor_with_the_cause(runtime):
    actor = Echo.remote(fail_after.remote("bad init arg", 0.3))
    with pytest.raises(ActorDiedError) as info:
        miniray.get(actor.read.remote(), timeout=30)
    assert "bad init arg" in str(info.value)
    assert "ValueError" in str(info.value)
    assert_still_works()


def test_failed_nested_ref_raises_where_it_is_got(runtime):
    # Nested refs are passed as refs (Ray does not resolve them): get() inside raises.
    with pytest.raises(ValueError) as info:
        miniray.get(get_first.remote([fail_after.remote("nested task", 0.1)]), timeout=30)
    assert_is_the_upstream_value_error(info.value, "nested task")
    actor = Echo.remote()
    with pytest.raises(ValueError) as info:
        miniray.get(actor.first_of.remote([fail_after.remote("nested call", 0.1)]), timeout=30)
    assert_is_the_upstream_value_error(info.value, "nested call")
    assert_still_works()


def test_each_failed_return_of_a_multi_return_task_propagates(runtime):
    first, second = two_failures.remote()
    with pytest.raises(ValueError, match="both returns fail"):
        miniray.get(first, timeout=30)
    with pytest.raises(ValueError, match="both returns fail"):
        miniray.get(identity.remote(second), timeout=30)
    del first, second
    assert_still_works()


def assert_undecodable_error_text(error, detail, function):
    """An exception that cannot be unpickled still tells its type, message and traceback."""
    from miniray.exceptions import RayError

    assert isinstance(error, RayError)
    text = str(error)
    assert "TwoArgError" in text
    assert detail in text
    assert f", in {function}" in text  # a frame of the remote traceback


@pytest.mark.parametrize("where", ["task", "method", "dependency"])
def test_exception_that_does_not_unpickle_keeps_type_message_and_traceback(runtime, where):
    actor = Echo.remote()
    if where == "task":
        ref = raise_two_arg_error.remote()
    elif where == "method":
        ref = actor.raise_two_arg_error.remote()
    else:
        ref = identity.remote(raise_two_arg_error.remote())
    with pytest.raises(Exception) as info:
        miniray.get(ref, timeout=30)
    detail = "undecodable in a method" if where == "method" else "undecodable"
    assert_undecodable_error_text(info.value, detail, "raise_two_arg_error")
    assert isinstance(info.value, RayTaskError)
    assert miniray.get(actor.echo.remote(3), timeout=30) == 3
    assert_still_works()


def test_exception_that_does_not_unpickle_raised_in_init_kills_only_that_actor(runtime):
    actor = TwoArgErrorInInit.remote()
    with pytest.raises(ActorDiedError) as info:
        miniray.get(actor.anything.remote(), timeout=30)
    assert_undecodable_error_text(info.value, "undecodable in init", "__init__")
    assert_still_works()


def test_exception_that_does_not_unpickle_given_to_init_kills_only_that_actor(runtime):
    actor = Echo.remote(raise_two_arg_error.remote())
    with pytest.raises(ActorDiedError) as info:
        miniray.get(actor.read.remote(), timeout=30)
    assert_undecodable_error_text(info.value, "undecodable", "raise_two_arg_error")
    assert_still_works()


def test_retry_exceptions_reruns_listed_exceptions(runtime, tmp_path):
    assert miniray.get(flaky.remote(str(tmp_path / "count")), timeout=30) == 3


def test_retry_exceptions_not_listed_fail_at_once(runtime, tmp_path):
    path = str(tmp_path / "count")
    with pytest.raises(ConnectionError):
        miniray.get(flaky.options(max_retries=1).remote(path), timeout=30)


@pytest.mark.parametrize("code", [0, 3, "a message"])
def test_sys_exit_in_a_task_is_a_worker_crash_retried_under_max_retries(runtime, tmp_path, code):
    # As on Ray: the worker process ends, whatever the code; the task is retried without
    # retry_exceptions, never more than max_retries times, then fails with WorkerCrashedError.
    path = str(tmp_path / "count")
    with pytest.raises(WorkerCrashedError):
        miniray.get(exit_on_attempts.remote(path, exits=[1, 2, 3, 4], code=code), timeout=60)
    assert attempts_in(path) == 3  # 1 + max_retries
    assert_still_works()


def test_task_that_exits_once_succeeds_on_its_retry(runtime, tmp_path):
    path = str(tmp_path / "count")
    assert miniray.get(exit_on_attempts.remote(path, exits=[1]), timeout=60) == "done"
    assert attempts_in(path) == 2


def test_sys_exit_in_a_task_with_no_retries_fails_at_once(runtime, tmp_path):
    path = str(tmp_path / "count")
    exiting = exit_on_attempts.options(max_retries=0, retry_exceptions=True)
    with pytest.raises(WorkerCrashedError):
        miniray.get(exiting.remote(path, exits=[1]), timeout=60)
    assert attempts_in(path) == 1


def test_task_exits_and_listed_exceptions_share_max_retries(runtime, tmp_path):
    path = str(tmp_path / "count")
    task = exit_on_attempts.options(retry_exceptions=[ConnectionError])
    with pytest.raises(WorkerCrashedError):  # attempt 1 raised, 2 and 3 exited: none left
        miniray.get(task.remote(path, exits=[2, 3], raise_first=ConnectionError), timeout=60)
    assert attempts_in(path) == 3


# ------------------------------------------------------------------------------- generators


def test_a_generator_task_streams_one_ref_per_value(runtime):
    stream = count_up.remote(4)  # a generator function streams by default, as in Ray
    assert isinstance(stream, miniray.ObjectRefGenerator)
    refs = list(stream)
    assert all(isinstance(r, miniray.ObjectRef) for r in refs)
    assert miniray.get(refs, timeout=30) == [0, 1, 2, 3]
    explicit = count_up.options(num_returns="streaming").remote(2)
    assert [miniray.get(r, timeout=30) for r in explicit] == [0, 1]
    assert explicit.is_finished()


def test_a_streamed_ref_comes_before_the_task_ends(runtime, tmp_path):
    hold = str(tmp_path / "hold")
    stream = count_up.remote(2, hold=hold)
    assert miniray.get(next(stream), timeout=30) == 0  # the task now waits for `hold`
    start = time.monotonic()
    nothing = stream._next_sync(timeout_s=0.3)  # Ray's timeout path: a nil ref
    assert nothing.is_nil() and time.monotonic() - start >= 0.25
    assert not stream.is_finished()
    with open(hold, "w"):
        pass
    assert miniray.get(stream._next_sync(timeout_s=30), timeout=30) == 1
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.is_finished()


def test_an_exception_in_a_generator_is_the_ref_after_its_last_value(runtime):
    stream = count_up.options(max_retries=0).remote(5, fail_at=2)
    assert miniray.get([next(stream), next(stream)], timeout=30) == [0, 1]
    failed = next(stream)  # as in Ray: next() returns a ref, get() raises
    with pytest.raises(ValueError, match="failed at 2"):
        miniray.get(failed, timeout=30)
    with pytest.raises(StopIteration):
        next(stream)


def ray_replayed_values(values):
    """What Ray 2.60 streams of a generator whose attempt 1 failed after two values: Ray may
    not have reported attempt 1's values before the failure, and then the retry streams them
    (its second value seen so once, its first once, each in a full run on 2 busy cores). Either
    way no value repeats, the attempts never go back, and the values after the failure are
    attempt 2's."""
    attempts = [attempt for attempt, _ in values]
    assert set(attempts[:2]) <= {1, 2} and attempts == sorted(attempts)
    assert values[2:] == [(2, 2), (2, 3)]


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_retried_generator_does_not_repeat_values_the_caller_has(runtime, tmp_path, how):
    # The retry runs the generator again from its start; the two values of attempt 1 that the
    # caller already holds are not streamed twice (as in Ray).
    path = str(tmp_path / "count")
    values = [miniray.get(r, timeout=60) for r in replayed_stream.remote(path, 4, how)]
    assert [value for _, value in values] == [0, 1, 2, 3]  # each value once, in order
    assert attempts_in(path) == 2
    if runtime == "ray":
        ray_replayed_values(values)
    else:
        # The embedded backends report each value as it is yielded: attempt 1's two stay.
        assert values == [(1, 0), (1, 1), (2, 2), (2, 3)]


def test_a_generator_actor_method_streams_and_holds_its_actor(runtime):
    streamer = Streamer.remote()
    stream = streamer.count.remote(3)  # a generator method streams by default, as in Ray
    assert isinstance(stream, miniray.ObjectRefGenerator)
    log = streamer.read.remote()  # submitted behind the stream: runs once it has ended
    assert [miniray.get(r, timeout=30) for r in stream] == [0, 1, 2]
    assert miniray.get(log, timeout=30) == [0, 1, 2]
    explicit = streamer.count.options(num_returns="streaming").remote(2)
    assert [miniray.get(r, timeout=30) for r in explicit] == [0, 1]
    assert explicit.is_finished()


def test_an_async_generator_method_streams(runtime):
    streamer = AsyncStreamer.remote()
    stream = streamer.count.remote(3)
    assert isinstance(stream, miniray.ObjectRefGenerator)
    assert [miniray.get(r, timeout=30) for r in stream] == [0, 1, 2]
    assert [miniray.get(r, timeout=30) for r in streamer.sync_count.remote(2)] == [0, 1]


@pytest.mark.parametrize("actor_class", [Streamer, AsyncStreamer], ids=["sync", "async"])
def test_an_exception_in_a_generator_method_is_the_ref_after_its_last_value(runtime, actor_class):
    streamer = actor_class.remote()
    stream = streamer.count.remote(5, fail_at=2)
    assert miniray.get([next(stream), next(stream)], timeout=30) == [0, 1]
    with pytest.raises(ValueError, match="failed at 2"):
        miniray.get(next(stream), timeout=30)
    with pytest.raises(StopIteration):
        next(stream)
    assert [miniray.get(r, timeout=30) for r in streamer.count.remote(1)] == [0]  # still alive


def test_an_actor_dying_mid_stream_ends_it_with_actor_died_error(runtime):
    streamer = Streamer.remote()
    stream = streamer.exit_after.remote(2, 3)  # sys.exit(3): a crash, and no restarts
    assert miniray.get([next(stream), next(stream)], timeout=30) == [0, 1]
    with pytest.raises(ActorDiedError):
        miniray.get(next(stream), timeout=60)
    with pytest.raises(StopIteration):
        next(stream)


def test_a_retried_generator_method_does_not_repeat_values_the_caller_has(runtime):
    streamer = Streamer.remote()
    values = [miniray.get(r, timeout=60) for r in streamer.replayed.remote(4)]
    assert [value for _, value in values] == [0, 1, 2, 3]  # each value once, in order
    if runtime == "ray":
        ray_replayed_values(values)
    else:
        assert values == [(1, 0), (1, 1), (2, 2), (2, 3)]


def test_streaming_is_refused_where_it_cannot_work(runtime):
    with pytest.raises(ValueError, match="generator"):
        double.options(num_returns="streaming").remote(1)
    with pytest.raises(ValueError, match="dynamic"):
        count_up.options(num_returns="dynamic")
    counter = Counter.remote()
    with pytest.raises(ValueError, match="generator"):
        counter.increment.options(num_returns="streaming").remote()
    import pickle

    with pytest.raises(TypeError, match="ObjectRefGenerator"):
        pickle.dumps(count_up.remote(1))


def test_cancel_a_queued_actor_call_it_never_runs(runtime, tmp_path):
    actor = Cancellee.remote()
    marker = str(tmp_path / "started")
    running = started(actor.slow.remote(marker, 1), marker)
    queued = actor.quick.remote()  # behind `running`: a sync actor runs one call at a time
    miniray.cancel(queued)
    with pytest.raises(TaskCancelledError):
        miniray.get(queued, timeout=60)
    assert miniray.get(running, timeout=60) == "finished"
    if runtime == "ray":
        # Ray 2.60 may still run a call it already sent to the actor (its result is dropped
        # all the same), and after such a cancel it may never answer that actor's next call
        # (a full run's read timed out after 30 s; "Timed out waiting for seq_no" when probed):
        # a Ray bug, so what ran is checked on the embedded backends only.
        return
    assert miniray.get(actor.read.remote(), timeout=30) == ["finished"]  # never started


def test_cancel_a_running_sync_actor_call_lets_it_run_but_drops_its_result(runtime, tmp_path):
    # Ray 2.60 does not interrupt a running sync (or threaded) actor call; get raises
    # TaskCancelledError once it has ended.
    actor = Cancellee.remote()
    marker = str(tmp_path / "started")
    running = started(actor.slow.remote(marker, 1), marker)
    miniray.cancel(running)
    with pytest.raises(TaskCancelledError):
        miniray.get(running, timeout=60)
    assert miniray.get(actor.read.remote(), timeout=30) == ["finished"]


@pytest.mark.parametrize("swallow", [False, True], ids=["raises", "swallows"])
def test_cancel_a_running_async_actor_call_cancels_its_coroutine(runtime, tmp_path, swallow):
    actor = AsyncCancellee.remote()
    marker = str(tmp_path / "started")
    running = started(actor.slow.remote(marker, swallow), marker)
    miniray.cancel(running)
    with pytest.raises(TaskCancelledError):
        miniray.get(running, timeout=30)  # at once: the coroutine's sleep was cut short
    wait_until(
        lambda: miniray.get(actor.read.remote(), timeout=30) == ["cancelled"],
        timeout=30,
        what="the coroutine to see CancelledError",
    )


def test_cancel_of_an_actor_call_refuses_force_and_leaves_a_finished_one(runtime):
    actor = Cancellee.remote()
    done = actor.quick.remote()
    assert miniray.get(done, timeout=30) == "quick"
    miniray.cancel(done)
    assert miniray.get(done, timeout=30) == "quick"
    with pytest.raises(ValueError, match="force=True is not supported for actor tasks"):
        miniray.cancel(actor.quick.remote(), force=True)


def test_nested_tasks_blocked_in_get_do_not_deadlock(runtime):
    # 2 workers, 15 tasks each waiting on children: needs workers freed while blocked.
    assert miniray.get(nested_sum.remote(3), timeout=60) == 15


# ------------------------------------------------------------------------------- wait


def test_wait_returns_first_ready_and_keeps_input_order(runtime):
    slow = sleep_then.remote("slow", 2)
    fast = sleep_then.remote("fast", 0)
    ready, not_ready = miniray.wait([slow, fast], num_returns=1, timeout=10)
    assert ready == [fast] and not_ready == [slow]
    ready, not_ready = miniray.wait([slow, fast], num_returns=2, timeout=10)
    assert ready == [slow, fast] and not_ready == []


def test_wait_timeout_returns_partial(runtime):
    slow = sleep_then.remote("slow", 3)
    done = miniray.put(1)
    start = time.monotonic()
    ready, not_ready = miniray.wait([slow, done], num_returns=2, timeout=0.3)
    assert ready == [done] and not_ready == [slow]
    assert time.monotonic() - start < 2


def test_wait_input_errors(runtime):
    ref = miniray.put(1)
    with pytest.raises(TypeError):
        miniray.wait(ref)
    with pytest.raises(ValueError, match="unique"):
        miniray.wait([ref, ref])
    with pytest.raises(ValueError, match="num_returns"):
        miniray.wait([ref], num_returns=2)
    with pytest.raises(ValueError, match="num_returns=0"):
        miniray.wait([ref], num_returns=0)


def test_wait_on_no_refs_returns_two_empty_lists_whatever_num_returns(runtime):
    for num_returns in (1, 0, 3):
        assert miniray.wait([], num_returns=num_returns) == ([], [])
        assert miniray.wait([], num_returns=num_returns, timeout=0) == ([], [])
    if runtime == "ray":  # the expectation is Ray's own
        import ray

        for num_returns in (1, 0, 3):
            assert ray.wait([], num_returns=num_returns) == ([], [])
        with pytest.raises(ValueError):
            ray.wait([miniray.put(1).ray_ref], num_returns=0)


# ------------------------------------------------------------------------------- actors


def test_actor_keeps_state_and_runs_one_callers_calls_in_order(runtime):
    counter = Counter.remote(10)
    refs = [counter.increment.remote() for _ in range(50)]
    assert miniray.get(refs, timeout=30) == list(range(11, 61))


def test_actor_method_error_keeps_actor_alive(runtime):
    counter = Counter.remote()
    with pytest.raises(KeyError):
        miniray.get(counter.fail.remote(), timeout=30)
    assert miniray.get(counter.increment.remote(), timeout=30) == 1


def test_actor_init_failure_makes_calls_raise_actor_died(runtime):
    actor = BrokenInit.remote()
    with pytest.raises(ActorDiedError, match="cannot start"):
        miniray.get(actor.anything.remote(), timeout=30)


def test_actor_handle_can_be_passed_to_tasks_and_actors(runtime):
    counter = Counter.remote()
    assert miniray.get(call_actor.remote(counter, 3), timeout=30) == [1, 2, 3]
    caller = Caller.remote(counter)
    assert miniray.get(caller.bump.remote(2), timeout=30) == [4, 5]
    assert miniray.get(counter.read.remote(), timeout=30) == 5


def test_threaded_actor_runs_calls_concurrently(runtime):
    actor = Threaded.remote()
    miniray.get(actor.nap.remote(0), timeout=30)  # started
    start = time.monotonic()
    idents = miniray.get([actor.nap.remote(0.5) for _ in range(4)], timeout=30)
    assert time.monotonic() - start < 1.5
    assert len(set(idents)) > 1


def test_async_actor_interleaves_at_await(runtime):
    actor = AsyncSleeper.remote()
    miniray.get(actor.nap.remote(0), timeout=30)
    start = time.monotonic()
    assert miniray.get([actor.nap.remote(0.5) for _ in range(4)], timeout=30) == [0.5] * 4
    assert time.monotonic() - start < 1.5


def test_async_actor_with_max_concurrency_one_serialises(runtime):
    actor = AsyncSleeper.options(max_concurrency=1).remote()
    miniray.get(actor.nap.remote(0), timeout=30)
    start = time.monotonic()
    miniray.get([actor.nap.remote(0.3) for _ in range(3)], timeout=30)
    assert time.monotonic() - start >= 0.85


def test_named_actor_lookup_and_get_if_exists(runtime):
    counter = Counter.options(name="shared-counter").remote()
    miniray.get(counter.increment.remote(5), timeout=30)
    found = miniray.get_actor("shared-counter")
    assert miniray.get(found.read.remote(), timeout=30) == 5
    again = Counter.options(name="shared-counter", get_if_exists=True).remote()
    assert miniray.get(again.read.remote(), timeout=30) == 5
    with pytest.raises(ActorAlreadyExistsError):
        Counter.options(name="shared-counter").remote()
    with pytest.raises(ValueError, match="no-such-actor"):
        miniray.get_actor("no-such-actor")


def test_kill_makes_later_calls_raise_actor_died(runtime):
    counter = Counter.remote()
    miniray.get(counter.increment.remote(), timeout=30)
    miniray.kill(counter)
    with pytest.raises(ActorDiedError):
        miniray.get(counter.read.remote(), timeout=10)
    assert issubclass(ActorDiedError, RayActorError)


# ------------------------------------------------------------------------------- values


def test_torch_tensors_round_trip_and_mutation_does_not_leak(runtime):
    store = TensorStore.remote()
    big = torch.arange(1_000_000, dtype=torch.float32)
    assert miniray.get(store.store.remote(big), timeout=30) == float(big.sum())
    fetched = miniray.get(store.fetch.remote(), timeout=30)
    assert torch.equal(fetched, big)
    fetched.add_(1)  # the caller's copy is its own
    assert torch.equal(miniray.get(store.fetch.remote(), timeout=30), big)
    miniray.get(store.add_in_place.remote(1.0), timeout=30)  # and the actor's is its own
    assert torch.equal(fetched, big + 1)


def test_tensor_dtypes_shapes_and_parameters_survive(runtime):
    store = TensorStore.remote()
    values = {
        "bf16": torch.randn(300, 500).to(torch.bfloat16),
        "int": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "bool": torch.tensor([True, False]),
        "strided": torch.randn(600, 600).t(),
        "param": torch.nn.Parameter(torch.randn(3)),
        "empty": torch.empty(0, 4),
        "numpy": np.arange(100_000, dtype=np.float64),
    }
    out = miniray.get(store.echo.remote(values), timeout=30)
    for key in ("bf16", "int", "bool", "strided", "empty"):
        assert out[key].dtype == values[key].dtype
        assert torch.equal(out[key], values[key]), key
    assert isinstance(out["param"], torch.nn.Parameter)
    assert torch.equal(out["param"].data, values["param"].data)
    np.testing.assert_array_equal(out["numpy"], values["numpy"])


def test_numpy_arrays_from_get_are_independent_copies(runtime):
    ref = miniray.put(np.zeros(200_000))
    first = miniray.get(ref, timeout=5)
    first += 1
    assert float(miniray.get(ref, timeout=5).sum()) == 0.0


def test_future_and_await(runtime):
    ref = double.remote(4)
    assert ref.future().result(timeout=30) == 8

    async def main():
        return await double.remote(5)

    assert asyncio.run(main()) == 10


def skip_cancel_races_on_ray(runtime):
    """Ray 2.60's driver aborts now and then when a cancelled task's arguments or reply arrive
    after the cancel (RAY_CHECK failures in OnTaskDependenciesInlined, ray-project/ray#55131,
    and in TaskManager::CompletePendingTask). In the full conformance run here that killed
    the whole pytest process three times, in different cancel cases; each passes alone. The
    embedded backends run these cases; Ray's behaviour was checked by hand (docs/runtime.md)."""
    if runtime == "ray":
        pytest.skip("Ray 2.60's driver aborts on cancel races (ray-project/ray#55131)")


def test_cancel_pending_task(runtime):
    skip_cancel_races_on_ray(runtime)
    blockers = [sleep_then.remote(i, 1.0) for i in range(2)]
    queued = sleep_then.remote("never", 0)
    # With 2 workers busy the third task is still queued on process backends; inline runs each
    # task on its own thread, so it may already be done: then cancel is a no-op, as in Ray.
    miniray.cancel(queued)
    try:
        result = miniray.get(queued, timeout=30)
    except TaskCancelledError:
        result = "cancelled"
    if runtime == "local":
        assert result == "cancelled"
    miniray.get(blockers, timeout=30)


def test_cancel_running_tasks_raises_and_frees_their_slots(runtime, tmp_path):
    skip_cancel_races_on_ray(runtime)
    # Both slots (2 workers, 2 CPUs on Ray) are held; the queued task runs only once the
    # cancelled ones let go. A cancelled task is never retried, even with retry_exceptions.
    holders = [
        started(spin_marked.remote(str(tmp_path / "a")), str(tmp_path / "a")),
        started(
            spin_marked.options(max_retries=3, retry_exceptions=True).remote(str(tmp_path / "b")),
            str(tmp_path / "b"),
        ),
    ]
    queued = double.remote(21)
    for ref in holders:
        miniray.cancel(ref)
    for ref in holders:
        with pytest.raises(TaskCancelledError):
            miniray.get(ref, timeout=30)
    assert miniray.get(queued, timeout=30) == 42


def test_cancel_fails_the_dependents_of_a_running_task(runtime, tmp_path):
    skip_cancel_races_on_ray(runtime)
    marker = str(tmp_path / "started")
    running = started(spin_marked.remote(marker), marker)
    dependent = identity.remote(running)
    chain = identity.remote(identity.remote(dependent))
    miniray.cancel(running)
    for ref in (running, dependent, chain):
        with pytest.raises(TaskCancelledError):
            miniray.get(ref, timeout=30)


def test_cancel_a_task_waiting_for_its_argument_fails_it_and_its_dependents(runtime, tmp_path):
    skip_cancel_races_on_ray(runtime)
    marker = str(tmp_path / "started")
    upstream = started(spin_marked.remote(marker, 60, None, None), marker)
    waiting = identity.remote(upstream)
    dependent = identity.remote(waiting)
    miniray.cancel(waiting)
    for ref in (waiting, dependent):
        with pytest.raises(TaskCancelledError):
            miniray.get(ref, timeout=30)
    with pytest.raises(GetTimeoutError):  # what it waited for is untouched
        miniray.get(upstream, timeout=0)
    miniray.cancel(upstream)
    with pytest.raises(TaskCancelledError):
        miniray.get(upstream, timeout=30)


def test_cancelled_task_can_catch_the_keyboard_interrupt(runtime, tmp_path):
    skip_cancel_races_on_ray(runtime)
    marker = str(tmp_path / "started")
    ref = started(catch_cancel.remote(marker), marker)
    miniray.cancel(ref)
    assert miniray.get(ref, timeout=30) == "caught"


def test_cancel_of_a_finished_task_changes_nothing(runtime):
    ref = double.remote(4)
    assert miniray.get(ref, timeout=30) == 8
    miniray.cancel(ref)
    miniray.cancel(ref, force=True)
    assert miniray.get(ref, timeout=30) == 8
    assert miniray.get(double.remote(ref), timeout=30) == 16


def test_force_cancel_stops_a_running_task(runtime, tmp_path):
    skip_cancel_races_on_ray(runtime)
    marker = str(tmp_path / "started")
    ref = started(spin_marked.remote(marker), marker)
    dependent = identity.remote(ref)
    miniray.cancel(ref, force=True)
    for each in (ref, dependent):
        with pytest.raises(TaskCancelledError):
            miniray.get(each, timeout=30)
    assert miniray.get(double.remote(5), timeout=30) == 10


def test_recursive_cancel_cancels_what_the_task_submitted(runtime, tmp_path):
    skip_cancel_races_on_ray(runtime)
    paths = [str(tmp_path / name) for name in ("parent", "child", "interrupted", "finished")]
    parent = parent_of_spinner.remote(paths[0], paths[1], 60, paths[2], paths[3])
    started(started(parent, paths[0]), paths[1])
    miniray.cancel(parent)  # recursive=True is the default, as in Ray
    with pytest.raises(TaskCancelledError):
        miniray.get(parent, timeout=30)
    wait_until(lambda: os.path.exists(paths[2]), timeout=30, what="the child to be interrupted")
    assert not os.path.exists(paths[3])


def test_non_recursive_cancel_leaves_the_submitted_tasks_running(runtime, tmp_path):
    skip_cancel_races_on_ray(runtime)
    paths = [str(tmp_path / name) for name in ("parent", "child", "interrupted", "finished")]
    parent = parent_of_spinner.remote(paths[0], paths[1], 1.0, paths[2], paths[3])
    started(started(parent, paths[0]), paths[1])
    miniray.cancel(parent, recursive=False)
    with pytest.raises(TaskCancelledError):
        miniray.get(parent, timeout=30)
    wait_until(lambda: os.path.exists(paths[3]), timeout=30, what="the child to finish")
    assert not os.path.exists(paths[2])


def test_cancel_of_a_streaming_generator_says_what_to_do_instead(runtime):
    stream = count_up.remote(3)
    with pytest.raises(TypeError, match=r"ObjectRefGenerator.*recursive=True.*miniray\.kill"):
        miniray.cancel(stream)
    assert [miniray.get(ref, timeout=30) for ref in stream] == [0, 1, 2]  # left untouched


def test_cancel_refuses_non_bool_flags(runtime):
    ref = miniray.put(1)
    with pytest.raises(TypeError, match="force"):
        miniray.cancel(ref, force="yes")
    with pytest.raises(TypeError, match="recursive"):
        miniray.cancel(ref, recursive=None)


# ------------------------------------------------------------------------------- actor retries


def test_actor_method_exceptions_are_not_retried_without_retry_exceptions(runtime):
    actor = FlakyActor.remote()  # max_task_retries=2 covers actor deaths only
    with pytest.raises(ValueError, match="attempt 1"):
        miniray.get(actor.fail_until.remote(2), timeout=30)
    assert miniray.get(actor.made.remote(), timeout=30) == 1


def test_actor_method_retries_listed_exceptions_up_to_max_task_retries(runtime):
    actor = FlakyActor.remote()
    retried = actor.fail_until.options(retry_exceptions=True)
    assert miniray.get(retried.remote(3), timeout=30) == 3
    assert miniray.get(actor.made.remote(), timeout=30) == 3
    # Never more attempts than asked: 1 + max_task_retries.
    with pytest.raises(ValueError, match="attempt 3"):
        miniray.get(retried.remote(5), timeout=30)
    assert miniray.get(actor.made.remote(), timeout=30) == 3
    assert miniray.get(actor.fail_until_retried.remote(3), timeout=30) == 3  # @method option
    assert miniray.get(actor.made.remote(), timeout=30) == 3


def test_actor_retry_exceptions_list_retries_only_those(runtime):
    actor = FlakyActor.remote()
    listed = actor.fail_until.options(retry_exceptions=[ValueError])
    assert miniray.get(listed.remote(2), timeout=30) == 2
    assert miniray.get(actor.made.remote(), timeout=30) == 2
    other = actor.fail_until.options(retry_exceptions=[KeyError])
    with pytest.raises(ValueError, match="attempt 1"):
        miniray.get(other.remote(2), timeout=30)
    assert miniray.get(actor.made.remote(), timeout=30) == 1


def test_per_call_max_task_retries_overrides_the_actor_class(runtime):
    actor = FlakyActor.remote()
    more = actor.fail_until.options(max_task_retries=4, retry_exceptions=True)
    assert miniray.get(more.remote(5), timeout=30) == 5
    assert miniray.get(actor.made.remote(), timeout=30) == 5
    none = actor.fail_until.options(max_task_retries=0, retry_exceptions=True)
    with pytest.raises(ValueError, match="attempt 1"):
        miniray.get(none.remote(2), timeout=30)
    assert miniray.get(actor.made.remote(), timeout=30) == 1
    fewer = FlakyActor.options(max_task_retries=1).remote().fail_until
    with pytest.raises(ValueError, match="attempt 2"):
        miniray.get(fewer.options(retry_exceptions=True).remote(3), timeout=30)


def test_async_actor_method_retries_listed_exceptions(runtime):
    actor = AsyncFlakyActor.remote()
    assert miniray.get(actor.fail_until.options(retry_exceptions=True).remote(3), timeout=30) == 3
    with pytest.raises(ValueError, match="attempt 6"):  # attempts 4, 5, 6: 1 + 2 retries
        miniray.get(actor.fail_until.options(retry_exceptions=True).remote(99), timeout=30)


def call_once_restarted(method, timeout=30):
    """Ray refuses calls with ActorUnavailableError while the actor restarts (the embedded
    backends queue them): call again until the restarted actor answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return miniray.get(method.remote(), timeout=timeout)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_sys_exit_zero_in_a_method_ends_the_actor_for_good(runtime):
    actor = Exiter.options(max_restarts=1).remote()
    assert miniray.get(actor.bump.remote(), timeout=30) == 1
    with pytest.raises(ActorDiedError):
        miniray.get(actor.exit.remote(0), timeout=30)
    with pytest.raises(ActorDiedError):  # an intended exit is never restarted, as in Ray
        miniray.get(actor.bump.remote(), timeout=30)


def test_sys_exit_with_an_error_code_restarts_the_actor_per_max_restarts(runtime):
    actor = Exiter.options(max_restarts=1).remote()
    assert miniray.get(actor.bump.remote(), timeout=30) == 1
    with pytest.raises(ActorUnavailableError):
        miniray.get(actor.exit.remote(3), timeout=30)
    assert call_once_restarted(actor.bump) == 1  # a fresh instance
    with pytest.raises(ActorDiedError):  # no restarts left
        miniray.get(actor.exit.remote(3), timeout=30)
    with pytest.raises(ActorDiedError):
        miniray.get(actor.bump.remote(), timeout=30)


# ------------------------------------------------------------------------------- bad input


def test_unknown_method_on_handle_names_the_methods(runtime):
    counter = Counter.remote()
    with pytest.raises(AttributeError, match="increment"):
        counter.incremnt.remote()


def test_unpicklable_argument_is_a_type_error_naming_it(runtime):
    with pytest.raises(TypeError, match="argument 0"):
        double.remote(threading.Lock())


def test_get_on_a_non_ref_is_a_value_error(runtime):
    with pytest.raises(ValueError, match="ObjectRef"):
        miniray.get(42)
    with pytest.raises(ValueError, match="item 1"):
        miniray.get([miniray.put(1), 2])


def test_calling_remote_objects_directly_is_a_type_error(runtime):
    with pytest.raises(TypeError, match=r"double\.remote\(\)"):
        double(1)
    with pytest.raises(TypeError, match=r"Counter\.remote\(\)"):
        Counter()
    with pytest.raises(TypeError, match="remote"):
        miniray.remote(42)


def test_unknown_option_lists_known_ones(runtime):
    with pytest.raises(ValueError, match="max_restarts"):
        Counter.options(max_restart=3)
    with pytest.raises(ValueError, match="num_returns"):
        double.options(num_returns=-1)


def test_init_twice_is_an_error(runtime):
    with pytest.raises(RuntimeError, match="already"):
        miniray.init(backend=runtime)
    miniray.init(backend=runtime, ignore_reinit_error=True)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="inline"):
        miniray.init(backend="cluster")
    assert not miniray.is_initialized()


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MINIRAY_BACKEND", "inline")
    miniray.init()
    try:
        assert miniray.backend_name() == "inline"
    finally:
        miniray.shutdown()


def test_max_pending_calls_refuses_calls_beyond_the_limit(runtime):
    from miniray.exceptions import PendingCallsLimitExceeded

    if runtime == "ray":
        pytest.skip(
            "Ray decrements an actor's pending-call count after get() of the result returns, so "
            "the two calls below are refused now and then (16 of 200 tries in plain Ray 2.60 "
            "on a busy 2-core machine); the mapping to our error is tested in test_ray_backend"
        )
    counter = Counter.options(max_pending_calls=2).remote()
    miniray.get(counter.read.remote(), timeout=30)
    first = [counter.slow.remote(0.5), counter.slow.remote(0.5)]
    with pytest.raises(PendingCallsLimitExceeded, match="max_pending_calls=2"):
        counter.read.remote()
    miniray.get(first, timeout=30)
    assert miniray.get(counter.read.remote(), timeout=30) == 0


def test_options_only_ray_can_honour_are_refused_not_ignored(runtime):
    if runtime == "ray":
        pytest.skip("Ray honours these options")
    with pytest.raises(ValueError, match="runtime_env"):
        double.options(runtime_env={"env_vars": {"A": "1"}}).remote(1)
    with pytest.raises(ValueError, match="concurrency_groups"):
        Counter.options(concurrency_groups={"io": 2}).remote()


@miniray.remote(max_concurrency=4)
class SlowInit:
    def __init__(self):
        time.sleep(0.3)
        self.ready = True

    def is_ready(self):
        return self.ready


def test_threaded_actor_methods_wait_for_init(runtime):
    actor = SlowInit.remote()
    assert miniray.get([actor.is_ready.remote() for _ in range(4)], timeout=30) == [True] * 4


def test_detached_lifetime_needs_ray(runtime):
    if runtime == "ray":
        pytest.skip("Ray honours lifetime='detached'")
    with pytest.raises(ValueError, match="detached"):
        Counter.options(lifetime="detached").remote()
    with pytest.raises(ValueError, match="lifetime"):
        Counter.options(lifetime="forever")


# -- timeouts at the edges: infinite, huge, NaN (issue 21, item 7) ----------------------------
# inf and 1e10 used to reach the OS waits underneath (a condition variable, epoll) as a deadline
# they cannot represent and raised OverflowError; NaN compared false with everything and so
# waited forever. Now inf and huge values mean "no deadline", NaN is refused by name.

# 3e6 s: past epoll's limit (2**31 ms, 24.8 days), which a wait inside a task reaches.
FOREVER_TIMEOUTS = [float("inf"), 1e10, 10**30, 3e6]


@miniray.remote
def get_and_wait_without_deadline(timeout):
    inner = sleep_then.remote("inner", 0.2)
    ready, _ = miniray.wait([inner], timeout=timeout)
    return miniray.get(ready[0], timeout=timeout)


@pytest.mark.parametrize("timeout", FOREVER_TIMEOUTS, ids=["inf", "1e10", "1e30", "3e6"])
def test_infinite_and_huge_timeouts_mean_no_deadline(runtime, timeout):
    pending = sleep_then.remote("late", 0.3)  # still running when get/wait start waiting
    assert miniray.get(pending, timeout=timeout) == "late"
    assert miniray.get([miniray.put(1), double.remote(2)], timeout=timeout) == [1, 4]
    slow = sleep_then.remote("slow", 0.3)
    ready, not_ready = miniray.wait([slow], num_returns=1, timeout=timeout)
    assert ready == [slow] and not_ready == []
    # Inside a task too: there the call goes to the driver, which waits on its own clock.
    assert miniray.get(get_and_wait_without_deadline.remote(timeout), timeout=60) == "inner"


def test_nan_timeout_is_refused_by_name(runtime):
    ref = miniray.put(1)
    with pytest.raises(ValueError, match=r"get\(\): timeout=nan .*None .*>= 0"):
        miniray.get(ref, timeout=float("nan"))
    with pytest.raises(ValueError, match=r"wait\(\): timeout=nan"):
        miniray.wait([ref], timeout=float("nan"))
    with pytest.raises(ValueError, match=r"wait\(\): timeout=-1 "):
        miniray.wait([ref], timeout=-1)
    with pytest.raises(ValueError, match=r"get\(\): timeout='5' "):
        miniray.get(ref, timeout="5")
    assert miniray.get(ref, timeout=0) == 1  # the runtime is unharmed


# -- arguments are bound to the signature at .remote() (issue 22, item 2) ---------------------
# Ray binds every .remote() call to the function's, constructor's or method's signature and
# raises TypeError at the call site. miniray used to accept any arguments: the task failed later
# in its worker (a RayTaskError at get), and a bad constructor call gave a dead actor.


@miniray.remote
def sig_pair(a, b):
    return (a, b)


@miniray.remote
def sig_anything(*args, **kwargs):
    return [list(args), sorted(kwargs.items())]


@miniray.remote
def sig_head(first, *rest, **named):
    return [first, list(rest), sorted(named.items())]


@miniray.remote
def sig_scaled(value, /, *, scale, offset=0):
    return value * scale + offset


# max has no signature inspect can read (a C builtin): such functions are not checked.
sig_builtin_max = miniray.remote(max)


@miniray.remote
class SigActor:
    limit = 5  # a class attribute: not a method, so not reachable through a handle

    def __init__(self, start, *, step=1):
        self.value = start
        self.step = step
        self.label = "an instance attribute"

    def bump(self, times):
        self.value += self.step * times
        return self.value

    @property
    def doubled(self):
        return self.value * 2

    @classmethod
    def kind(cls, suffix):
        return "SigActor" + suffix

    @staticmethod
    def twice(x):
        return 2 * x


@miniray.remote
def sig_bad_call_through(handle):
    """A handle that crossed into a worker still binds (its methods carry their signatures)."""
    try:
        handle.bump.remote(1, 2)
    except TypeError as exc:
        return str(exc)
    return "accepted"


def test_too_many_positional_arguments_raise_at_the_call(runtime):
    with pytest.raises(TypeError, match="too many positional arguments"):
        sig_pair.remote(1, 2, 3)
    # ObjectRefs bind like any value, before they are resolved.
    with pytest.raises(TypeError, match="too many positional arguments"):
        sig_pair.remote(miniray.put(1), 2, miniray.put(3))
    assert miniray.get(sig_pair.remote(miniray.put(1), b=miniray.put(2)), timeout=30) == (1, 2)


def test_unknown_keyword_argument_raises_at_the_call(runtime):
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        sig_pair.remote(1, 2, c=3)
    with pytest.raises(TypeError, match="multiple values for argument 'a'"):
        sig_pair.remote(1, a=2)


def test_missing_required_argument_raises_at_the_call(runtime):
    with pytest.raises(TypeError, match="missing a required argument: 'b'"):
        sig_pair.remote(1)
    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        sig_pair.remote(b=2)
    assert miniray.get(sig_pair.remote(b=2, a=1), timeout=30) == (1, 2)


def test_star_args_and_kwargs_accept_anything_but_what_is_required(runtime):
    assert miniray.get(sig_anything.remote(), timeout=30) == [[], []]
    assert miniray.get(sig_anything.remote(1, 2, x=3), timeout=30) == [[1, 2], [("x", 3)]]
    assert miniray.get(sig_head.remote(1, 2, 3, k=4), timeout=30) == [1, [2, 3], [("k", 4)]]
    with pytest.raises(TypeError, match="missing a required argument: 'first'"):
        sig_head.remote(k=4)
    assert miniray.get(sig_builtin_max.remote(3, 7), timeout=30) == 7


def test_keyword_only_and_positional_only_arguments_are_enforced(runtime):
    assert miniray.get(sig_scaled.remote(2, scale=3), timeout=30) == 6
    with pytest.raises(TypeError, match="too many positional arguments"):
        sig_scaled.remote(2, 3)
    with pytest.raises(TypeError, match="missing a required argument: 'scale'"):
        sig_scaled.remote(2)
    with pytest.raises(TypeError, match="positional only"):
        sig_scaled.remote(value=2, scale=3)


def test_actor_constructor_with_wrong_arguments_raises_at_the_call(runtime):
    with pytest.raises(TypeError, match="missing a required argument: 'start'"):
        SigActor.remote()
    with pytest.raises(TypeError, match="too many positional arguments"):
        SigActor.remote(1, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stride'"):
        SigActor.remote(1, stride=2)
    actor = SigActor.remote(1, step=2)
    assert miniray.get(actor.bump.remote(3), timeout=30) == 7


def test_actor_method_with_wrong_arguments_raises_at_the_call(runtime):
    actor = SigActor.remote(0)
    with pytest.raises(TypeError, match="missing a required argument: 'times'"):
        actor.bump.remote()
    with pytest.raises(TypeError, match="too many positional arguments"):
        actor.bump.remote(1, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'by'"):
        actor.bump.remote(times=1, by=2)
    # Class and static methods bind without cls/self, as in Ray.
    with pytest.raises(TypeError, match="missing a required argument: 'suffix'"):
        actor.kind.remote()
    with pytest.raises(TypeError, match="too many positional arguments"):
        actor.twice.remote(1, 2)
    assert miniray.get([actor.kind.remote("!"), actor.twice.remote(4)], timeout=30) == [
        "SigActor!",
        8,
    ]
    assert "too many positional arguments" in miniray.get(
        sig_bad_call_through.remote(actor), timeout=30
    )
    # None of the refused calls ran: the actor has seen only this one.
    assert miniray.get(actor.bump.remote(times=1), timeout=30) == 1


def test_named_actor_found_by_get_actor_binds_its_methods(runtime):
    SigActor.options(name="sig-named").remote(0)
    found = miniray.get_actor("sig-named")
    with pytest.raises(TypeError, match="too many positional arguments"):
        found.bump.remote(1, 2)
    assert miniray.get(found.bump.remote(2), timeout=30) == 2


def test_non_method_attribute_of_an_actor_is_an_attribute_error(runtime):
    actor = SigActor.remote(0)
    for name in ("limit", "label", "doubled"):
        with pytest.raises(AttributeError, match=name):
            getattr(actor, name)
    assert miniray.get(actor.bump.remote(1), timeout=30) == 1


def test_options_then_remote_binds_too(runtime):
    with pytest.raises(TypeError, match="missing a required argument: 'b'"):
        sig_pair.options(num_returns=2).remote(1)
    first, second = sig_pair.options(num_returns=2).remote(1, 2)
    assert miniray.get([first, second], timeout=30) == [1, 2]
    with pytest.raises(TypeError, match="missing a required argument: 'start'"):
        SigActor.options(max_restarts=1).remote()
    actor = SigActor.options(max_restarts=1).remote(5)
    with pytest.raises(TypeError, match="too many positional arguments"):
        actor.bump.options(num_returns=1).remote(1, 2)
    assert miniray.get(actor.bump.options(num_returns=1).remote(1), timeout=30) == 6


# ------------------------------------------------------------------------------- asyncio


@miniray.remote
def filled(value, size):
    """A large array (a shared-memory segment on the local backend) filled with ``value``."""
    return np.full(size, value, dtype=np.int64)


@miniray.remote
class Awaiter:
    """An async actor that awaits refs it was given (nested, so they arrive as refs)."""

    async def total(self, refs):
        values = await asyncio.gather(*refs)
        return sum(values) + await refs[0]

    async def failure_type(self, refs):
        try:
            await refs[0]
        except ValueError as exc:  # the cause's class, as get raises it
            return [type(exc).__name__, isinstance(exc, RayTaskError), "boom" in str(exc)]
        return "no error"

    async def own_call(self):
        return await double.remote(21)


def test_await_refs_in_a_driver_event_loop(runtime):
    async def main():
        single = await double.remote(5)
        gathered = await asyncio.gather(*[double.remote(i) for i in range(4)])
        fast = double.remote(1).as_future()
        slow = sleep_then.remote("late", 30).as_future()
        done, pending = await asyncio.wait([fast, slow], timeout=10)
        for fut in pending:
            fut.cancel()  # cancels our future only, not the task (as in Ray)
        return single, gathered, done == {fast}, pending == {slow}, isinstance(fast, asyncio.Future)

    assert asyncio.run(asyncio.wait_for(main(), 60)) == (10, [0, 2, 4, 6], True, True, True)


def test_awaiting_a_failed_ref_raises_what_get_raises(runtime):
    failing = fail_with_value_error.remote("boom")
    with pytest.raises(ValueError) as from_get:
        miniray.get(failing, timeout=30)

    async def main():
        with pytest.raises(ValueError) as from_await:
            await failing
        with pytest.raises(ValueError) as from_as_future:
            await failing.as_future()
        return from_await.value, from_as_future.value

    for error in [*asyncio.run(asyncio.wait_for(main(), 60)), failing.future().exception(30)]:
        assert type(error) is type(from_get.value)
        assert isinstance(error, RayTaskError)
        assert str(error) == str(from_get.value)


def test_await_inside_an_async_actor_method(runtime):
    actor = Awaiter.remote()
    refs = [double.remote(i) for i in range(3)]
    assert miniray.get(actor.total.remote(refs), timeout=30) == 0 + 2 + 4 + 0
    failing = [fail_with_value_error.remote("boom")]
    assert miniray.get(actor.failure_type.remote(failing), timeout=30) == [
        "RayTaskError(ValueError)",
        True,
        True,
    ]
    assert miniray.get(actor.own_call.remote(), timeout=30) == 42


def test_future_done_callback_that_blocks_does_not_stall_the_runtime(runtime):
    release = threading.Event()
    seen = []

    def blocking_callback(fut):
        seen.append(fut.result())
        release.wait(60)  # a user's callback may block; the runtime must keep going

    ref = sleep_then.remote(4, 1.0)  # registered before it is done: the runtime runs it
    ref.future().add_done_callback(blocking_callback)
    try:
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [4]
        # While that callback still blocks, new work completes and is received.
        assert miniray.get(double.remote(3), timeout=15) == 6
        assert miniray.get(miniray.put("stored"), timeout=15) == "stored"
    finally:
        release.set()


def test_futures_of_dropped_refs_read_their_own_large_values(runtime):
    # The refs go away at once: only the futures keep the values. On the local backend each
    # array is a shared-memory segment the producing worker reuses once it is freed, so a value
    # decoded after its segment went back would read a later task's numbers.
    size = 300_000  # 2.4 MB: pooled for reuse on the local backend
    pending = [filled.remote(i, size).future() for i in range(12)]
    for i, fut in enumerate(pending):
        array = fut.result(timeout=60)
        assert array.shape == (size,)
        assert int(array.min()) == i and int(array.max()) == i, i


# ------------------------------------------------------------------------------- smaller semantics


def test_driver_only_session_with_num_cpus_zero(runtime_backend):
    if runtime_backend == "ray":
        # The module's Ray instance has 2 CPUs. Plain Ray 2.60 started with num_cpus=0, checked
        # by hand: put/get work, an actor with num_cpus=0 runs, a task or a default actor stays
        # pending forever (get(timeout=5) raises GetTimeoutError). We fail the task instead.
        pytest.skip("needs a Ray instance of its own with num_cpus=0")
    miniray.init(backend=runtime_backend, num_cpus=0)
    try:
        assert miniray.get(miniray.put([1, 2]), timeout=10) == [1, 2]
        counter = Counter.options(num_cpus=0).remote()
        assert miniray.get(counter.increment.remote(), timeout=30) == 1
        start = time.monotonic()
        with pytest.raises(RaySystemError, match=r"double\(\) cannot run: .*num_cpus=0"):
            miniray.get(double.remote(1))  # no timeout: it must fail, not hang
        # A task submitted inside an actor fails the same way.
        with pytest.raises(RaySystemError, match="num_cpus=0"):
            miniray.get(Awaiter.remote().own_call.remote(), timeout=30)
        assert time.monotonic() - start < 20
    finally:
        miniray.shutdown()
    with pytest.raises(ValueError, match="num_workers=-1"):
        miniray.init(backend=runtime_backend, num_cpus=-1)


def test_values_that_contain_themselves_round_trip(runtime):
    looped = []
    looped.append(looped)
    back = miniray.get(miniray.put(looped), timeout=30)
    assert isinstance(back, list) and len(back) == 1 and back[0] is back
    mapping = {"n": 1}
    mapping["self"] = mapping
    back = miniray.get(identity.remote(mapping), timeout=30)
    assert back["self"] is back and back["n"] == 1
    pair = [1, 2]
    nested = (pair, [pair, pair])  # shared, not looped: still one list on the other side
    back = miniray.get(TensorStore.remote().echo.remote(nested), timeout=30)
    assert back == ([1, 2], [[1, 2], [1, 2]]) and back[1][0] is back[1][1] is back[0]


def test_a_function_or_actor_class_over_ray_size_limit_is_refused(runtime):
    # Over Ray's FUNCTION_SIZE_ERROR_THRESHOLD of 10**8 bytes, captured by a closure: pickled
    # with the function (a module global would be imported where it runs instead).
    large = b"x" * (101 * 10**6)

    @miniray.remote
    def closes_over_it():
        return len(large)

    class HoldsIt:
        def size(self):
            return len(large)

    with pytest.raises(ValueError, match="too large"):
        closes_over_it.remote()
    with pytest.raises(ValueError, match="too large"):
        miniray.remote(HoldsIt).remote()
    # A large argument is not refused: it travels as a value.
    argument = large[: 20 * 10**6]
    assert miniray.get(identity.remote(argument), timeout=60) == argument


def test_task_errors_keep_ray_helpers_and_survive_pickling(runtime):
    import pickle

    with pytest.raises(ValueError) as caught:
        miniray.get(fail_with_value_error.remote("broken"), timeout=30)
    dual = caught.value
    plain = RayTaskError("f", "Traceback: (remote)", KeyError("k"))
    assert type(plain) is RayTaskError and not isinstance(plain, KeyError)
    for made in (plain.as_instanceof_cause(), plain.make_dual_exception_instance()):
        assert isinstance(made, RayTaskError) and isinstance(made, KeyError)
        assert made.cause is plain.cause and str(made) == str(plain)
    assert isinstance(dual.as_instanceof_cause(), ValueError)
    for error in (dual, plain, plain.as_instanceof_cause()):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert type(back.cause) is type(error.cause) and back.cause.args == error.cause.args
        assert str(back) == str(error)


@miniray.remote
class SyncOrderLog:
    """Logs the order in which calls ran; ``note`` takes an argument that may not be ready.
    ``.options(max_concurrency=4)`` makes it the threaded case. (The async one is written out:
    Ray workers cannot import a base class from a test module.)"""

    def __init__(self):
        self.log = []

    def note(self, value):
        self.log.append(value)
        return value

    def read(self):
        return self.log


@miniray.remote
class AsyncOrderLog:
    def __init__(self):
        self.log = []

    async def note(self, value):
        self.log.append(value)
        return value

    async def read(self):
        return self.log


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("sync", ["late", "early"]),  # submission order: the waiting call holds back the next
        ("threaded", ["early", "late"]),  # a call runs once its arguments are ready
        ("async", ["early", "late"]),
        ("async, max_concurrency=1", ["early", "late"]),
    ],
)
def test_actor_call_waiting_on_an_argument_holds_back_later_calls_only_on_sync_actors(
    runtime, kind, expected
):
    actor = {
        "sync": lambda: SyncOrderLog.remote(),
        "threaded": lambda: SyncOrderLog.options(max_concurrency=4).remote(),
        "async": lambda: AsyncOrderLog.remote(),
        "async, max_concurrency=1": lambda: AsyncOrderLog.options(max_concurrency=1).remote(),
    }[kind]()
    miniray.get(actor.read.remote(), timeout=30)  # started
    late = actor.note.remote(sleep_then.remote("late", 1.5))
    early = actor.note.remote("early")
    assert miniray.get([late, early], timeout=30) == ["late", "early"]
    assert miniray.get(actor.read.remote(), timeout=30) == expected


def test_a_future_still_waiting_at_shutdown_fails_instead_of_hanging(runtime):
    if runtime == "ray":
        pytest.skip("Ray's own futures: shutdown cancels the task (TaskCancelledError or a value)")
    fut = sleep_then.remote("too late", 8).future()
    miniray.shutdown()
    assert isinstance(fut.exception(timeout=10), RaySystemError)
    assert "shut down" in str(fut.exception())


# -- actor classes behave like classes (issue 22, item 6) -------------------------------------
# Ray's actor class reads as the class it wraps (class attributes, static and class methods),
# exposes the original as __ray_actor_class__ (subclass that, not the actor class), runs the
# methods of the whole MRO, and every actor has __ray_ready__ / __ray_call__ / __ray_terminate__.


def _make_plain_classes():
    """Made in a function so that cloudpickle ships them by value (Ray's workers cannot import
    this test module by name)."""

    class PlainBase:
        LIMIT = 7

        def __init__(self, start=0):
            self.value = start

        @staticmethod
        def scaled(x):
            return x * PlainBase.LIMIT

        @classmethod
        def limit(cls):
            return cls.LIMIT

        def read(self):
            return self.value

        def describe(self):
            return f"base {self.value}"

    class FromPlainCls(PlainBase):
        LIMIT = 9

        def describe(self):
            return "derived, " + super().describe()

        def bump(self):
            self.value += 1
            return self.value

    return PlainBase, FromPlainCls


PlainBase, FromPlainCls = _make_plain_classes()
FromPlain = miniray.remote(FromPlainCls)


def _make_subclass_of_actor_original():
    class SubOfActor(FromPlain.__ray_actor_class__):
        LIMIT = 11

        def describe(self):
            return "sub, " + super().describe()

    return SubOfActor


SubOfActor = miniray.remote(_make_subclass_of_actor_original())


def test_actor_class_reads_as_the_class_it_wraps(runtime):
    assert FromPlain.LIMIT == 9
    assert FromPlain.scaled(2) == 14  # a static method, called here, not remotely
    assert FromPlain.limit() == 9  # a class method, bound to the original class
    assert FromPlain.__ray_actor_class__ is FromPlainCls
    assert SubOfActor.limit() == 11
    with pytest.raises(AttributeError, match="no_such_thing"):
        FromPlain.no_such_thing  # noqa: B018


def test_subclassing_the_actor_class_itself_is_a_type_error(runtime):
    with pytest.raises(TypeError, match="__ray_actor_class__") as info:

        class Bad(FromPlain):
            pass

    assert isinstance(info.value, miniray.actor.ActorClassInheritanceException)


def test_actor_runs_methods_from_the_whole_mro(runtime):
    actor = FromPlain.remote(3)
    assert miniray.get(actor.read.remote(), timeout=30) == 3  # defined on the plain base only
    assert miniray.get(actor.bump.remote(), timeout=30) == 4  # on the subclass only
    assert miniray.get(actor.describe.remote(), timeout=30) == "derived, base 4"  # super()
    assert miniray.get(actor.limit.remote(), timeout=30) == 9
    sub = SubOfActor.remote(1)
    assert miniray.get(sub.describe.remote(), timeout=30) == "sub, derived, base 1"
    assert miniray.get([sub.bump.remote(), sub.limit.remote()], timeout=30) == [2, 11]


@miniray.remote
class SlowStart:
    def __init__(self, seconds):
        time.sleep(seconds)
        self.value = "started"

    def read(self):
        return self.value


def test_readiness_by_any_method_and_ray_ready(runtime):
    actor = SlowStart.remote(0.3)
    assert miniray.get(actor.__ray_ready__.remote(), timeout=30) is True
    assert miniray.get(actor.read.remote(), timeout=30) == "started"
    broken = BrokenInit.remote()
    with pytest.raises(ActorDiedError, match="cannot start"):
        miniray.get(broken.__ray_ready__.remote(), timeout=30)


def test_ray_call_runs_a_function_on_the_instance(runtime):
    actor = FromPlain.remote(5)
    assert (
        miniray.get(actor.__ray_call__.remote(lambda self, x: self.value + x, 2), timeout=30) == 7
    )


# -- exit_actor() -------------------------------------------------------------------------------


def test_exit_actor_ends_the_actor_for_good(runtime):
    actor = Exiter.options(name="exiter", max_restarts=2).remote()
    assert miniray.get(actor.bump.remote(), timeout=30) == 1
    running = actor.slow.remote(0.3)
    exiting = actor.quit.remote()
    queued = actor.bump.remote()
    assert miniray.get(running, timeout=30) == 1  # submitted before: runs to its end
    for ref in (exiting, queued, actor.bump.remote()):
        with pytest.raises(ActorDiedError):
            miniray.get(ref, timeout=30)
    # max_restarts=2 does not bring it back.
    time.sleep(0.5)
    with pytest.raises(ActorDiedError):
        miniray.get(actor.bump.remote(), timeout=30)
    if runtime != "ray":  # Ray 2.60 keeps the name taken (see docs/runtime.md)
        with pytest.raises(ValueError, match="exiter"):
            miniray.get_actor("exiter")


def test_exit_actor_is_not_swallowed_by_except_exception(runtime):
    actor = Exiter.options(max_restarts=2).remote()
    with pytest.raises(ActorDiedError):
        miniray.get(actor.quit_catching_exceptions.remote(), timeout=30)


def test_ray_terminate_queues_an_exit(runtime):
    actor = Exiter.options(max_restarts=2).remote()
    first = actor.bump.remote()
    actor.__ray_terminate__.remote()
    assert miniray.get(first, timeout=30) == 1
    with pytest.raises(ActorDiedError):
        miniray.get(actor.bump.remote(), timeout=30)


@miniray.remote
def exit_actor_in_a_task():
    try:
        miniray.actor.exit_actor()
    except TypeError as exc:
        return f"TypeError: {exc}"
    return "no error"


def test_exit_actor_outside_an_actor_is_a_type_error(runtime):
    with pytest.raises(TypeError, match="exit_actor"):
        miniray.actor.exit_actor()
    assert miniray.get(exit_actor_in_a_task.remote(), timeout=30).startswith("TypeError")


# -- get_runtime_context() ----------------------------------------------------------------------


def _make_context_reader():
    """Made in a function so that cloudpickle ships it by value (see _make_plain_classes)."""

    def context_of_here():
        ctx = miniray.get_runtime_context()
        return {
            "job": ctx.get_job_id(),
            "task": ctx.get_task_id(),
            "actor": ctx.get_actor_id(),
            "node": ctx.get_node_id(),
            "namespace": ctx.namespace,
            "actor_name": ctx.get_actor_name(),
        }

    return context_of_here


_context_of_here = _make_context_reader()


@miniray.remote
def context_in_task():
    return _context_of_here()


@miniray.remote
class ContextActor:
    def __init__(self):
        self.at_init = _context_of_here()

    def init_context(self):
        return self.at_init

    def context(self):
        return _context_of_here()

    def myself(self):
        return miniray.get_runtime_context().current_actor


def test_runtime_context_in_driver_task_and_actor(runtime):
    driver = _context_of_here()
    assert isinstance(driver["job"], str) and driver["job"]
    assert isinstance(driver["node"], str) and driver["node"]
    assert driver["task"] is None and driver["actor"] is None and driver["actor_name"] is None
    with pytest.raises(RuntimeError, match="actor"):
        miniray.get_runtime_context().current_actor  # noqa: B018

    task = miniray.get(context_in_task.remote(), timeout=30)
    assert (task["job"], task["node"], task["namespace"]) == (
        driver["job"],
        driver["node"],
        driver["namespace"],
    )
    assert isinstance(task["task"], str) and task["actor"] is None
    assert miniray.get(context_in_task.remote(), timeout=30)["task"] != task["task"]

    actor = ContextActor.options(name="context-actor").remote()
    first, second, at_init = miniray.get(
        [actor.context.remote(), actor.context.remote(), actor.init_context.remote()], timeout=30
    )
    for seen in (first, second, at_init):
        assert seen["actor"] == actor.actor_id
        assert seen["job"] == driver["job"] and seen["namespace"] == driver["namespace"]
        assert seen["actor_name"] == "context-actor"
        assert isinstance(seen["task"], str)
    assert len({first["task"], second["task"], at_init["task"]}) == 3
    assert miniray.get(actor.myself.remote(), timeout=30) == actor
    unnamed = ContextActor.remote()
    assert miniray.get(unnamed.context.remote(), timeout=30)["actor_name"] == ""


@miniray.remote
def assigned_resources():
    try:
        return miniray.get_runtime_context().get_assigned_resources()
    except NotImplementedError as exc:
        return f"NotImplementedError: {exc}"


def test_assigned_resources_are_ray_only(runtime):
    got = miniray.get(assigned_resources.remote(), timeout=30)
    if runtime == "ray":
        assert got == {"CPU": 1.0}
    else:
        assert got.startswith("NotImplementedError") and "backend='ray'" in got


# -- named actors and namespaces (issue 22, item 7) --------------------------------------------


def test_names_in_different_namespaces_do_not_collide(runtime):
    first = Counter.options(name="ns-counter", namespace="ns-one").remote(1)
    second = Counter.options(name="ns-counter", namespace="ns-two").remote(2)
    assert first != second
    one = miniray.get_actor("ns-counter", namespace="ns-one")
    two = miniray.get_actor("ns-counter", namespace="ns-two")
    assert miniray.get([one.read.remote(), two.read.remote()], timeout=30) == [1, 2]
    with pytest.raises(ValueError, match="ns-counter"):
        miniray.get_actor("ns-counter")  # not in this driver's own namespace
    with pytest.raises(ActorAlreadyExistsError):
        Counter.options(name="ns-counter", namespace="ns-one").remote()


@miniray.remote
def lookup_and_read(name, namespace=None):
    return miniray.get(miniray.get_actor(name, namespace=namespace).read.remote(), timeout=30)


def test_default_namespace_is_the_drivers_own_and_tasks_share_it(runtime):
    namespace = miniray.get_runtime_context().namespace
    assert isinstance(namespace, str) and namespace
    Counter.options(name="in-default-ns").remote(4)
    assert (
        miniray.get(
            miniray.get_actor("in-default-ns", namespace=namespace).read.remote(), timeout=30
        )
        == 4
    )
    assert miniray.get(lookup_and_read.remote("in-default-ns"), timeout=30) == 4
    Counter.options(name="in-other-ns", namespace="elsewhere").remote(5)
    assert miniray.get(lookup_and_read.remote("in-other-ns", "elsewhere"), timeout=30) == 5
    with pytest.raises(ValueError, match="in-other-ns"):
        miniray.get(lookup_and_read.remote("in-other-ns"), timeout=30)


def test_a_name_is_found_as_soon_as_remote_returns(runtime):
    # The constructor is still sleeping when the task looks the name up: the name is
    # registered at .remote(), and the call waits for the constructor (as in Ray).
    SlowStart.options(name="slow-start").remote(1.0)
    assert miniray.get(lookup_and_read.remote("slow-start"), timeout=30) == "started"


def test_missing_name_is_a_value_error_at_once(runtime):
    start = time.monotonic()
    with pytest.raises(ValueError, match="never-created"):
        miniray.get(lookup_and_read.remote("never-created"), timeout=30)
    with pytest.raises(ValueError, match="never-created"):
        miniray.get_actor("never-created", namespace="some-namespace")
    assert time.monotonic() - start < 10


def test_bad_namespace_is_refused_by_name(runtime):
    with pytest.raises(ValueError, match="namespace"):
        Counter.options(name="x", namespace="")
    with pytest.raises(ValueError, match="namespace"):
        miniray.get_actor("x", namespace="")


@miniray.remote
class ConstructionRecorder:
    def __init__(self, path):
        with open(path, "a") as f:
            f.write("constructed\n")

    def pid(self):
        return os.getpid()


def test_get_if_exists_from_many_threads_makes_one_actor(runtime, tmp_path):
    path = str(tmp_path / "constructions")
    threads = 8
    barrier = threading.Barrier(threads)
    handles = [None] * threads
    errors = []

    def create(i):
        try:
            barrier.wait(timeout=30)
            handles[i] = ConstructionRecorder.options(name="only-one", get_if_exists=True).remote(
                path
            )
        except Exception as exc:  # reported below: a thread's error must fail the test
            errors.append(exc)

    workers = [threading.Thread(target=create, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors, errors
    assert len({h.actor_id for h in handles}) == 1
    assert len(set(miniray.get([h.pid.remote() for h in handles], timeout=30))) == 1
    with open(path) as f:
        assert f.read() == "constructed\n"


@pytest.mark.parametrize("backend", ["local", "inline"])
def test_init_namespace_is_where_names_live(backend):
    with pytest.raises(ValueError, match="namespace"):
        miniray.init(backend=backend, namespace="")
    miniray.init(backend=backend, num_workers=1, namespace="team")
    try:
        assert miniray.get_runtime_context().namespace == "team"
        Counter.options(name="team-counter").remote(3)
        assert (
            miniray.get(
                miniray.get_actor("team-counter", namespace="team").read.remote(), timeout=30
            )
            == 3
        )
        assert miniray.get(context_in_task.remote(), timeout=30)["namespace"] == "team"
        assert miniray.get(lookup_and_read.remote("team-counter"), timeout=30) == 3
    finally:
        miniray.shutdown()
