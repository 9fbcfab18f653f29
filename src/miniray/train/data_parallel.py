"""DataParallelTrainer: N replicas, each on 1/N of the data, kept in step by a parameter server.

    setup_workers:  parameter server <- create_parameter_server(sync_strategy, **strategy_kwargs)
                    worker i: load_data_shard(i, N, **train kwargs)      (if the worker has it)
                    worker 0's weights -> server.initialize -> every worker (same start, as DDP)
    train_epoch:    every worker: train_epoch(epoch)  (in parallel, one deadline)
                    every sync_interval epochs: server.sync_from_workers(workers)
                       get_weights() from all -> strategy -> set_weights() on all
                    with syncs_per_epoch=k > 1: train_epoch(epoch, part=i, num_parts=k) for
                       i = 0..k-1, a sync after each part (local SGD with short rounds)
    on_train_end:   one last sync if the last epoch did not end with one, so that training
                    always ends with a single model

With ``sync_interval=1``, plain SGD, one step per epoch and equal shards, this is exactly
synchronous data-parallel SGD on the full batch: the mean of the workers' ``w - lr * g_i`` is
``w - lr * mean(g_i)`` (tests/train/test_train_equivalence.py checks it against one process).

A sync that leaves a worker out (it died, timed out, raised, or sent NaN/Inf) stops training
with an error naming the worker: the parameter server may carry on without it, but a trainer
whose replicas silently disagree would report metrics of a model that does not exist.
"""

from __future__ import annotations

import os
from typing import Any

import miniray
from miniray.errors import GetTimeoutError, RayActorError
from miniray.ps import STRATEGIES, SyncResult, SyncStrategy, create_parameter_server
from miniray.train.errors import WorkerDiedError, WorkerTimeoutError
from miniray.train.trainer import (
    TRAINER_OPTIONS,
    BaseTrainer,
    aggregate_results,
    check_int,
    weighted_results,
)

PS_CHECKPOINT = "ps"


class DataParallelTrainer(BaseTrainer):
    """Data-parallel training through ``miniray.ps``; workers need train_epoch/get/set_weights.

    ``DataParallelTrainer(num_workers=4, sync_interval=1, sync_strategy='average',
    syncs_per_epoch=1, **strategy_kwargs)``: keyword arguments that are trainer options (``timeout_s``,
    ``log_dir``, ``checkpoint_dir``, ...; see ``TrainerConfig``) or ``initial_broadcast``
    configure the trainer, the rest go to ``create_parameter_server`` (e.g. ``momentum=0.9``).
    """

    required_worker_methods = ("train_epoch", "get_weights", "set_weights")

    def __init__(
        self,
        num_workers: int = 4,
        sync_interval: int = 1,
        sync_strategy: str | type[SyncStrategy] = "average",
        syncs_per_epoch: int = 1,
        **kwargs: Any,
    ):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in TRAINER_OPTIONS}
        # Start every replica from worker 0's weights (what DDP's broadcast does). Turn off
        # only when workers already start identical and the extra round trip matters.
        self.initial_broadcast = kwargs.pop("initial_broadcast", True)
        super().__init__(num_workers, **options)
        check_int("sync_interval", sync_interval, minimum=1)
        check_int("syncs_per_epoch", syncs_per_epoch, minimum=1)
        if syncs_per_epoch > 1 and sync_interval != 1:
            raise ValueError(
                f"syncs_per_epoch={syncs_per_epoch} needs sync_interval=1 (got "
                f"{sync_interval}): syncing within an epoch and skipping epochs contradict"
            )
        if not isinstance(self.initial_broadcast, bool):
            raise ValueError(f"initial_broadcast={self.initial_broadcast!r} must be True or False")
        if isinstance(sync_strategy, str):
            if sync_strategy not in STRATEGIES:
                raise ValueError(
                    f"sync_strategy={sync_strategy!r} is unknown; known strategies are "
                    f"{sorted(STRATEGIES)} (register your own in miniray.ps.strategies.STRATEGIES)"
                )
        elif not (isinstance(sync_strategy, type) and issubclass(sync_strategy, SyncStrategy)):
            raise ValueError(
                f"sync_strategy={sync_strategy!r} must be a strategy name such as 'average' or "
                "a SyncStrategy subclass"
            )
        self.sync_interval = sync_interval
        self.syncs_per_epoch = syncs_per_epoch
        self.sync_strategy = sync_strategy
        self.strategy_kwargs = kwargs
        self._worker_weights: dict[int, float] = {}
        self.last_sync: SyncResult | None = None

    # -- setup ---------------------------------------------------------------------------------
    def setup_workers(self, **kwargs: Any) -> None:
        """Start the parameter server, give each worker its shard, start replicas identical."""
        # The server's own waits end before the trainer's, so a hung worker is reported by the
        # server as 'timeout' (and named) instead of the whole sync call timing out.
        server_timeout = self.config.timeout_s / 3
        ps_kwargs: dict[str, Any] = {
            "sync_timeout_s": server_timeout,
            "push_timeout_s": server_timeout,
        }
        ps_kwargs.update(self.strategy_kwargs)
        self.param_server = create_parameter_server(self.sync_strategy, **ps_kwargs)
        self._actors.append(self.param_server)
        for worker_id, weight in sorted(self._worker_weights.items()):
            self._ps_call("set_worker_weight", worker_id, weight)
        if self.has_worker_method("load_data_shard"):
            shards = [(i, self.num_workers) for i in range(self.num_workers)]
            self.call_each("load_data_shard", shards, **kwargs)
        if self.initial_broadcast and self._resume_path is None:
            self.broadcast_weights(source=0)

    def broadcast_weights(self, source: int = 0) -> None:
        """Give every worker worker ``source``'s weights; they become the server's too."""
        (weights,) = self.gather("get_weights", [self.workers[source].get_weights.remote()])
        self._ps_call("initialize", weights)
        ref = miniray.put(weights)  # stored once, read by every worker
        self.call_workers("set_weights", ref)

    # -- the epoch -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int, **kwargs: Any) -> dict[str, Any]:
        """Every worker trains one epoch; every ``sync_interval`` epochs, a parameter sync.

        With ``syncs_per_epoch=k > 1`` the epoch runs in k parts, each followed by a sync:
        weights averaged once per epoch drift apart when each replica takes many steps (its own
        Adam moments, its own shard), and k short rounds bring the result close to DDP's
        per-step all-reduce at a fraction of the round trips.
        """
        if self.syncs_per_epoch == 1:
            result = self.aggregate(self.call_workers("train_epoch", epoch))
            result["synced"] = (epoch + 1) % self.sync_interval == 0
            if result["synced"]:
                result["ps_version"] = self.sync().version
            return result
        parts, version = [], None
        for part in range(self.syncs_per_epoch):
            results = self.call_workers(
                "train_epoch", epoch, part=part, num_parts=self.syncs_per_epoch
            )
            parts.append(self.aggregate(results))
            version = self.sync().version
        result = combine_parts(parts)
        result.update(synced=True, ps_version=version)
        return result

    def on_train_end(self, history: list[dict[str, Any]], **kwargs: Any) -> Any:
        if self.workers and self.epoch and self.epoch % self.sync_interval != 0:
            self.sync()
        return super().on_train_end(history, **kwargs)

    def sync(self) -> Any:
        """One parameter-server round now; raises if any worker was left out of it."""
        result: SyncResult = self._ps_call("sync_from_workers", self.workers)
        self.last_sync = result
        problems = {**result.excluded, **result.push_failed}
        if not problems and result.applied:
            return result
        worker_id = min(problems) if problems else 0
        why = problems.get(worker_id, result.reason)
        method = "set_weights" if worker_id in result.push_failed else "get_weights"
        where = self._where()
        if why.startswith("timeout"):
            raise WorkerTimeoutError(
                f"workers {sorted(problems)} did not answer {method}() in the parameter sync"
                f"{where}; raise timeout_s (the server waits timeout_s / 3)",
                worker_ids=sorted(problems),
                method=method,
                epoch=self._current_epoch,
            )
        if why.startswith("died"):
            raise WorkerDiedError(
                f"worker {worker_id} died in the parameter sync{where}: {why}",
                worker_id=worker_id,
                method=method,
                epoch=self._current_epoch,
            )
        raise RuntimeError(
            f"parameter sync{where} failed for workers {problems or result.reason}: training "
            "stops rather than go on with replicas that disagree (NaN/Inf weights usually mean "
            "the learning rate is too high)"
        )

    # -- the parameter server --------------------------------------------------------------
    def set_worker_weight(self, worker_id: int, weight: float) -> None:
        """Weight of a worker in 'weighted' syncs (e.g. its sample count); before or in training."""
        if isinstance(worker_id, bool) or not isinstance(worker_id, int):
            raise ValueError(f"set_worker_weight: worker_id={worker_id!r} must be an int")
        if not 0 <= worker_id < self.num_workers:
            raise ValueError(
                f"set_worker_weight: worker_id={worker_id} is out of range; this trainer has "
                f"workers 0..{self.num_workers - 1}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(
                f"set_worker_weight: weight={weight!r} for worker {worker_id} must be a number "
                ">= 0 (e.g. its number of samples)"
            )
        self._worker_weights[worker_id] = float(weight)
        if self.param_server is not None:
            self._ps_call("set_worker_weight", worker_id, float(weight))

    def get_sync_stats(self) -> dict[str, Any]:
        """The parameter server's statistics (version, num_syncs, strategy, timings...)."""
        if self.param_server is None:
            raise RuntimeError(
                "get_sync_stats() needs the parameter server, which train() (or setup()) starts"
            )
        return self._ps_call("get_stats")

    def _ps_call(self, method: str, *args: Any) -> Any:
        ref = getattr(self.param_server, method).remote(*args)
        try:
            return miniray.get(ref, timeout=self.config.timeout_s)
        except GetTimeoutError as exc:
            raise GetTimeoutError(
                f"the parameter server did not answer {method}(){self._where()} within "
                f"timeout_s={self.config.timeout_s:g}"
            ) from exc
        except RayActorError as exc:
            raise RayActorError(
                f"the parameter server died during {method}(){self._where()}: {exc}"
            ) from exc

    # -- checkpoints: the server's state goes along ---------------------------------------------
    def save_extra_state(self, path: str) -> None:
        self._ps_call("save_checkpoint", os.path.join(path, PS_CHECKPOINT))

    def load_extra_state(self, path: str, state: dict[str, Any]) -> None:
        self._ps_call("load_checkpoint", os.path.join(path, PS_CHECKPOINT))


def combine_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch's result from its parts: weighted by ``num_samples`` when every part has it."""
    if all(isinstance(p.get("num_samples"), (int, float)) for p in parts):
        if sum(p["num_samples"] for p in parts) > 0:
            return weighted_results(parts)
    return aggregate_results(parts, summed=frozenset({"num_samples"}))
