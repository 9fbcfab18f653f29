"""How the RL loop hands the trainer's weights to the rollouter: ``WeightPublisher``.

It owns everything between a trained step and the rollouter running its weights::

    prepare(step)     before the step: a trainer group sends the weights call behind it
    sent(step)        after it: the rollouter's swap_weights goes too, its argument the ref
                      of that call's answer; the runtime delivers it once the weights are
                      stored (a rollouter taking its weights by value, async mode)
    publish(v, step)  take the weights into shared memory, the one copy (a trainer group's
                      rank answer, checked and extrapolated there, whose ref travels on; an
                      in-process trainer's live tensors, put) or a copy to extrapolate from
                      check them: NaN/inf -> NonFiniteWeightsError naming step and parameter
      async mode:     wait for the previous sync (versions stay in order), snapshot them
                      (PublishedWeights), start the sync to version v in a background thread:
                      stage (extrapolate, put) -> pause -> load(v) -> resume, or only wait
                      for the answer of the swap that went with the step
      sync mode:      load them into the rollouter now, blocking (the rollouter is idle)

    check()           raise the error of a background sync that failed (the loop polls it
                      while it waits for a batch, so a failure does not wait for a publish)
    wait() / close()  the last sync done (its error raised) / stopped, both bounded

Weights that are not finite after a step (a diverged update) are never published: the sync
would load them and the rollouter crash later in its sampling, far from the cause.
``blocking_ms`` is the time each publish held the trainer (taking, checking, snapshotting;
in sync mode the whole load); the sync's own phases are in ``statistics()``.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

import miniray
from miniray.rl.batch_source import rollouter_result
from miniray.rl.compat import raise_unless_ok
from miniray.rl.endpoints import Pending
from miniray.rl.extrapolation import Extrapolator, extrapolate
from miniray.rl.param_sync import UnifiedParameterSynchronizer, load_call, swap_call
from miniray.rl.trainer import check_finite_weights

__all__ = [
    "PublishedWeights",
    "WeightPublisher",
    "check_finite_weights",
    "extrapolate",
    "finite_metrics",
    "weights_of",
]

logger = logging.getLogger(__name__)


class WeightPublisher:
    """Publishes ``trainer``'s weights to ``rollouter`` as versions, in order.

    ``background``: async mode's sync in a thread (the trainer's next step runs while the
    weights travel); otherwise a blocking ``load_weights`` with ``load_timeout``.
    ``extrapolation`` (background only): publish ``theta + c * (theta - theta_before)``.
    ``wait_timeout`` bounds every wait for a background sync.
    """

    def __init__(
        self,
        trainer: Any,
        rollouter: Any,
        *,
        config: Any,
        background: bool,
        extrapolation: float = 0.0,
        wait_timeout: float,
        load_timeout: float,
    ) -> None:
        self.trainer = trainer
        self.rollouter = rollouter
        self.background = bool(background)
        self.extrapolation = float(extrapolation) if self.background else 0.0
        self.extrapolating = bool(self.extrapolation)
        # A trainer group's rank extrapolates what it publishes (``published_weights``); for
        # any other trainer the snapshot does, in the driver.
        self._published = getattr(trainer, "published_weights", None)
        in_driver = 0.0 if callable(self._published) else self.extrapolation
        self.snapshot = PublishedWeights(in_driver)
        # Async mode: the synchronizer reads the snapshot, not the trainer, so the trainer's
        # next step cannot change what travels. Sync mode loads inline; the synchronizer then
        # only keeps the version and the statistics.
        self.sync = UnifiedParameterSynchronizer(
            config,
            trainer_actor=self.snapshot if self.background else trainer,
            rollouter_actor=rollouter,
        )
        self.wait_timeout = wait_timeout
        self.load_timeout = load_timeout
        self.blocking_ms: list[float] = []
        self.finite_at = 0  # the last step whose weights were checked and found finite
        self._version = 0  # the last version published (or restored)
        # Prepared steps not published yet -> their version, and whether their swap goes
        # out with the step.
        self._planned: dict[int, _Planned] = {}
        # Steps whose swap_weights call went out with the step (``sent``), not answered yet.
        self._started: dict[int, Pending] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[bool] | None = None

    @classmethod
    def for_run(cls, cfg: Any, trainer: Any, rollouter: Any) -> WeightPublisher:
        """The publisher an ``RLConfig`` asks for (``async_training.mode``, its timeouts)."""
        a = cfg.async_training
        return cls(
            trainer,
            rollouter,
            config=cfg,
            background=a.mode == "async",
            extrapolation=a.weight_extrapolation,
            wait_timeout=2 * a.sync_timeout + 30,
            load_timeout=a.generation_timeout,
        )

    def restore(self, version: int, step: int) -> None:
        """A resumed run: the rollouter runs ``version`` (the checkpoint's weights, found
        finite when they were saved after ``step``)."""
        self.sync.restore_version(version)
        self.finite_at = step
        self._version = int(version)

    def prepare(self, step: int) -> None:
        """``step``'s weights will be published: a trainer that can (``TrainerGroup``) sends
        the call that takes them right behind the step, so they are ready when its answer is."""
        prepare = getattr(self.trainer, "prepare_publish", None)
        if not callable(prepare):
            return
        # A step sent ahead of the previous step's publish: that publish checks its weights
        # first, and a failed check ends the run, so this one's would follow finite ones.
        finite_at = max(self._planned, default=self.finite_at)
        version = max((p.version for p in self._planned.values()), default=self._version) + 1
        # A swap sent ahead (``sent``) runs the moment the weights are stored: the rank
        # stores only checked ones (an answer that is stored is a finite one).
        self._planned[step] = _Planned(version, start_swap=self._can_start_swap())
        prepare(step, finite_at, extrapolation=self.extrapolation)

    def sent(self, step: int) -> None:
        """``step`` (prepared) went to the trainer: when the rollouter takes its weights by
        value (one engine in its own process), its ``swap_weights`` call goes now too, with
        the ref of the rank's weights answer as its argument. The runtime delivers it once the
        weights are stored, so they reach the rollouter with no round trip through this
        process: measured on the demo (a timeline in every process, 2 busy cores), from a
        step's end to the rollouter generating with its weights took ~12 ms through the
        driver (its step result, the publish, the sync's thread, the call), in 5-6 hops of
        ~1.5-2 ms each; the staleness bound puts that latency on every step's critical path.
        A failed swap is retried through the snapshot when the publish syncs."""
        planned = self._planned.get(step)
        if planned is None or not planned.start_swap:  # start_swap: the trainer offers the ref
            return
        ref = self.trainer.prepared_publish_ref(step)
        if ref is not None:
            self._started[step] = swap_call(
                self.rollouter, ref, planned.version, self.sync.config.sync_timeout, by_value=True
            )

    def publish(self, version: int, *, step: int, metrics: dict[str, Any]) -> None:
        """Publish the weights after ``step`` (its ``metrics`` name the cause if they are not
        finite) as ``version``. Async mode returns once the sync has started."""
        t0 = time.time()  # the blocking time includes taking and checking the weights
        planned = self._planned.pop(step, None)
        started = self._started.pop(step, None)
        if started is not None and planned is not None and planned.version != version:
            raise RuntimeError(
                f"publish(version={version}) after step {step}, whose swap went out as version "
                f"{planned.version}: the loop must publish the versions it prepared, in order"
            )
        weights = self._take(step, metrics)
        self._version = int(version)
        if self.background:
            self.wait()  # the previous version is in place: versions stay in order
            self.snapshot.take(weights)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="weight-sync")
            self._running = self._executor.submit(self._sync, version, started)
        else:
            load = load_call(self.rollouter, weights, version)
            if load.ref is not None:  # an actor: its death is the producer's
                rollouter_result(load.ref, self.load_timeout)
            else:  # a rollouter in this process
                load.result(time.monotonic() + self.load_timeout)
        self.blocking_ms.append((time.time() - t0) * 1e3)

    def check_weights(self, step: int, metrics: dict[str, Any], *, always: bool) -> None:
        """A step not published: its weights are checked when ``always`` (a checkpoint is
        written from them) or when its loss or gradient norm is not finite, so that the error
        names the step the divergence began at rather than the next published one."""
        if always or not finite_metrics(metrics):
            self._checked(step, metrics, copy=False)

    def check(self) -> None:
        """Raise the error of a background sync that has failed; returns at once."""
        if self._running is not None and self._running.done():
            self.wait()

    def wait(self) -> None:
        """Block until the running sync is done (``wait_timeout``), raising its error: a sync
        that failed after its retries stops the run, as when it ran inline."""
        running, self._running = self._running, None
        if running is None:
            return
        try:
            running.result(timeout=self.wait_timeout)
        except FutureTimeoutError:
            # concurrent.futures' TimeoutError is the builtin one, and so is the sync's own
            # ParameterSyncTimeoutError: a sync that timed out (done) is raised as itself,
            # naming the phase that hung, not relabelled as this wait running out.
            if running.done():
                raise
            # Still running: kept, so that close() waits for it rather than leaving its
            # thread calling a rollouter the run is about to stop.
            self._running = running
            raise TimeoutError(
                f"the weight sync did not finish within {self.wait_timeout:g}s; look for a "
                "hung rollouter (pause_rollout/load_weights) or raise async_training.sync_timeout"
            ) from None

    def close(self) -> None:
        """Let a running sync finish (it resumes the rollouter in any case), then stop; a
        sync still running after ``wait_timeout`` is left to its own deadline, with a warning."""
        running, self._running = self._running, None
        finished = True
        if running is not None:
            try:
                running.result(timeout=self.wait_timeout)
            except Exception as exc:  # the run is ending because of another error: keep that
                if isinstance(exc, FutureTimeoutError) and not running.done():
                    finished = False
                    logger.warning(
                        "the weight sync running at shutdown did not finish within %gs; its "
                        "thread ends at the sync's own deadline (async_training.sync_timeout)",
                        self.wait_timeout,
                    )
                else:
                    logger.warning("the weight sync running at shutdown failed too: %s", exc)
        if self._executor is not None:
            # cancel_futures: a sync not yet started must not start after the run ended.
            # Joined when nothing runs (then at once), so no thread outlives close(); not when
            # a sync hangs, or close() would hang with it.
            self._executor.shutdown(wait=finished, cancel_futures=True)
            self._executor = None

    def statistics(self) -> dict[str, Any]:
        return self.sync.get_statistics()

    def _take(self, step: int, metrics: dict[str, Any]) -> Any:
        """The checked weights after ``step``, taken before the next step changes them: an
        ``ObjectRef`` in shared memory (the sync's one copy), or a copy to extrapolate from.
        A trainer group's weights are already in the object store as its rank's answer
        (``published_weights``), checked and extrapolated by the rank: the ref travels on
        untouched."""
        if callable(self._published):
            ref = self._published(step, self.finite_at, metrics, extrapolation=self.extrapolation)
            self.finite_at = step
            return ref
        if self.extrapolating:
            return self._checked(step, metrics, copy=True)
        return miniray.put(self._checked(step, metrics, copy=False))

    def _checked(self, step: int, metrics: dict[str, Any], *, copy: bool) -> dict[str, Any]:
        weights = weights_of(self.trainer, copy=copy)
        check_finite_weights(weights, step, self.finite_at, metrics)
        self.finite_at = step
        return weights

    def _sync(self, version: int, started: Pending | None = None) -> bool:
        # The trainer's version moves on when the sync starts: samples made until the new
        # weights are loaded are one version older, which the staleness bound allows.
        self.snapshot.stage()
        return raise_unless_ok(self.sync.sync(version, started=started))

    def _can_start_swap(self) -> bool:
        """Whether a publish's swap can go out with its step (``sent``): async mode, a trainer
        group, and one rollouter actor that took its last weights by value."""
        return (
            self.background
            and callable(getattr(self.trainer, "prepared_publish_ref", None))
            and isinstance(self.rollouter, miniray.ActorHandle)
            and self.sync.wants_value(self.rollouter)
        )


@dataclass(frozen=True)
class _Planned:
    """A prepared publish: its version, and whether its swap goes out with the step."""

    version: int
    start_swap: bool


def weights_of(trainer: Any, *, copy: bool) -> dict[str, Any]:
    """The trainer's weights to check and publish: its live tensors when it offers them
    (``FullyAsyncTrainer.live_weights``) and the caller copies them out at once, else (or with
    ``copy``) ``get_weights()``, a copy. Measured at Qwen2.5-0.5B size in bf16
    (benchmarks/weight_sync.py): the clone was one of the sync's two memcpys of the model."""
    live = getattr(trainer, "live_weights", None)
    if copy or not callable(live):
        return trainer.get_weights()
    return live()


def finite_metrics(metrics: dict[str, Any]) -> bool:
    """False when the step's loss or gradient norm is NaN or inf: its update then poisoned
    the weights (the gradient clip scales by a NaN norm), so they are checked at once."""
    return all(
        math.isfinite(metrics[key])
        for key in ("loss", "grad_norm")
        if isinstance(metrics.get(key), (int, float))
    )


class PublishedWeights:
    """The weights the synchronizer publishes: a copy taken after a step, so the trainer can
    take its next step while they travel to the rollouter. With ``extrapolation`` c > 0 (a
    trainer that cannot extrapolate itself) it publishes ``theta + c * (theta -
    theta_before)`` (``rl.extrapolation``), computed while staging, in the sync's thread
    rather than on the trainer's path."""

    # The synchronizer's get_weights() of this snapshot hands over what is staged: run in the
    # sync's own thread (endpoints.call), not on one started for it.
    answers_at_once = True

    def __init__(self, extrapolation: float = 0.0) -> None:
        self.weights: Any = None
        self.extrapolation = extrapolation
        self._extrapolator = Extrapolator()

    def take(self, weights: Any) -> None:
        """A new snapshot: an ``ObjectRef`` of weights already put, or (to extrapolate from)
        a copy of them; never the live parameters, which the next step changes."""
        self.weights = weights

    def stage(self) -> None:
        """Put the weights in the object store before the sync pauses the rollouter: then
        its pause lasts for the load alone, not for serializing the weights as well."""
        if self.weights is not None and not isinstance(self.weights, miniray.ObjectRef):
            if self.extrapolation:  # a copy of its own: kept as it is to extrapolate from
                self.weights = self._extrapolator.publish(
                    self.weights, self.extrapolation, keep_copy=False
                )
            self.weights = miniray.put(self.weights)

    def get_weights(self) -> Any:
        if self.weights is None:
            raise RuntimeError("no weights to publish yet: a snapshot is taken after a step")
        return self.weights
