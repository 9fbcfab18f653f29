"""MessageQueue: the bounded, closable, staleness-aware buffer between rollouter and trainer.

Who waits for what, and what wakes them::

    rollouter                         queue (heap by v_start, arrival)        trainer
    put_samples(item, param_version=v) --> [ ... ] --> get_samples(current_param_version=v)
                                                        get_batch(n, v, timeout=t)
      age > k          -> REJECTED_STALE                  waits on `not_empty` until
      full, timeout=0  -> REJECTED_FULL                   n fresh items, close(), or t
      full, timeout>0  -> waits on `not_full` until a get, sweep
                          or clear frees room, close(), or timeout
      closed           -> CLOSED

    close()          : notify_all on both conditions; getters drain what is left, then raise
                       QueueFinished ("finished": the producer ended normally)
    close(error=e)   : getters raise ProducerCrashedError at once ("producer crashed"), so a
                       crash can never look like a clean end (verl #5133)
    version advance  : (a get with a newer version, or update_param_version) evicts items with
                       age > k and notifies `not_full`, because room appeared

Staleness is DESIGN.md's: ``age = v_trainer_now - v_start``; an item with ``age > k`` is never
handed out. Items are consumed oldest-first (lowest ``v_start``, then arrival), which keeps ages
minimal and puts the items a sweep removes at the front of the heap.

The same class runs in-process (``MessageQueue(max_staleness=3)``) or as an actor
(``MessageQueueClient.remote(max_staleness=3)``, a threaded actor so a blocked get does not
block puts). Note that calls to a threaded actor may run in any order, as in Ray: ``get`` the
ref of a put before relying on it in a later get.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from miniray.config import from_dict
from miniray.rl.compat import actor_constructor
from miniray.rl.config import AsyncTrainingConfig
from miniray.rl.config_loading import async_training_config
from miniray.rl.errors import ProducerCrashedError, QueueTimeoutError
from miniray.rl.staleness import check_version, sample_age

__all__ = [
    "MessageQueue",
    "MessageQueueClient",
    "ProducerCrashedError",
    "PutResult",
    "QueueFinished",
    "QueueTimeoutError",
]

logger = logging.getLogger(__name__)


class PutResult(enum.Enum):
    """What ``put_samples`` did with an item. Truthy only when accepted (verl returned a bool)."""

    ACCEPTED = "accepted"
    REJECTED_STALE = "rejected_stale"
    REJECTED_FULL = "rejected_full"
    CLOSED = "closed"

    def __bool__(self) -> bool:
        return self is PutResult.ACCEPTED


class QueueFinished(Exception):
    """The producer closed the queue normally and every item has been consumed."""


@dataclass(order=True)
class _Entry:
    v_start: int
    seq: int
    item: Any = field(compare=False)
    put_at: float = field(compare=False)
    tokens: int | None = field(compare=False)


class MessageQueue:
    """A bounded queue of rollout items with staleness-aware put and get (see module doc).

    ``config`` (an ``RLConfig``, its ``async_training`` section, or a plain dict of either)
    supplies ``max_queue_size`` and ``staleness_threshold``; keyword arguments override it.
    ``max_staleness`` is verl's name for ``staleness_threshold``. ``clock`` (monotonic seconds)
    is injectable so that time-averaged statistics can be tested with a fake clock.
    """

    remote = actor_constructor(kind="remote", max_concurrency=64)
    options = actor_constructor(kind="options", max_concurrency=64)

    def __init__(
        self,
        config: Any = None,
        *,
        max_queue_size: int | None = None,
        staleness_threshold: int | None = None,
        max_staleness: int | None = None,
        clock: Callable[[], float] | None = None,
    ):
        if staleness_threshold is not None and max_staleness is not None:
            if staleness_threshold != max_staleness:
                raise ValueError(
                    f"staleness_threshold={staleness_threshold} and max_staleness="
                    f"{max_staleness} disagree; pass one of them"
                )
        overrides: dict[str, Any] = {}
        if max_queue_size is not None:
            overrides["max_queue_size"] = max_queue_size
        threshold = staleness_threshold if staleness_threshold is not None else max_staleness
        if threshold is not None:
            overrides["staleness_threshold"] = threshold
        base = async_training_config(config)
        # Re-validate through the config so that bad numbers get the config's error messages.
        section = from_dict(
            AsyncTrainingConfig, {**base.to_dict(), **overrides}, path="async_training"
        )
        self.max_queue_size: int = section.max_queue_size
        self.staleness_threshold: int = section.staleness_threshold
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._version = 0
        self._closed = False
        self._producer_error: str | None = None
        self._counts: Counter[str] = Counter()
        self._consumed_ages: Counter[int] = Counter()
        self._consumed_seconds_sum = 0.0
        self._consumed_seconds_max = 0.0
        self._token_sums: Counter[str] = Counter()
        self._token_counts: Counter[str] = Counter()
        now = self._clock()
        self._started_at = now
        self._last_change = now
        self._size_area = 0.0
        self._full_time = 0.0
        self._empty_time = 0.0

    # -- producer side ----------------------------------------------------------------------
    def put_samples(
        self, samples: Any, param_version: int | None = None, *, timeout: float = 0.0
    ) -> PutResult:
        """Offer one item (a ``Sample``, a group of them, or any payload) generated at
        ``param_version`` (its ``v_start``; taken from the item when it has stamps).

        Never raises for a full, stale or closed queue: the result says what happened.
        With ``timeout > 0`` a full queue waits up to ``timeout`` seconds for room.
        """
        v_start = _item_version(samples, param_version)
        _check_timeout(timeout, "put_samples")
        tokens = _item_tokens(samples)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._counts["total_put"] += 1
            while True:
                if self._closed:
                    self._counts["rejected_closed"] += 1
                    return PutResult.CLOSED
                if sample_age(self._version, v_start) > self.staleness_threshold:
                    self._counts["rejected_stale"] += 1
                    self._add_tokens("rejected_stale", tokens)
                    return PutResult.REJECTED_STALE
                if len(self._heap) < self.max_queue_size:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._counts["rejected_full"] += 1
                    return PutResult.REJECTED_FULL
                self._not_full.wait(_wait_s(remaining))
            self._account_time()
            heapq.heappush(
                self._heap, _Entry(v_start, next(self._seq), samples, self._clock(), tokens)
            )
            self._counts["accepted"] += 1
            self._add_tokens("accepted", tokens)
            self._not_empty.notify()
            return PutResult.ACCEPTED

    def put_many(
        self, items: Sequence[Any], param_versions: Sequence[int | None], *, timeout: float = 0.0
    ) -> list[PutResult]:
        """``put_samples`` for each item in order, in one call (one round trip for all the
        groups of an engine call); ``timeout`` bounds the whole call. Results in item order."""
        if len(items) != len(param_versions):
            raise ValueError(
                f"put_many: {len(items)} items but {len(param_versions)} param_versions; "
                "give one version per item"
            )
        _check_timeout(timeout, "put_many")
        deadline = time.monotonic() + timeout
        return [
            self.put_samples(item, version, timeout=max(0.0, deadline - time.monotonic()))
            for item, version in zip(items, param_versions)
        ]

    def put_sample(self, sample: Any, param_version: int | None = None) -> PutResult:
        """verl's name for ``put_samples``."""
        return self.put_samples(sample, param_version)

    def close(self, error: BaseException | str | None = None) -> None:
        """End the stream and wake every waiter. ``error`` marks it a producer crash.

        Idempotent; a later ``close(error)`` after a clean close still records the crash,
        because a crash must never be hidden behind an earlier normal end.
        """
        with self._lock:
            if error is not None and self._producer_error is None:
                self._producer_error = (
                    error if isinstance(error, str) else f"{type(error).__name__}: {error}"
                )
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def shutdown(self) -> None:
        """verl's name for a normal ``close()``."""
        self.close()

    # -- consumer side ----------------------------------------------------------------------
    def get_samples(self, current_param_version: int | None = None, *, timeout: float = 0.0) -> Any:
        """The oldest item fresh at ``current_param_version``, or ``None`` if there is none.

        ``None`` means "no fresh item now" (``timeout=0``) or "none arrived within
        ``timeout`` seconds"; stale items are swept first, so a sample put at version 1 and
        asked for at version 5 with ``k=3`` gives ``None``. The end of the stream is not
        ``None``: it raises ``QueueFinished``, or ``ProducerCrashedError`` after a crash.
        """
        _check_timeout(timeout, "get_samples")
        deadline = time.monotonic() + timeout
        with self._lock:
            self._advance_locked(current_param_version)
            while not self._heap:
                self._raise_if_ended_locked()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._not_empty.wait(_wait_s(remaining))
                self._advance_locked(current_param_version)
            self._raise_if_crashed_locked()
            return self._pop_locked()

    def get_sample(self, current_param_version: int | None = None) -> Any:
        """verl's name for a non-blocking ``get_samples``."""
        return self.get_samples(current_param_version)

    def get_batch(
        self, batch_size: int, current_param_version: int | None = None, *, timeout: float
    ) -> list[Any]:
        """``batch_size`` fresh items, oldest first, taken together once all are there.

        Raises ``QueueTimeoutError`` after ``timeout`` seconds (taking nothing, so nothing is
        lost), ``ProducerCrashedError`` after a crash, and ``QueueFinished`` once a normally
        closed queue is empty. A closed queue with fewer than ``batch_size`` items left hands
        out the rest as a last, short batch.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: must be an integer >= 1")
        if batch_size > self.max_queue_size:
            raise ValueError(
                f"batch_size={batch_size} is invalid: must be <= max_queue_size="
                f"{self.max_queue_size}, or the batch could never be complete"
            )
        _check_timeout(timeout, "get_batch")
        deadline = time.monotonic() + timeout
        with self._lock:
            self._advance_locked(current_param_version)
            while len(self._heap) < batch_size:
                self._raise_if_crashed_locked()
                if self._closed:
                    if not self._heap:
                        raise QueueFinished("the queue was closed by its producer and is empty")
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueTimeoutError(
                        f"get_batch() waited {timeout:.3g} s for {batch_size} fresh items at "
                        f"version {self._version} (staleness_threshold="
                        f"{self.staleness_threshold}) but the queue holds {len(self._heap)}; "
                        "is the rollouter running and not paused?"
                    )
                self._not_empty.wait(_wait_s(remaining))
                self._advance_locked(current_param_version)
            self._raise_if_crashed_locked()
            return [self._pop_locked() for _ in range(min(batch_size, len(self._heap)))]

    def update_param_version(self, version: int) -> int:
        """Advance the consumer's version (never backwards) and sweep; returns items evicted."""
        with self._lock:
            return self._advance_locked(version)

    def clear_queue(self) -> int:
        """Drop every queued item (counted as ``cleared``); returns how many."""
        with self._lock:
            self._account_time()
            dropped = len(self._heap)
            self._heap.clear()
            self._counts["cleared"] += dropped
            self._not_full.notify_all()
            return dropped

    # -- inspection -------------------------------------------------------------------------
    def get_queue_size(self) -> int:
        with self._lock:
            return len(self._heap)

    def qsize(self) -> int:
        return self.get_queue_size()

    @property
    def current_param_version(self) -> int:
        return self._version

    @property
    def closed(self) -> bool:
        return self._closed

    def get_statistics(self) -> dict[str, Any]:
        """Counters, time-averaged utilization and ages (versions and seconds)."""
        with self._lock:
            self._account_time()
            elapsed = self._last_change - self._started_at
            size = len(self._heap)
            consumed = sum(self._consumed_ages.values())
            queued_ages = Counter(sample_age(self._version, e.v_start) for e in self._heap)
            stats: dict[str, Any] = {
                "queue_size": size,
                "max_queue_size": self.max_queue_size,
                "utilization": size / self.max_queue_size,
                "utilization_time_avg": (
                    self._size_area / (self.max_queue_size * elapsed) if elapsed > 0 else 0.0
                ),
                "time_full_fraction": self._full_time / elapsed if elapsed > 0 else 0.0,
                "time_empty_fraction": self._empty_time / elapsed if elapsed > 0 else 0.0,
                "current_param_version": self._version,
                "staleness_threshold": self.staleness_threshold,
                "closed": self._closed,
                "producer_error": self._producer_error,
                "total_put": self._counts["total_put"],
                "accepted": self._counts["accepted"],
                "rejected_stale": self._counts["rejected_stale"],
                "rejected_full": self._counts["rejected_full"],
                "rejected_closed": self._counts["rejected_closed"],
                "evicted_stale": self._counts["evicted_stale"],
                "cleared": self._counts["cleared"],
                "total_consumed": consumed,
                "consumed_age_mean": (
                    sum(a * n for a, n in self._consumed_ages.items()) / consumed
                    if consumed
                    else 0.0
                ),
                "consumed_age_max": max(self._consumed_ages, default=0),
                "consumed_age_histogram": dict(sorted(self._consumed_ages.items())),
                "in_queue_seconds_mean": (
                    self._consumed_seconds_sum / consumed if consumed else 0.0
                ),
                "in_queue_seconds_max": self._consumed_seconds_max,
                "queued_age_histogram": dict(sorted(queued_ages.items())),
            }
            for kind in ("accepted", "rejected_stale", "evicted_stale"):
                n = self._token_counts[kind]
                stats[f"{kind}_tokens_mean"] = self._token_sums[kind] / n if n else None
            return stats

    # -- internals (lock held) --------------------------------------------------------------
    def _advance_locked(self, version: int | None) -> int:
        """Move to ``version`` if newer and evict items that became stale."""
        if version is not None:
            check_version(version, "current_param_version")
            # max(): the trainer and the synchronizer may both report versions; a late, older
            # report must not make stale items fresh again.
            self._version = max(self._version, version)
        evicted = 0
        while self._heap and (
            sample_age(self._version, self._heap[0].v_start) > self.staleness_threshold
        ):
            self._account_time()
            entry = heapq.heappop(self._heap)
            self._add_tokens("evicted_stale", entry.tokens)
            evicted += 1
        if evicted:
            self._counts["evicted_stale"] += evicted
            self._not_full.notify(evicted)
        return evicted

    def _pop_locked(self) -> Any:
        self._account_time()
        entry = heapq.heappop(self._heap)
        self._consumed_ages[sample_age(self._version, entry.v_start)] += 1
        waited = self._clock() - entry.put_at
        self._consumed_seconds_sum += waited
        self._consumed_seconds_max = max(self._consumed_seconds_max, waited)
        self._not_full.notify()
        return entry.item

    def _raise_if_crashed_locked(self) -> None:
        if self._producer_error is not None:
            raise ProducerCrashedError(
                f"the queue's producer crashed: {self._producer_error}",
                self._producer_error,
            )

    def _raise_if_ended_locked(self) -> None:
        self._raise_if_crashed_locked()
        if self._closed:
            raise QueueFinished("the queue was closed by its producer and is empty")

    def _account_time(self) -> None:
        """Integrate size over time up to now (called before every size change)."""
        now = self._clock()
        dt = max(0.0, now - self._last_change)
        size = len(self._heap)
        self._size_area += size * dt
        if size >= self.max_queue_size:
            self._full_time += dt
        if size == 0:
            self._empty_time += dt
        self._last_change = now

    def _add_tokens(self, kind: str, tokens: int | None) -> None:
        if tokens is not None:
            self._token_sums[kind] += tokens
            self._token_counts[kind] += 1


# verl's name; the seed starts the queue with ``MessageQueueClient.remote(max_staleness=3)``.
MessageQueueClient = MessageQueue


def _check_timeout(timeout: Any, what: str) -> None:
    """A timeout is seconds >= 0 or inf (no deadline). Not NaN: every comparison with it is
    false, so a NaN deadline would never arrive."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(
            f"{what}: timeout={timeout!r} is invalid: must be a number >= 0 (inf: no deadline)"
        )


def _wait_s(remaining: float) -> float:
    """What ``Condition.wait`` takes for ``remaining`` seconds: it refuses more than
    ``threading.TIMEOUT_MAX`` (OverflowError), and inf is a wait with no deadline."""
    return min(remaining, threading.TIMEOUT_MAX)


def _item_version(item: Any, param_version: int | None) -> int:
    """The ``v_start`` of an item: ``param_version``, checked against the item's own stamps."""
    stamped = _stamped_version(item)
    if param_version is None:
        if stamped is None:
            raise TypeError(
                f"put_samples(): param_version is required for a {type(item).__name__} item "
                "(it has no v_start stamp)"
            )
        return stamped
    check_version(param_version, "param_version")
    if stamped is not None and stamped != param_version:
        raise ValueError(
            f"put_samples(): param_version={param_version} disagrees with the item's "
            f"v_start={stamped}; the queue's staleness is computed from v_start"
        )
    return param_version


def _stamped_version(item: Any) -> int | None:
    if hasattr(item, "v_start"):
        return item.v_start
    if isinstance(item, (list, tuple)) and item and all(hasattr(s, "v_start") for s in item):
        # A group is as old as its oldest member.
        return min(s.v_start for s in item)
    return None


def _item_tokens(item: Any) -> int | None:
    """The tokens the model generated for ``item`` (a sample or a group): a multi-turn
    sample's observations are not counted."""
    if hasattr(item, "num_generated_tokens"):
        return item.num_generated_tokens
    if (
        isinstance(item, (list, tuple))
        and item
        and all(hasattr(s, "num_generated_tokens") for s in item)
    ):
        return sum(s.num_generated_tokens for s in item)
    return None
