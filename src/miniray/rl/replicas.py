"""Rollout replicas: the engines ``FullyAsyncRollouter`` drives when it has more than one.

The rollouter stays the manager (prompt cursor, admission control, partial rollouts, rewards,
the queue); each replica is an actor holding one engine, generating one call at a time::

    rollouter, lane i (a thread per replica)          replica i (EngineReplica actor)
      take work: unfinished groups first, then
      new prompts within the admission room
      RemoteEngine.generate(...) ------ generate ---> engine.generate(should_stop=aborted?)
        polls should_stop() while it waits             stops at the next token, returns the
        (a pause): ----------------------- abort ---->  tokens so far ("aborted")
      load_weights(w, v): one put, then every replica's load_weights(ref) under one deadline
      a replica that died or missed generation_timeout: its groups go back, unchanged, to
      the unfinished list (another lane continues them); restarted with the current weights
      up to rollout.max_restarts times; the run fails only when no replica is left

Starting, restarting, the load's fan-out and the per-replica statistics are the
``replica_pool.ReplicaPool``'s (distillation's rollout workers use the same pool); this module
is what a replica is (``EngineReplica``) and how a lane calls one (``RemoteEngine``).

Balancing is by pull: a lane asks for work when its replica is free, so a fast replica takes
more groups than a slow one (least loaded: each replica has at most one call in flight).
One replica (the default) is not an actor: the rollouter calls its engine in its own process,
as it always has. ``replica_count`` says how many a config asks for; ``rollout_placement`` on
which device each generates (a GPU of its own where CUDA is and ``rollout.n_gpus_per_node``
asks for GPUs, else the CPU), ``replica_options`` what each asks the scheduler for (one CPU,
its GPU, spread over the nodes on Ray), and ``node()`` where it landed.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import miniray
from miniray.errors import GetTimeoutError, RayActorError
from miniray.rl.compat import actor_constructor
from miniray.rl.engines.base import Generation
from miniray.rl.placement import (
    ReplicaPlacement,
    cuda_device_count,
    local_device,
    node_id,
    replica_placement,
    wants_cuda,
)
from miniray.rl.replica_pool import ReplicaPool

__all__ = [
    "EngineReplica",
    "RemoteEngine",
    "ReplicaFailed",
    "engine_pool",
    "in_process_engine",
    "replica_count",
    "replica_engine",
    "replica_options",
    "rollout_placement",
]

ABORT_POLL_S = 0.01  # how often a lane asks should_stop() while its replica generates


def replica_options(placement: ReplicaPlacement) -> dict[str, Any]:
    """What a replica asks the scheduler for. One CPU: its engine's host thread. Its GPU on
    CUDA (Ray hides every GPU from an actor that asks for none). SPREAD: on Ray the replicas go
    to different nodes while nodes have room (the two-node cluster test: one on each); the
    embedded backends take it as the default, which it is on one machine. rollout.nnodes is no
    placement constraint (no placement group): SPREAD spreads over whatever nodes there are."""
    return {"num_cpus": 1, "num_gpus": placement.num_gpus, "scheduling_strategy": "SPREAD"}


def rollout_placement(cfg: Any) -> ReplicaPlacement:
    """``placement.replica_placement`` for an RL config and the CUDA devices this process
    sees. Planned in the driver and handed to the rollouter: on Ray an actor that asked for no
    GPU sees none. The trainer's GPUs come first on a node: ``trainer.n_gpus_per_node`` of them
    where its ranks run on CUDA (``trainer_group.group_plan``'s rule)."""
    cuda = cuda_device_count()
    trainer = cfg.trainer
    trainer_gpus = trainer.n_gpus_per_node if wants_cuda(trainer.device, cuda) else 0
    return replica_placement(
        cfg.rollout,
        cuda_devices=cuda,
        trainer_gpus=trainer_gpus,
        single_node=cfg.rollout.nnodes == 1 and trainer.nnodes == 1,
    )


def replica_count(cfg: Any) -> int:
    """``rollout.nnodes x rollout.n_gpus_per_node / tensor_model_parallel_size``; without
    CUDA ``n_gpus_per_node`` counts CPU processes, and 0 means one (as for the trainer)."""
    per_node = max(1, cfg.rollout.n_gpus_per_node)
    tp = cfg.actor_rollout_ref.rollout.tensor_model_parallel_size
    return max(1, cfg.rollout.nnodes * per_node // tp)


def replica_engine(
    cfg: Any,
    index: int,
    seed: int,
    engine_factory: Callable[[int], Any] | None = None,
    *,
    device: str = "cpu",
) -> Any:
    """Replica ``index``'s engine: ``engine_factory(index)`` (which places its engine itself),
    else the engine ``actor_rollout_ref.rollout.name`` names, loaded from ``model.path`` onto
    ``device`` (``ReplicaPlacement.device``, as this process numbers it: ``local_device``)."""
    if engine_factory is not None:
        return engine_factory(index)
    from miniray.rl.engines import build_engine
    from miniray.rl.models.tiny import load_options

    device = local_device(device)
    model = cfg.actor_rollout_ref.model
    return build_engine(
        cfg.actor_rollout_ref.rollout.name,
        model_path=model.path,
        seed=seed,
        device=device,
        **load_options(model, device=device),
    )


def in_process_engine(
    cfg: Any,
    seed: int,
    engine: Any,
    engine_factory: Callable[[int], Any] | None,
    placement: ReplicaPlacement,
) -> Any:
    """The engine a one-replica rollouter calls in its own process: ``engine``, else replica
    0's (``replica_engine`` on ``placement``'s device); None with several replicas, which
    refuse one ``engine``."""
    count = replica_count(cfg)
    if count > 1 and engine is not None:
        raise ValueError(
            f"rollout.nnodes x rollout.n_gpus_per_node asks for {count} rollout "
            "replicas, each an actor with its own engine: pass engine_factory (called in "
            "each replica's process), not one engine"
        )
    if engine is None and count == 1:
        engine = replica_engine(cfg, 0, seed, engine_factory, device=placement.device(0))
    return engine


def engine_pool(
    cfg: Any,
    seed: int,
    engine: Any,
    engine_factory: Callable[[int], Any] | None,
    *,
    lock: threading.Condition,
    placement: ReplicaPlacement,
) -> ReplicaPool:
    """The rollouter's ``ReplicaPool``. One replica: ``engine``, in the rollouter's process,
    which the pool only counts. Several: one ``EngineReplica`` actor each (``seed + i``, on
    ``placement.device(i)``), started together, restarted up to ``rollout.max_restarts`` times; a start is bounded, as a
    trainer rank's, by ``nccl_timeout`` (building an engine), a load by ``generation_timeout``.
    ``lock``: the rollouter's, which its lanes take work under (``ReplicaPool.pause``)."""
    max_restarts = cfg.rollout.max_restarts  # read whatever the count
    count = replica_count(cfg)
    if count == 1:
        return ReplicaPool([engine], in_process=True, lock=lock)

    def start_one(index: int) -> Any:
        return EngineReplica.options(**replica_options(placement)).remote(
            cfg, index, seed + index, engine_factory, device=placement.device(index)
        )

    return ReplicaPool.start(
        count,
        start_one,
        ready="node",
        max_restarts=max_restarts,
        start_timeout=cfg.actor_rollout_ref.nccl_timeout,
        load_timeout=cfg.async_training.generation_timeout,
        names=[f"rollout replica {i}" for i in range(count)],
        lock=lock,
    )


class ReplicaFailed(RuntimeError):
    """A replica died or missed its deadline during ``what``; ``replica`` is its index."""

    def __init__(self, replica: int, what: str, cause: str):
        super().__init__(f"rollout replica {replica} failed during {what}: {cause}")
        self.replica = replica


class EngineReplica:
    """One engine in its own process; ``generate`` and ``abort`` may run at once."""

    remote = actor_constructor(kind="remote", max_concurrency=2)
    options = actor_constructor(kind="options", max_concurrency=2)

    def __init__(
        self,
        config: Any,
        index: int,
        seed: int,
        engine_factory: Callable[[int], Any] | None = None,
        *,
        device: str = "cpu",
    ):
        self.engine = replica_engine(config, index, seed, engine_factory, device=device)
        self._aborted: set[int] = set()
        self._lock = threading.Lock()

    def generate(
        self, call_id: int, prompts: list[list[int]], kwargs: dict[str, Any]
    ) -> list[Generation]:
        def aborted() -> bool:
            return call_id in self._aborted

        try:
            return self.engine.generate(prompts, should_stop=aborted, **kwargs)
        finally:
            with self._lock:
                self._aborted.discard(call_id)

    def abort(self, call_id: int) -> bool:
        """Stop call ``call_id`` at its next token (also when it has not started yet)."""
        with self._lock:
            self._aborted.add(call_id)
        return True

    def load_weights(self, weights: Mapping[str, Any], version: int) -> int:
        self.engine.load_weights(weights, take=True)
        return version

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The node this replica runs on (the rollouter's ``replicas[i]["node"]``)."""
        return node_id()


class RemoteEngine:
    """A replica seen as an engine by the rollouter's lane: ``generate`` waits for the
    replica's answer, turning ``should_stop()`` into an abort and a death or a missed
    ``timeout_s`` into ``ReplicaFailed``."""

    _call_ids = itertools.count(1)

    def __init__(self, index: int, handle: Any, timeout_s: float):
        self.index = index
        self.handle = handle
        self.timeout_s = timeout_s

    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        should_stop: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> list[Generation]:
        call_id = next(self._call_ids)
        ref = self.handle.generate.remote(call_id, [list(p) for p in prompts], kwargs)
        deadline = time.monotonic() + self.timeout_s
        aborted = False
        while True:
            ready, _ = miniray.wait([ref], timeout=ABORT_POLL_S)
            if ready:
                return self._answer(ref, "generate")
            if not aborted and should_stop is not None and should_stop():
                self.handle.abort.remote(call_id)
                aborted = True
            if time.monotonic() >= deadline:
                raise ReplicaFailed(
                    self.index,
                    "generate",
                    f"no answer within async_training.generation_timeout={self.timeout_s:g}s",
                )

    def _answer(self, ref: Any, what: str) -> Any:
        try:
            return miniray.get(ref, timeout=self.timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            raise ReplicaFailed(self.index, what, f"{type(exc).__name__}: {exc}") from exc
