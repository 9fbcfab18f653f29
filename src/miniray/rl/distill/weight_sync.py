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

The workers' side is ``replica_pool.ReplicaPool.load`` with ``fail_fast``: the one fan-out under
one deadline the RL rollouter's replicas load through too; this module adds what a failure
means here (an error naming each worker) and the pool's statistics say which worker missed a
sync (``missed_syncs``) and which version each holds (``loaded_version``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import miniray
from miniray.rl.endpoints import call
from miniray.rl.errors import RolloutWeightSyncError, RolloutWeightSyncTimeoutError
from miniray.rl.param_sync import weights_info
from miniray.rl.replica_pool import ReplicaPool, describe_error

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
    rollout_workers: Sequence[Any] | ReplicaPool,
    *,
    version: int,
    timeout: float = 600.0,
    names: Sequence[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> WeightSyncResult:
    """Load ``actor``'s weights into every rollout worker as ``version``, or raise in time.

    ``actor`` offers ``get_weights() -> {name: tensor}`` (an object or an actor handle);
    ``rollout_workers`` (a ``ReplicaPool``, or actor handles, then a pool of them is made here)
    offer ``load_weights(weights, version)`` returning the version they now hold. ``timeout``
    is ``actor_rollout_ref.nccl_timeout``: the bound of each side's wait. ``names`` label
    handles in logs and errors (default ``rollout_worker_<i>``; a pool has its own names).
    """
    if not timeout > 0:
        raise ValueError(f"actor_rollout_ref.nccl_timeout={timeout!r} is invalid: must be > 0")
    if isinstance(rollout_workers, ReplicaPool):
        if names is not None:
            raise ValueError("sync_rollout_weights(): names with a ReplicaPool, which has its own")
        pool = rollout_workers
    else:
        if not rollout_workers:
            raise ValueError("sync_rollout_weights(): rollout_workers is empty; pass at least one")
        count = len(rollout_workers)
        labels = list(names) if names is not None else [f"rollout_worker_{i}" for i in range(count)]
        if len(labels) != count:
            raise ValueError(
                f"names has {len(labels)} entries for {count} rollout workers: "
                "must be one name per worker"
            )
        pool = ReplicaPool(list(rollout_workers), names=labels, clock=clock)
    logger.info("Starting rollout weight synchronization...")
    start = clock()
    try:
        weights_ref, nbytes = _export(actor, timeout, clock)
        actor_s = clock() - start
        logger.info("Actor weight sync completed")
        logger.info("Waiting for rollout weight sync with timeout=%ss...", f"{timeout:g}")
        t = clock()
        _load(pool, weights_ref, version, timeout)
        rollout_s = clock() - t
    except RolloutWeightSyncError as exc:
        elapsed = clock() - start
        exc.elapsed_s, exc.version = elapsed, version
        logger.error("Rollout weight sync failed after %.2fs: %s", elapsed, exc)
        raise
    total = clock() - start
    logger.info("Rollout weight sync completed in %.2fs", total)
    return WeightSyncResult(version, actor_s, rollout_s, total, nbytes, pool.size)


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
            f"{what} failed: {describe_error(exc)}", failures={"actor": describe_error(exc)}
        ) from exc
    if pending.ref is not None:
        return pending.ref, _size(weights)
    return miniray.put(dict(weights)), _size(weights)


def _load(pool: ReplicaPool, weights_ref: Any, version: int, timeout: float) -> None:
    """Every worker's load under one deadline; the first that raises, dies or answers another
    version ends the wait (``fail_fast``); raises naming each failed or late worker."""
    loads = pool.load(weights_ref, version, timeout=timeout, fail_fast=True)
    running = [pool.names[i] for i in loads.late + loads.abandoned]
    if loads.failures:
        failures = {pool.names[i]: why for i, why in loads.failures.items()}
        detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
        if running:
            detail += f" (not finished yet: {', '.join(running)})"
        raise RolloutWeightSyncError(
            f"{len(failures)} of {pool.size} rollout worker(s) failed to load weights "
            f"version {version}: {detail}",
            failures=failures,
        )
    if running:
        raise RolloutWeightSyncTimeoutError(
            f"timeout: rollout worker(s) {', '.join(running)} did not load weights version "
            f"{version} within actor_rollout_ref.nccl_timeout={timeout:g}s (hung, or too slow: "
            "raise nccl_timeout)",
            failures={label: "timeout" for label in running},
        )


def _size(weights: Any) -> int:
    try:
        return sum(entry["nbytes"] for entry in weights_info(weights).values())
    except TypeError:
        return 0
