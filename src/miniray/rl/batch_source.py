"""Where the RL loop's batches come from: ``BatchSource``, one per ``async_training.mode``.

    async (QueueSource):      rollouter --groups(v_start)--> queue actor --oldest first--> batch
                              the rollouter generates all along; a dead one is noticed at once
    sync (GeneratedSource):   rollouter.generate_batch(n, version) --> batch
                              the rollouter generates only when asked, at the current version

Either way a source owns, for the loop::

    start()              async: start the rollouter's generation loop and its watch
    next_batch(version)  ``data.train_batch_size`` groups for a trainer at ``version``; with
                         dynamic sampling (``algorithm.filter_groups``) kept groups only, the
                         dropped ones handed back (``fill_batch``, ``discard_groups``)
    prefetch(version)    async: ask the queue now for the next batch (the trainer's version
                         then), so that it waits in the queue while the trainer trains
    hand_off(version)    a new version for the queue (not waited for: read at the next batch)
    check(cause)         a failure the dead rollouter caused becomes ``ProducerCrashedError``
    stop()               the rollouter stopped, the queue closed; the queue's and the
                         rollouter's statistics

Every wait has a deadline (``async_training.generation_timeout`` for a batch; ``inf``: none,
which the runtime's ``get``/``wait`` take as it is). A crashed rollouter closes the queue with
its traceback, which surfaces as ``ProducerCrashedError`` instead of a clean end. A rollouter
whose process died cannot close the queue: ``_ProducerWatch`` keeps a call to it in flight that
the runtime fails at once, and every wait for a batch waits on that call too, so a dead
rollouter is a ``ProducerCrashedError`` within moments, not a timeout blaming a paused one.
The async source's wait also polls ``poll`` (the loop passes ``WeightPublisher.check``): a
weight sync that failed in the background fails the run while the trainer waits for a batch,
not only at the next publish.
"""

from __future__ import annotations

import abc
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import miniray
from miniray.errors import RayActorError
from miniray.rl.dynamic_sampling import fill_batch
from miniray.rl.errors import ParameterSyncError, ProducerCrashedError

__all__ = [
    "Batch",
    "BatchSource",
    "GeneratedSource",
    "QueueSource",
    "batch_source",
    "rollouter_result",
]

POLL_S = 0.5  # how often a wait for a batch looks at the background weight sync


@dataclass
class Batch:
    """The groups of one step, what dynamic sampling dropped to fill it, and the wait."""

    groups: list[Any]
    dropped: list[Any] = field(default_factory=list)
    wait_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)  # filter_groups/* when enabled


def batch_source(
    cfg: Any, rollouter: Any, queue: Any, *, poll: Callable[[], None] | None = None
) -> BatchSource:
    """The source ``async_training.mode`` asks for; ``poll`` runs while an async source
    waits for a batch (it may raise to end the wait)."""
    if cfg.async_training.mode == "async":
        return QueueSource(cfg, rollouter, queue, poll=poll)
    return GeneratedSource(cfg, rollouter, queue)


class BatchSource(abc.ABC):
    """What the loop drives (the module docstring); what both modes share lives here:
    dynamic sampling, the version hand-off, the queue's size. A mode supplies ``fetch``."""

    def __init__(self, cfg: Any, rollouter: Any, queue: Any) -> None:
        self.rollouter = rollouter
        self.queue = queue
        self.timeout = cfg.async_training.generation_timeout
        self.batch_groups = cfg.data.train_batch_size
        filters = cfg.algorithm.filter_groups
        # Read here, whether or not enabled: the settings are checked even when off.
        self.filtering = filters.enable
        self.metric, self.max_batches = filters.metric, filters.max_num_gen_batches
        self.groups_discarded = 0
        self._version_ref: miniray.ObjectRef | None = None  # the queue's answer to hand_off
        self._discard_refs: list[miniray.ObjectRef] = []  # the rollouter's to discard_groups
        self._size_ref: miniray.ObjectRef | None = None

    @property
    def batch_by_ref(self) -> bool:
        """Whether the prefetched batch goes to the trainer as it is, by its ref, before it
        is there (``prefetched_ref``): async mode without dynamic sampling, whose kept groups
        the driver picks."""
        return False

    def start(self) -> None:
        """Begin producing (sync mode: nothing to start, batches are made when asked)."""
        return None

    def prefetched_ref(self) -> miniray.ObjectRef:
        """The ref of the next batch, asked for and not there yet (``batch_by_ref``)."""
        raise RuntimeError(f"{type(self).__name__} sends no batch by ref (batch_by_ref)")

    def prefetch(self, version: int) -> None:
        """Ask now for the next batch, which a trainer at ``version`` will train (sync mode:
        nothing, a batch is generated when asked, at the version then)."""
        return None

    @abc.abstractmethod
    def fetch(self, count: int, *, version: int) -> list[Any]:
        """``count`` groups for a trainer at ``version``."""

    def next_batch(self, version: int) -> Batch:
        t0 = time.time()
        fetch = functools.partial(self.fetch, version=version)
        if self.filtering:
            filled = fill_batch(
                fetch,
                self.batch_groups,
                metric=self.metric,
                max_num_gen_batches=self.max_batches,
                on_drop=self._discard,
            )
            self.groups_discarded += len(filled.dropped)
            batch = Batch(
                filled.kept,
                filled.dropped,
                metrics={
                    "filter_groups/dropped": len(filled.dropped),
                    "filter_groups/dropped_total": self.groups_discarded,
                    "filter_groups/fetches": filled.fetches,
                },
            )
        else:
            batch = Batch(fetch(self.batch_groups))
        batch.wait_s = time.time() - t0
        # Answers travel through the driver, which is busy training: ask now, read after.
        self._size_ref = self.queue.get_queue_size.remote()
        self.finish()
        return batch

    def hand_off(self, version: int) -> None:
        # Not waited for: the queue's version only moves forward (the next get_batch passes
        # it too), so the order of the two calls is moot; read at the next batch.
        self._version_ref = self.queue.update_param_version.remote(version)

    def queue_size(self) -> int:
        """The queue's size asked for after the last batch was taken."""
        if self._size_ref is None:
            return int(miniray.get(self.queue.get_queue_size.remote(), timeout=self.timeout))
        size, self._size_ref = self._size_ref, None
        return int(miniray.get(size, timeout=self.timeout))

    def finish(self) -> None:
        """Read the answers of calls not waited for: the queue took the last version (or
        raises), the rollouter took the discarded groups (or raises)."""
        if self._version_ref is not None:
            miniray.get(self._version_ref, timeout=self.timeout)
            self._version_ref = None
        for ref in self._discard_refs:
            rollouter_result(ref, self.timeout)
        self._discard_refs.clear()

    def check(self, cause: BaseException) -> None:
        """Turn ``cause`` into ``ProducerCrashedError`` if a dead rollouter caused it (sync
        mode: its calls already raise that, ``rollouter_result``)."""
        return None

    def stop(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Stop the rollouter and close the queue; (the queue's statistics, the rollouter's),
        each empty if it cannot be read."""
        queue_stats: dict[str, Any] = {}
        rollouter_stats: dict[str, Any] = {}
        try:
            miniray.get(self.rollouter.stop.remote(), timeout=self.timeout)
            rollouter_stats = miniray.get(
                self.rollouter.get_statistics.remote(), timeout=self.timeout
            )
        except Exception:  # the run is ending (maybe because of this rollouter): keep that
            pass
        try:
            queue_stats = miniray.get(self.queue.get_statistics.remote(), timeout=self.timeout)
        except Exception:  # read apart from the rollouter's: a failed stop does not lose them
            pass
        try:
            # Closed whatever the rollouter did: a producer waiting in a put on a full queue
            # (a rollouter whose stop failed, a sender mid-put) has no consumer left to make
            # room, and would otherwise wait out its whole timeout.
            miniray.get(self.queue.close.remote(), timeout=self.timeout)
        except Exception:  # a queue that is gone has no producer waiting in it either
            pass
        return queue_stats, rollouter_stats

    def _discard(self, groups: list[Any]) -> None:
        """Dynamic sampling dropped ``groups``: their staleness room goes back now."""
        self._discard_refs.append(self.rollouter.discard_groups.remote(len(groups)))


class QueueSource(BatchSource):
    """Async mode: the rollouter generates all along; batches come from the queue actor."""

    def __init__(
        self, cfg: Any, rollouter: Any, queue: Any, *, poll: Callable[[], None] | None = None
    ) -> None:
        super().__init__(cfg, rollouter, queue)
        self.poll = poll
        self._watch: _ProducerWatch | None = None
        self._prefetched: tuple[miniray.ObjectRef, int, int] | None = None  # (ref, count, version)

    def start(self) -> None:
        miniray.get(self.rollouter.start.remote(), timeout=self.timeout)
        self._watch = _ProducerWatch(self.rollouter, self.queue)

    @property
    def batch_by_ref(self) -> bool:
        return not self.filtering

    def prefetch(self, version: int) -> None:
        """The next batch's ``get_batch`` sent now: it waits in the queue (its own deadline,
        ``generation_timeout``) while the trainer trains on this one, and the next step takes
        its answer. Measured on the demo (2 cores): the trainer waited 8.4 ms a step on the
        queue's round trip; the rank was idle all that time.

        The queue's version moves to ``version`` when the call arrives, not at the next step:
        what it sweeps then is what the hand-off of that version would sweep before the next
        batch anyway, and the batch is trained at ``version``, so its ages are the same."""
        if self._watch is None:
            raise RuntimeError("prefetch() before start(): the rollouter is not generating")
        if self._prefetched is not None:
            raise RuntimeError("prefetch() twice: the batch asked for first was not taken")
        ref = self.queue.get_batch.remote(self.batch_groups, version, timeout=self.timeout)
        self._prefetched = (ref, self.batch_groups, version)

    def fetch(self, count: int, *, version: int) -> list[Any]:
        if self._watch is None:
            raise RuntimeError("fetch() before start(): the rollouter is not generating")
        ref = self._take_prefetched(count, version)
        if ref is None:
            ref = self.queue.get_batch.remote(count, version, timeout=self.timeout)
        return self._watch.get(ref, timeout=self.timeout + 30, poll=self.poll)

    def prefetched_ref(self) -> miniray.ObjectRef:
        """The ref of the batch ``prefetch`` asked for, left prefetched (``next_batch``
        still takes it): the loop sends it to the trainer before it is there."""
        if self._prefetched is None:
            raise RuntimeError("prefetched_ref() without prefetch()")
        return self._prefetched[0]

    def _take_prefetched(self, count: int, version: int) -> miniray.ObjectRef | None:
        """The prefetched call if there is one; its groups are out of the queue already, so a
        call for another version or size is a caller's mistake that would lose them."""
        if self._prefetched is None:
            return None
        (ref, asked, at), self._prefetched = self._prefetched, None
        if (asked, at) != (count, version):
            raise RuntimeError(
                f"a batch of {asked} groups was prefetched for version {at}, but {count} "
                f"groups were asked for at version {version}: the prefetched groups would be lost"
            )
        return ref

    def check(self, cause: BaseException) -> None:
        """Raise ``ProducerCrashedError`` from ``cause`` if the rollouter has gone: a failure
        it caused (a sync or a call to it failing) is reported as what it is. The watch may
        take a moment longer than the failed call to resolve."""
        if self._watch is not None and not isinstance(cause, ProducerCrashedError):
            about_actors = isinstance(cause, (ParameterSyncError, RayActorError))
            self._watch.check(wait_s=1.0 if about_actors else 0.0, cause=cause)


class GeneratedSource(BatchSource):
    """Sync mode: the rollouter generates a batch when asked, at the trainer's version."""

    def fetch(self, count: int, *, version: int) -> list[Any]:
        return rollouter_result(self.rollouter.generate_batch.remote(count, version), self.timeout)


def rollouter_result(ref: miniray.ObjectRef, timeout: float) -> Any:
    """The answer of a call to the rollouter; its death is ``ProducerCrashedError`` (sync mode,
    and before the generation loop starts, where no ``_ProducerWatch`` runs)."""
    try:
        return miniray.get(ref, timeout=timeout)
    except RayActorError as exc:
        raise ProducerCrashedError(f"the rollouter died: {exc}", str(exc)) from exc


class _ProducerWatch:
    """Learns at once that the rollouter has gone: its process died, or its loop ended.

    One call of ``rollouter.wait_loop_end()`` stays in flight for the whole run. It returns
    when the generation loop ends (its traceback, or None for a stop) and the runtime fails it
    with a ``RayActorError`` as soon as the rollouter's process dies. Without it a SIGKILLed
    rollouter, which cannot close the queue with an error, was found only by the queue's
    timeout (forever with ``generation_timeout=inf``), whose message blamed a paused rollouter.
    """

    def __init__(self, rollouter: Any, queue: Any):
        self._ref = rollouter.wait_loop_end.remote()
        self._queue = queue
        self._error: ProducerCrashedError | None = None

    def get(
        self,
        ref: miniray.ObjectRef,
        *,
        timeout: float,
        poll: Callable[[], None] | None = None,
        poll_s: float = POLL_S,
    ) -> Any:
        """``ref``'s value (a ``GetTimeoutError`` after ``timeout``), or
        ``ProducerCrashedError`` as soon as the rollouter is gone. ``poll`` runs every
        ``poll_s`` seconds of the wait; what it raises ends the wait."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            ready, _ = miniray.wait(
                [ref, self._ref], num_returns=1, timeout=left if poll is None else min(left, poll_s)
            )
            if ref in ready:  # ready first (wait lists it first)
                return miniray.get(ref, timeout=0)
            if ready:
                raise self._ended()
            if time.monotonic() >= deadline:  # time is up: get says so
                return miniray.get(ref, timeout=0)
            if poll is not None:
                poll()

    def check(self, *, wait_s: float = 0.0, cause: BaseException | None = None) -> None:
        """Raise ``ProducerCrashedError`` (from ``cause``) if the rollouter is gone, waiting
        up to ``wait_s`` seconds for the watch to tell."""
        ready, _ = miniray.wait([self._ref], timeout=wait_s)
        if ready:
            raise self._ended() from cause

    def _ended(self) -> ProducerCrashedError:
        if self._error is None:
            try:
                crash = miniray.get(self._ref, timeout=0)  # ready: no wait
            except RayActorError as exc:
                message, crash = f"the rollouter died: {exc}", str(exc)
            except Exception as exc:  # the watch itself failed: the rollouter is unusable too
                crash = f"{type(exc).__name__}: {exc}"
                message = f"the rollouter's watch failed: {crash}"
            else:
                message = (
                    f"the rollouter crashed:\n{crash}"
                    if crash
                    else "the rollouter's generation loop stopped before the run ended"
                )
            self._error = ProducerCrashedError(message, crash or "")
            # A get_batch may still wait in the queue for a producer that will never close it.
            self._queue.close.remote(message)
        return self._error
