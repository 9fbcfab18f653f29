"""``sync_rollout_weights``: the trainer's weights into every rollout worker, never hanging.

verl's GKD recipe did ``ray.get(rollout_wg.sync_rollout_weights())`` with no timeout and
dropped the actor side's refs: one rollout worker that failed to start, ran out of memory, got
bad weights or died left the trainer waiting forever, silently (seed 003). Here::

    caller                                         actor side (trainer)     rollout workers
    "Starting rollout weight synchronization..."
    export weights  -------------------------->    get_weights()
      wait <= nccl_timeout                          (then one put: shipped once)
    "Actor weight sync completed"
    "Waiting for rollout weight sync with timeout=Ns..."
    load_weights(ref, v) ------------------------------------------------->  each worker
      wait <= nccl_timeout; the first worker that raises or dies ends the wait at once
    "Rollout weight sync completed in X.XXs"
    on any failure: "Rollout weight sync failed after X.XXs: <cause>" and raise
      RolloutWeightSyncError (RolloutWeightSyncTimeoutError on timeout), naming each failed
      worker and why (raised, died, still running at the deadline, loaded the wrong version)

Each side gets its own ``nccl_timeout`` (the config key's name is verl's; no NCCL is involved on
the CPU), so a sync takes at most twice that. A worker still running at the deadline is not
killed here: the caller owns the workers and decides (the run stops; shutdown kills them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import miniray
from miniray.errors import RayActorError, RayTaskError
from miniray.rl.endpoints import Pending, call
from miniray.rl.errors import RolloutWeightSyncError, RolloutWeightSyncTimeoutError
from miniray.rl.param_sync import weights_info

__all__ = [
    "RolloutWeightSyncError",
    "RolloutWeightSyncTimeoutError",
    "WeightSyncResult",
    "sync_rollout_weights",
]

logger = logging.getLogger(__name__)


@dataclass
class WeightSyncResult:
    version: int
    actor_s: float
    rollout_s: float
    total_s: float
    bytes: int
    num_workers: int


def sync_rollout_weights(
    actor: Any,
    rollout_workers: Sequence[Any],
    *,
    version: int,
    timeout: float = 600.0,
    names: Sequence[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> WeightSyncResult:
    """Load ``actor``'s weights into every rollout worker as ``version``, or raise in time.

    ``actor`` offers ``get_weights() -> {name: tensor}`` (an object or an actor handle);
    ``rollout_workers`` are actor handles offering ``load_weights(weights, version)`` that
    return the version they now hold. ``timeout`` is ``actor_rollout_ref.nccl_timeout``: the
    bound of each side's wait. ``names`` label the workers in logs and errors (default
    ``rollout_worker_<i>``).
    """
    if not timeout > 0:
        raise ValueError(f"actor_rollout_ref.nccl_timeout={timeout!r} is invalid: must be > 0")
    if not rollout_workers:
        raise ValueError("sync_rollout_weights(): rollout_workers is empty; pass at least one")
    labels = (
        list(names)
        if names is not None
        else [f"rollout_worker_{i}" for i in range(len(rollout_workers))]
    )
    if len(labels) != len(rollout_workers):
        raise ValueError(
            f"names has {len(labels)} entries for {len(rollout_workers)} rollout workers: "
            "must be one name per worker"
        )
    logger.info("Starting rollout weight synchronization...")
    start = clock()
    try:
        weights_ref, nbytes = _export(actor, timeout, clock)
        actor_s = clock() - start
        logger.info("Actor weight sync completed")
        logger.info("Waiting for rollout weight sync with timeout=%ss...", f"{timeout:g}")
        t = clock()
        _load(rollout_workers, labels, weights_ref, version, timeout, clock)
        rollout_s = clock() - t
    except RolloutWeightSyncError as exc:
        elapsed = clock() - start
        exc.elapsed_s, exc.version = elapsed, version
        logger.error("Rollout weight sync failed after %.2fs: %s", elapsed, exc)
        raise
    total = clock() - start
    logger.info("Rollout weight sync completed in %.2fs", total)
    return WeightSyncResult(version, actor_s, rollout_s, total, nbytes, len(rollout_workers))


def _export(actor: Any, timeout: float, clock: Callable[[], float]) -> tuple[Any, int]:
    """The actor's weights as one object ref (shipped once to all workers) and their size."""
    what = f"the actor (trainer) {actor!r} exporting its weights"
    pending = call(actor, "get_weights")
    if not pending.wait(clock() + timeout, clock=clock):
        raise RolloutWeightSyncTimeoutError(
            f"{what} did not finish within actor_rollout_ref.nccl_timeout={timeout:g}s",
            failures={"actor": "timeout"},
        )
    try:
        weights = pending.result(clock() + timeout, clock=clock)
    except Exception as exc:  # reported with the side that failed; the caller decides
        raise RolloutWeightSyncError(
            f"{what} failed: {_describe(exc)}", failures={"actor": _describe(exc)}
        ) from exc
    if pending.ref is not None:
        return pending.ref, _size(weights)
    return miniray.put(dict(weights)), _size(weights)


def _load(
    workers: Sequence[Any],
    labels: list[str],
    weights_ref: Any,
    version: int,
    timeout: float,
    clock: Callable[[], float],
) -> None:
    deadline = clock() + timeout
    calls: dict[Any, tuple[str, Pending]] = {}  # ref -> (worker's label, its call)
    failures: dict[str, str] = {}
    for label, worker in zip(labels, workers):
        try:
            # ``.remote`` directly, not ``endpoints.call``: the fan-out below waits on refs, so
            # a worker must be an actor handle (a plain object fails here, as a dead handle can)
            ref = worker.load_weights.remote(weights_ref, version)
            started = Pending(ref, f"load_weights() of {label}")
        except Exception as exc:  # a dead handle can fail at submission: that worker failed
            failures[label] = _describe(exc)
            continue
        calls[ref] = (label, started)
    pending = list(calls)
    while pending and not failures:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        ready, pending = miniray.wait(pending, num_returns=1, timeout=remaining)
        for ref in ready:
            label, started = calls[ref]
            try:
                loaded = started.result(deadline, clock=clock)
            except RayActorError as exc:
                failures[label] = f"died ({_describe(exc)})"
                continue
            except Exception as exc:  # the worker's own error: reported by name, then raised
                failures[label] = f"raised {_describe(exc)}"
                continue
            if loaded != version:
                failures[label] = f"loaded version {loaded!r}, expected {version}"
    if failures:
        running = [calls[r][0] for r in pending]
        detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
        if running:
            detail += f" (not finished yet: {', '.join(running)})"
        raise RolloutWeightSyncError(
            f"{len(failures)} of {len(workers)} rollout worker(s) failed to load weights "
            f"version {version}: {detail}",
            failures=failures,
        )
    if pending:
        late = [calls[r][0] for r in pending]
        raise RolloutWeightSyncTimeoutError(
            f"timeout: rollout worker(s) {', '.join(late)} did not load weights version "
            f"{version} within actor_rollout_ref.nccl_timeout={timeout:g}s (hung, or too slow: "
            "raise nccl_timeout)",
            failures={label: "timeout" for label in late},
        )


def _size(weights: Any) -> int:
    try:
        return sum(entry["nbytes"] for entry in weights_info(weights).values())
    except TypeError:
        return 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        exc = exc.cause
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
