"""The ParameterServer actor and ``create_parameter_server``: global weights, rounds, pushes.

Synchronous round (``sync_from_workers``), all waits bounded by ``sync_timeout_s``:

    server --get_weights()/get_gradients()--> workers            (one deadline)
       | validate: structure (ValueError), NaN/Inf (worker left out, counted)
       | fewer than `quorum` usable workers -> round discarded, weights and version unchanged
       | sliced (elementwise strategy, one shard, model >= sliced_min_bytes):
       |     local backend, layout known: the workers write into shared input segments and
       |     reduce one slice each into a shared result segment (miniray.ps.spread);
       |     else the server reduces slice by slice itself (miniray.ps.sliced.reduce_alone);
       |     then strategy.apply / the server optimizer on the whole result
       | gather (everything else): strategy.step (weights) or reduce + server optimizer
       | version += 1
       +--new weights--> every worker that answered: set_weights(views of the result segment)
                         (spread), or set_weights(ref) of one put (every other path)

Asynchronous (SSP): ``pull() -> (version, weights)``; ``push(update, version)`` is admitted iff
its staleness ``current - version <= staleness_bound``; ``pushes_per_version`` admitted pushes
are reduced by the strategy and applied with the server optimizer, then the version advances.
In weights mode an update is a delta ``weights_pulled - weights_now`` (a pseudo-gradient, the
sign of a gradient), in gradients mode a gradient; either may be bf16/fp16.

Calls to the server run one at a time (an actor with max_concurrency=1), so no locks are needed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import miniray
from miniray.ps import checkpoint, gather, staleness, validation
from miniray.ps.config import (
    CONFIG_FIELDS,
    ServerConfig,
    check_aggregation,
    check_shardable,
)
from miniray.ps.reducers import mean, per_parameter
from miniray.ps.results import PushResult, SyncResult
from miniray.ps.rounds import Round, check_after, exclude_nonfinite, nbytes, worker_handles
from miniray.ps.shard import ParameterShard, RemoteShards
from miniray.ps.sliced_rounds import SlicedRounds
from miniray.ps.strategies import SyncStrategy, resolve_strategy

__all__ = ["CONFIG_FIELDS", "ParameterServer", "ServerConfig", "create_parameter_server"]

WeightList = list[torch.Tensor]


class ParameterServer:
    """Holds the global weights and synchronizes workers (run it as an actor).

    Workers are addressed by their position in the list given to ``sync_from_workers``; that
    position is the ``worker_id`` of ``set_worker_weight`` and of the stats.
    """

    def __init__(
        self,
        strategy: str | type[SyncStrategy] = "average",
        strategy_kwargs: dict[str, Any] | None = None,
        config: ServerConfig | None = None,
    ):
        self.config = config or ServerConfig()
        self.strategy_cls = resolve_strategy(strategy)
        self.strategy_kwargs = dict(strategy_kwargs or {})
        self.weights: WeightList | None = None
        self.version = 0
        self.worker_weights: dict[int, float] = {}
        self.pending: list[tuple[int, WeightList, float]] = []
        self.counters = {
            "num_syncs": 0,
            "num_discarded_rounds": 0,
            "num_excluded_timeout": 0,
            "num_excluded_died": 0,
            "num_excluded_error": 0,
            "num_excluded_nonfinite": 0,
            "num_push_failures": 0,
            "num_pushes_applied": 0,
            "num_pushes_buffered": 0,
            "num_pushes_rejected_stale": 0,
            "num_pushes_rejected_nonfinite": 0,
            "num_reducer_failures": 0,
        }
        self.last_round: SyncResult | None = None
        self.local_shard: ParameterShard | None = None
        self.remote: RemoteShards | None = None
        self.sliced: SlicedRounds | None = None
        config = self.config
        if config.num_shards == 1:
            self.local_shard = ParameterShard(
                self.strategy_cls, self.strategy_kwargs, config.server_opt
            )
            check_aggregation(self.local_shard.strategy, config)
            self.sliced = SlicedRounds(
                self.local_shard, self.strategy_cls, self.strategy_kwargs, config
            )
        else:
            check_shardable(self.strategy_cls, config.num_shards)
            self.remote = RemoteShards(
                self.strategy_cls,
                self.strategy_kwargs,
                config.server_opt,
                config.num_shards,
                config.sync_timeout_s,
            )

    # -- shards --------------------------------------------------------------------------------
    def _set_global(self, weights: Sequence[torch.Tensor]) -> None:
        """Adopt ``weights`` as global weights on every shard (assigning shards the first time)."""
        weights = [t.detach().clone() for t in weights]
        if self.local_shard is not None:
            self.local_shard.set_weights(weights)
        else:
            assert self.remote is not None
            self.remote.ensure_layout(weights)
            self.remote.call("set_weights", weights)
        self.weights = weights

    def _step_round(self, worker_ids: list[int], lists: list[Any]) -> WeightList:
        if self.local_shard is not None:
            return self.local_shard.step_round(worker_ids, *lists)
        assert self.remote is not None
        return self.remote.assemble(self.remote.call("step_round", worker_ids, *lists))

    def _apply_updates(
        self, worker_ids: list[int], scales: list[float], lists: list[Any]
    ) -> WeightList:
        if self.local_shard is not None:
            return self.local_shard.apply_updates(worker_ids, scales, *lists)
        assert self.remote is not None
        return self.remote.assemble(self.remote.call("apply_updates", worker_ids, scales, *lists))

    # -- synchronous rounds --------------------------------------------------------------------
    def sync_from_workers(self, workers: Sequence[Any], timeout: float | None = None) -> SyncResult:
        """One round: collect, validate, aggregate, bump the version, push to workers.

        ``workers`` is a list of actor handles (worker id = position) or a dict id -> handle.
        ``timeout`` overrides ``sync_timeout_s`` for this round's collection.
        """
        rnd = Round(worker_handles(workers, self.config.quorum, timeout))
        deadline = rnd.start + (self.config.sync_timeout_s if timeout is None else timeout)
        if self.config.mode == "gradients" and self.weights is None:
            self._initialize_from(rnd.handles, deadline)
        method = "get_weights" if self.config.mode == "weights" else "get_gradients"
        rnd.clock = time.monotonic()  # the phases start after any initialization
        if self.sliced is not None and self.sliced.spreads(self.weights):
            assert self.weights is not None
            new, push = self.sliced.spread_round(rnd, method, deadline, self.weights)
            return self._finish_round(rnd, new, "sliced", push or self._push_by_put)
        values, refs, excluded = gather.call_all(rnd.handles, method, deadline)
        rnd.answered, rnd.excluded = sorted(values), excluded
        rnd.lap("gather")
        validation.check_round(values, method, self.weights)
        rnd.bytes_in = sum(nbytes(v) for v in values.values())
        if self.sliced is not None and self.sliced.alone_applies(values):
            rnd.lap("validate")  # NaN/Inf checks run inside the sliced reduction, chunk by chunk
            new = self.sliced.alone(rnd, values, self.weights)
            rnd.lap("aggregate")
            return self._finish_round(rnd, new, "sliced", self._push_by_put)
        late_check = check_after(self.strategy_cls, self.config.mode)
        if not late_check:
            exclude_nonfinite(values, rnd.excluded)
        rnd.lap("validate")
        new = self._aggregate(values, refs, rnd.excluded)
        if late_check and new is not None and validation.first_nonfinite(new) is not None:
            exclude_nonfinite(values, rnd.excluded)
            new = self._aggregate(values, refs, rnd.excluded)
            if new is None and self.weights is not None:
                self._set_global(self.weights)  # the shards hold the NaN result: undo it
        rnd.lap("aggregate")
        return self._finish_round(rnd, new, "gather", self._push_by_put)

    def _finish_round(
        self,
        rnd: Round,
        new: WeightList | None,
        aggregation: str,
        push: Callable[[dict[int, Any], WeightList], dict[int, str]],
    ) -> SyncResult:
        """Count, commit (version += 1) and ``push`` ``new``, or record the discarded round."""
        for why in rnd.excluded.values():
            self.counters[f"num_excluded_{why.split(':')[0]}"] += 1
        self.counters["num_reducer_failures"] += len(rnd.reduce_failed)
        common = SyncResult(
            applied=False,
            version=self.version,
            included=tuple(rnd.included),
            excluded=rnd.excluded,
            timings=rnd.timings,
            bytes_in=rnd.bytes_in,
            aggregation=aggregation,
            reduce_failed=rnd.reduce_failed,
        )
        if new is None:
            self.counters["num_discarded_rounds"] += 1
            self.last_round = dataclasses.replace(
                common,
                reason=(
                    f"only {len(rnd.included)} usable workers, quorum is {self.config.quorum}; "
                    "round discarded, global weights unchanged"
                ),
                duration_s=time.monotonic() - rnd.start,
            )
            return self.last_round
        if self.local_shard is not None:
            self.local_shard.weights = new
        self.weights = new
        self.version += 1
        self.counters["num_syncs"] += 1
        push_failed = push(rnd.answered_handles(), new)
        self.counters["num_push_failures"] += len(push_failed)
        rnd.lap("push")
        self.last_round = dataclasses.replace(
            common,
            applied=True,
            version=self.version,
            duration_s=time.monotonic() - rnd.start,
            push_failed=push_failed,
            bytes_out=nbytes(new),
        )
        return self.last_round

    def _push_by_put(self, targets: dict[int, Any], new: WeightList) -> dict[int, str]:
        """Store the new weights once (``put``) and let every worker load them from that ref
        (on the local backend, one shared-memory segment for all of them)."""
        ref = miniray.put(new)
        deadline = time.monotonic() + self.config.push_timeout_s
        _, _, failed = gather.call_all(targets, "set_weights", deadline, ref)
        return failed

    def close(self) -> None:
        """Remove the sliced path's shared segments now (the runtime would at shutdown)."""
        if self.sliced is not None:
            self.sliced.close()

    def _aggregate(
        self, values: dict[int, Any], refs: dict[int, Any], excluded: dict[int, str]
    ) -> WeightList | None:
        """The round's new global weights, or None below quorum. Does not commit them."""
        included = sorted(w for w in values if w not in excluded)
        if len(included) < self.config.quorum:
            return None
        # Remote shards read the workers' results straight from the refs (shared memory on the
        # local backend); the local shard uses the values already fetched.
        lists = [refs[w] if self.remote is not None else values[w] for w in included]
        if self.remote is not None:
            self.remote.ensure_layout(values[included[0]])
        if self.config.mode == "weights":
            return self._step_round(included, lists)
        return self._apply_updates(included, [1.0] * len(included), lists)

    def _initialize_from(self, handles: dict[int, Any], deadline: float) -> None:
        """Gradients mode needs starting weights: the mean of what the workers hold now."""
        values, _, excluded = gather.call_all(handles, "get_weights", deadline)
        validation.check_round(values, "get_weights", self.weights)
        usable = [
            values[w] for w in sorted(values) if validation.first_nonfinite(values[w]) is None
        ]
        if not usable:
            raise ValueError(
                f"gradients mode: no worker returned finite initial weights ({excluded}); "
                "call initialize(weights) first"
            )
        self._set_global(per_parameter(usable, mean))

    # -- weights in and out ----------------------------------------------------------------
    def pull_weights(self) -> WeightList:
        """The global weights (a list of tensors in parameter order)."""
        if self.weights is None:
            raise ValueError(
                "pull_weights: the server has no global weights yet; run sync_from_workers() "
                "or initialize(weights) first (get_stats()['initialized'] tells)"
            )
        return self.weights

    def pull(self) -> tuple[int, WeightList]:
        """``(version, weights)``: what an asynchronous worker starts from."""
        return self.version, self.pull_weights()

    def initialize(self, weights: Sequence[torch.Tensor]) -> int:
        """Set the global weights (e.g. a freshly built model's) without a round; keeps version."""
        validation.check_weight_list(weights, -1, "initialize(weights)")
        if self.weights is not None:
            validation.check_same_structure(
                self.weights, weights, -1, reference_name="the global weights"
            )
        self._set_global(weights)
        return self.version

    def set_worker_weight(self, worker_id: int, weight: float) -> None:
        """Weight of a worker in 'weighted' aggregation (e.g. its number of samples)."""
        if isinstance(worker_id, bool) or not isinstance(worker_id, int):
            raise ValueError(f"set_worker_weight: worker_id={worker_id!r} must be an int")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (weight >= 0 and weight != float("inf"))
        ):
            raise ValueError(
                f"set_worker_weight: weight={weight!r} for worker {worker_id} must be a finite "
                "number >= 0"
            )
        self.worker_weights[worker_id] = float(weight)
        if self.local_shard is not None:
            self.local_shard.set_worker_weight(worker_id, float(weight))
        else:
            assert self.remote is not None
            self.remote.call("set_worker_weight", worker_id, float(weight))

    # -- asynchronous push / pull (SSP) --------------------------------------------------------
    def push(self, update: Sequence[torch.Tensor], version: int, worker_id: int = 0) -> PushResult:
        """Offer an update computed from ``version``; see ``PushResult`` for the outcomes."""
        if self.weights is None:
            raise ValueError(
                "push: the server has no global weights yet; initialize(weights) first"
            )
        age = staleness.staleness(self.version, version)
        bound = self.config.staleness_bound
        if not staleness.admits(age, bound):
            self.counters["num_pushes_rejected_stale"] += 1
            return PushResult(
                "rejected_stale",
                self.version,
                age,
                bound,
                f"update from version {version} is {age} versions old; the bound is {bound}. "
                "pull() the current weights and recompute",
            )
        validation.check_weight_list(update, worker_id, "push(update)")
        validation.check_same_structure(
            self.weights, update, worker_id, reference_name="the global weights", check_dtype=False
        )
        bad = validation.first_nonfinite(update)
        if bad is not None:
            self.counters["num_pushes_rejected_nonfinite"] += 1
            return PushResult(
                "rejected_nonfinite", self.version, age, bound, f"parameter {bad} holds NaN/Inf"
            )
        scale = staleness.damping(age, self.config.staleness_damping)
        self.pending.append((worker_id, list(update), scale))
        if len(self.pending) < self.config.pushes_per_version:
            self.counters["num_pushes_buffered"] += 1
            return PushResult("buffered", self.version, age, bound)
        ids = [p[0] for p in self.pending]
        scales = [p[2] for p in self.pending]
        lists = [p[1] for p in self.pending]
        self.pending = []
        self.weights = self._apply_updates(ids, scales, lists)
        self.version += 1
        self.counters["num_pushes_applied"] += 1
        return PushResult("applied", self.version, age, bound)

    # -- stats and checkpoints -------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "version": self.version,
            "strategy": self.strategy_cls.__name__,
            "initialized": self.weights is not None,
            "mode": self.config.mode,
            "num_shards": self.config.num_shards,
            "num_params": 0 if self.weights is None else len(self.weights),
            "num_bytes": 0 if self.weights is None else nbytes(self.weights),
            "worker_weights": dict(self.worker_weights),
            "staleness_bound": self.config.staleness_bound,
            "pending_pushes": len(self.pending),
            "quorum": self.config.quorum,
            **self.counters,
        }
        if self.last_round is not None:
            stats["last_round"] = dataclasses.asdict(self.last_round)
        return stats

    def save_checkpoint(self, path: str) -> str:
        """Write global weights, strategy/optimizer state, version and counters to ``path``."""
        tensors: dict[str, torch.Tensor] = {}
        if self.weights is not None:
            tensors.update({f"weight.{i}": t for i, t in enumerate(self.weights)})
        shard_states = (
            [self.local_shard.state_dict()]
            if self.local_shard is not None
            else self.remote.call("state_dict")  # type: ignore[union-attr]
        )
        for s, state in enumerate(shard_states):
            tensors.update({f"shard{s}.{k}": v for k, v in state.items()})
        for j, (_, update, _) in enumerate(self.pending):
            tensors.update({f"pending{j}.{i}": t for i, t in enumerate(update)})
        checkpoint.save(
            path,
            tensors,
            {
                "version": self.version,
                "strategy": self.strategy_cls.__name__,
                "num_shards": self.config.num_shards,
                "shard_indices": None if self.remote is None else self.remote.indices,
                "worker_weights": {str(k): v for k, v in self.worker_weights.items()},
                "pending": [[wid, scale] for wid, _, scale in self.pending],
                "counters": self.counters,
            },
        )
        return path

    def load_checkpoint(self, path: str) -> int:
        """Restore a checkpoint written by a server with the same strategy and shard count."""
        tensors, state = checkpoint.load(path)
        if state["strategy"] != self.strategy_cls.__name__:
            raise ValueError(
                f"load_checkpoint: {path!r} was written by strategy {state['strategy']!r}, "
                f"this server runs {self.strategy_cls.__name__!r}"
            )
        if state["num_shards"] != self.config.num_shards:
            raise ValueError(
                f"load_checkpoint: {path!r} has num_shards={state['num_shards']}, this server "
                f"has num_shards={self.config.num_shards}"
            )
        weights = checkpoint.weight_list(tensors)
        if self.remote is not None and state["shard_indices"]:
            self.remote.set_layout(state["shard_indices"])
        if weights is not None:
            self._set_global(weights)
        shard_states = [
            checkpoint.split_prefix(tensors, f"shard{s}") for s in range(self.config.num_shards)
        ]
        if self.local_shard is not None:
            self.local_shard.load_state_dict(shard_states[0])
        else:
            assert self.remote is not None
            self.remote.call_each("load_state_dict", [(s,) for s in shard_states])
        self.version = int(state["version"])
        self.counters.update(state["counters"])
        for wid, w in state["worker_weights"].items():
            self.set_worker_weight(int(wid), w)
        self.pending = []
        for j, (wid, scale) in enumerate(state["pending"]):
            update = checkpoint.split_prefix(tensors, f"pending{j}")
            self.pending.append((wid, [update[str(i)] for i in range(len(update))], scale))
        return self.version


def create_parameter_server(
    strategy: str | type[SyncStrategy] = "average",
    *,
    name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Start a ParameterServer actor and return its handle.

    ``kwargs`` that are ``ServerConfig`` fields (``mode``, ``sync_timeout_s``, ``quorum``,
    ``staleness_bound``, ``num_shards``, ...) configure the server; the rest go to the strategy,
    e.g. ``create_parameter_server('momentum', momentum=0.9)``. Bad names and values raise here,
    in the caller, not later inside the actor.
    """
    strategy_cls = resolve_strategy(strategy)
    config = ServerConfig(**{k: v for k, v in kwargs.items() if k in CONFIG_FIELDS})
    check_shardable(strategy_cls, config.num_shards)
    strategy_kwargs = {k: v for k, v in kwargs.items() if k not in CONFIG_FIELDS}
    try:
        probe = strategy_cls(**strategy_kwargs)  # validate now, not on first use in the actor
    except TypeError as exc:
        raise ValueError(
            f"strategy {strategy_cls.__name__} does not accept {sorted(strategy_kwargs)}: {exc}; "
            f"server options are {sorted(CONFIG_FIELDS)}"
        ) from exc
    check_aggregation(probe, config)
    actor = ParameterServerActor if name is None else ParameterServerActor.options(name=name)
    # Pass the class, not the name: a strategy registered in the driver's STRATEGIES does not
    # exist in the registry of a freshly started server process.
    return actor.remote(strategy_cls, strategy_kwargs, config)


# The actor class; ``ParameterServer`` itself stays a plain class that tests can drive directly.
ParameterServerActor = miniray.remote(ParameterServer)
