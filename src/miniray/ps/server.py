"""The ParameterServer actor and ``create_parameter_server``: global weights, rounds, pushes.

Synchronous round (``sync_from_workers``), all waits bounded by ``sync_timeout_s``:

    server --get_weights()/get_gradients()--> workers      (gather.call_all, one deadline)
       | validate: structure (ValueError), NaN/Inf (worker left out, counted)
       | fewer than `quorum` usable workers -> round discarded, weights and version unchanged
       | sliced (elementwise strategy, one shard, local backend, model >= sliced_min_bytes):
       |     P processes reduce one slice each into one shared segment (miniray.ps.sliced),
       |     then strategy.apply / the server optimizer on the whole result
       | gather (everything else): strategy.step (weights) or reduce + server optimizer
       | version += 1
       +--put(new weights) once--> ref --set_weights(ref)--> every worker that answered

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import miniray
from miniray.ps import checkpoint, gather, sliced, staleness, validation
from miniray.ps.outer import OuterSGD
from miniray.ps.reducers import accumulation_dtype
from miniray.ps.results import PushResult, SyncResult
from miniray.ps.shard import ParameterShard, assign
from miniray.ps.strategies import SyncStrategy, resolve_strategy, sliceable

MODES = ("weights", "gradients")
AGGREGATIONS = ("auto", "sliced", "gather")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How the server runs rounds and pushes (the strategy's own options are separate)."""

    mode: str = "weights"  # 'weights': workers' weights are aggregated; 'gradients': their grads
    sync_timeout_s: float = 60.0  # collecting from workers; late workers are left out
    push_timeout_s: float = 60.0  # delivering new weights back to workers
    quorum: int = 1  # fewer usable workers than this and the round is discarded
    staleness_bound: int | None = None  # SSP bound for push(); None = unbounded
    pushes_per_version: int = 1  # admitted pushes combined into one version step
    staleness_damping: bool = False  # scale a push by 1/(1 + staleness)
    lr: float | None = None  # server optimizer for gradients and pushes; weights mode: 1.0
    server_momentum: float = 0.0
    nesterov: bool = False
    num_shards: int = 1
    # 'auto': sliced reduction when it applies (see the module docstring), else gather;
    # 'sliced': whenever the strategy allows (on backends without shared segments the server
    # then reduces alone); 'gather': always the server alone, whole models (the old path).
    aggregation: str = "auto"
    reduce_processes: int | None = None  # slices of a sliced round; None: min(workers, CPUs)
    sliced_min_bytes: int = 8 * 2**20  # 'auto' gathers smaller models (helpers cost a process)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; known modes are {list(MODES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation={self.aggregation!r} is unknown; known: {list(AGGREGATIONS)}"
            )
        if self.aggregation == "sliced" and self.num_shards > 1:
            raise ValueError(
                f"aggregation='sliced' works on one shard, not num_shards={self.num_shards}; "
                "shards already spread the arithmetic by parameter"
            )
        processes = self.reduce_processes
        if processes is not None and (
            isinstance(processes, bool) or not isinstance(processes, int) or processes < 1
        ):
            raise ValueError(f"reduce_processes={processes!r} must be None or an integer >= 1")
        low_bytes = self.sliced_min_bytes
        if isinstance(low_bytes, bool) or not isinstance(low_bytes, int) or low_bytes < 0:
            raise ValueError(f"sliced_min_bytes={low_bytes!r} must be an integer >= 0")
        for name in ("sync_timeout_s", "push_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a number > 0 (seconds)")
        for name, low in (("quorum", 1), ("pushes_per_version", 1), ("num_shards", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        bound = self.staleness_bound
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, int) or bound < 0
        ):
            raise ValueError(f"staleness_bound={bound!r} must be None or an integer >= 0")
        if self.mode == "gradients" and self.lr is None:
            raise ValueError("mode='gradients' needs the server learning rate lr=... (e.g. 0.1)")
        OuterSGD(
            **self.server_opt
        )  # validates lr / server_momentum / nesterov here, not in the actor

    @property
    def server_opt(self) -> dict[str, Any]:
        lr = 1.0 if self.lr is None else self.lr
        return {"lr": lr, "momentum": self.server_momentum, "nesterov": self.nesterov}


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerConfig))


class _RemoteShards:
    """k shard actors behind the same calls as one local ``ParameterShard``."""

    def __init__(self, handles: list[Any], timeout_s: float):
        self.handles = handles
        self.timeout_s = timeout_s
        self.indices: list[list[int]] = []

    def call(self, method: str, *args: Any) -> list[Any]:
        refs = [getattr(h, method).remote(*args) for h in self.handles]
        return miniray.get(refs, timeout=self.timeout_s)

    def call_each(self, method: str, per_shard_args: list[tuple]) -> list[Any]:
        refs = [getattr(h, method).remote(*a) for h, a in zip(self.handles, per_shard_args)]
        return miniray.get(refs, timeout=self.timeout_s)


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
        self.weights: list[torch.Tensor] | None = None
        self.version = 0
        self.worker_weights: dict[int, float] = {}
        self.pending: list[tuple[int, list[torch.Tensor], float]] = []
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
        self.remote: _RemoteShards | None = None
        self.sliced: sliced.SlicedReduction | None = None
        if self.config.num_shards == 1:
            self.local_shard = ParameterShard(
                self.strategy_cls, self.strategy_kwargs, self.config.server_opt
            )
            _check_aggregation(self.local_shard.strategy, self.config)
            self.sliced = sliced.SlicedReduction(
                self.strategy_cls,
                self.strategy_kwargs,
                self.config.reduce_processes,
                self.config.sync_timeout_s,
            )
        else:
            _check_shardable(self.strategy_cls, self.config.num_shards)
            shard_actor = miniray.remote(ParameterShard)
            self.remote = _RemoteShards(
                [
                    shard_actor.remote(
                        self.strategy_cls, self.strategy_kwargs, self.config.server_opt
                    )
                    for _ in range(self.config.num_shards)
                ],
                self.config.sync_timeout_s,
            )

    # -- shards --------------------------------------------------------------------------------
    def _assemble(self, parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        assert self.remote is not None
        out: list[Any] = [None] * sum(len(p) for p in parts)
        for indices, part in zip(self.remote.indices, parts):
            for i, t in zip(indices, part):
                out[i] = t
        return out

    def _set_global(self, weights: Sequence[torch.Tensor]) -> None:
        """Adopt ``weights`` as global weights on every shard (assigning shards the first time)."""
        weights = [t.detach().clone() for t in weights]
        if self.local_shard is not None:
            self.local_shard.set_weights(weights)
        else:
            assert self.remote is not None
            self._ensure_layout(weights)
            self.remote.call("set_weights", weights)
        self.weights = weights

    def _ensure_layout(self, sample: Sequence[torch.Tensor]) -> None:
        """Assign parameters to remote shards the first time their sizes are known."""
        if self.remote is None or self.remote.indices:
            return
        sizes = [t.numel() * t.element_size() for t in sample]
        self.remote.indices = assign(sizes, self.config.num_shards)
        self.remote.call_each("set_indices", [(ix,) for ix in self.remote.indices])

    def _step_round(self, worker_ids: list[int], lists: list[Any]) -> list[torch.Tensor]:
        if self.local_shard is not None:
            return self.local_shard.step_round(worker_ids, *lists)
        assert self.remote is not None
        return self._assemble(self.remote.call("step_round", worker_ids, *lists))

    def _apply_updates(
        self, worker_ids: list[int], scales: list[float], lists: list[Any]
    ) -> list[torch.Tensor]:
        if self.local_shard is not None:
            return self.local_shard.apply_updates(worker_ids, scales, *lists)
        assert self.remote is not None
        return self._assemble(self.remote.call("apply_updates", worker_ids, scales, *lists))

    # -- synchronous rounds --------------------------------------------------------------------
    def sync_from_workers(self, workers: Sequence[Any], timeout: float | None = None) -> SyncResult:
        """One round: collect, validate, aggregate, bump the version, push to workers.

        ``workers`` is a list of actor handles (worker id = position) or a dict id -> handle.
        ``timeout`` overrides ``sync_timeout_s`` for this round's collection.
        """
        if isinstance(workers, dict):
            handles = dict(workers)
        elif isinstance(workers, (list, tuple)):
            handles = dict(enumerate(workers))
        else:
            raise ValueError(
                f"sync_from_workers: workers must be a list of actor handles, got {type(workers).__name__}"
            )
        if not handles:
            raise ValueError("sync_from_workers: workers is empty; pass at least one actor handle")
        if self.config.quorum > len(handles):
            raise ValueError(
                f"sync_from_workers: quorum={self.config.quorum} but only {len(handles)} workers "
                "were given; no round could ever be applied"
            )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(f"sync_from_workers: timeout={timeout!r} must be None or a number > 0")
        start = time.monotonic()
        deadline = start + (self.config.sync_timeout_s if timeout is None else timeout)
        if self.config.mode == "gradients" and self.weights is None:
            self._initialize_from(handles, deadline)
        method = "get_weights" if self.config.mode == "weights" else "get_gradients"
        timings: dict[str, float] = {}
        clock = time.monotonic()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.monotonic()
            timings[phase] = now - clock
            clock = now

        values, refs, excluded = gather.call_all(handles, method, deadline)
        lap("gather")
        self._validate(values, method)
        if self._use_sliced(values):
            lap("validate")  # NaN/Inf checks run inside the sliced reduction, chunk by chunk
            new, reduce_failed = self._sliced_aggregate(values, refs, excluded)
            lap("aggregate")
            return self._finish_round(
                handles, values, excluded, new, start, timings, clock, "sliced", reduce_failed
            )
        # For a mean, NaN/Inf in any input shows up in the output, so checking the one aggregate
        # replaces scanning all K inputs (a full extra pass over K x model bytes). Stateful
        # strategies must not see a NaN at all (it would enter their buffers): they scan first.
        check_after = self.config.mode == "weights" and getattr(
            self.strategy_cls, "propagates_nonfinite", False
        )
        if not check_after:
            self._exclude_nonfinite(values, excluded)
        lap("validate")
        new = self._aggregate(values, refs, excluded)
        if check_after and new is not None and validation.first_nonfinite(new) is not None:
            self._exclude_nonfinite(values, excluded)
            new = self._aggregate(values, refs, excluded)
            if new is None and self.weights is not None:
                self._set_global(self.weights)  # the shards hold the NaN result: undo it
        lap("aggregate")
        return self._finish_round(handles, values, excluded, new, start, timings, clock, "gather")

    def _finish_round(
        self,
        handles: dict[int, Any],
        values: dict[int, Any],
        excluded: dict[int, str],
        new: list[torch.Tensor] | None,
        start: float,
        timings: dict[str, float],
        clock: float,
        aggregation: str,
        reduce_failed: dict[int, str] | None = None,
    ) -> SyncResult:
        """Count, commit (version += 1) and push ``new``, or record the discarded round."""
        self._count_exclusions(excluded)
        included = tuple(sorted(w for w in values if w not in excluded))
        bytes_in = sum(_nbytes(values[w]) for w in values)
        reduce_failed = dict(reduce_failed or {})
        if new is None:
            self.counters["num_discarded_rounds"] += 1
            result = SyncResult(
                applied=False,
                version=self.version,
                included=included,
                excluded=excluded,
                reason=(
                    f"only {len(included)} usable workers, quorum is {self.config.quorum}; "
                    "round discarded, global weights unchanged"
                ),
                duration_s=time.monotonic() - start,
                timings=timings,
                bytes_in=bytes_in,
                aggregation=aggregation,
                reduce_failed=reduce_failed,
            )
            self.last_round = result
            return result
        ref = None
        if aggregation == "sliced":
            # `new` may be views of the shared result segment, which the next round rewrites:
            # the one `put` copies it, and the global weights become that object's own mapping.
            ref = miniray.put(new)
            new = miniray.get(ref, timeout=self.config.push_timeout_s)
            assert self.local_shard is not None
            self.local_shard.weights = new
        self.weights = new
        self.version += 1
        self.counters["num_syncs"] += 1
        push_failed = self._push_to([handles[w] for w in sorted(values)], sorted(values), ref)
        timings["push"] = time.monotonic() - clock
        result = SyncResult(
            applied=True,
            version=self.version,
            included=included,
            excluded=excluded,
            duration_s=time.monotonic() - start,
            push_failed=push_failed,
            timings=timings,
            bytes_in=bytes_in,
            bytes_out=_nbytes(new),
            aggregation=aggregation,
            reduce_failed=reduce_failed,
        )
        self.last_round = result
        return result

    # -- the sliced path -------------------------------------------------------------------
    def _use_sliced(self, values: dict[int, Any]) -> bool:
        config = self.config
        if self.local_shard is None or config.aggregation == "gather" or not values:
            return False
        if not sliceable(self.local_shard.strategy):
            return False
        if config.aggregation == "sliced":
            return True
        model_bytes = _nbytes(next(iter(values.values())))
        return sliced.session_id() is not None and model_bytes >= config.sliced_min_bytes

    def _sliced_aggregate(
        self, values: dict[int, Any], refs: dict[int, Any], excluded: dict[int, str]
    ) -> tuple[list[torch.Tensor] | None, dict[int, str]]:
        """``(new global weights or None below quorum, failed reducers)``; commits nothing.

        Workers found holding NaN/Inf are excluded and the reduction runs again without them;
        the strategy's state (``apply``) only ever sees a finite round.
        """
        shard, reduction = self.local_shard, self.sliced
        assert shard is not None and reduction is not None
        included = sorted(w for w in values if w not in excluded)
        failed: dict[int, str] = {}
        while True:
            if len(included) < self.config.quorum:
                return None, failed
            run = self._sliced_run(values, refs, included)
            failed.update(run.failed)
            self.counters["num_reducer_failures"] += len(run.failed)
            if not run.nonfinite:
                break
            for wid in sorted(run.nonfinite):
                excluded[wid] = f"nonfinite: parameter {run.nonfinite[wid]}"
            included = [w for w in included if w not in run.nonfinite]
        if self.config.mode == "weights":
            return shard.strategy.apply(shard.weights, run.reduced), failed
        assert shard.weights is not None
        return shard.server_opt.step(shard.weights, run.reduced), failed

    def _sliced_run(
        self, values: dict[int, Any], refs: dict[int, Any], included: list[int]
    ) -> sliced.RunResult:
        shard, reduction = self.local_shard, self.sliced
        assert shard is not None and reduction is not None
        sample = values[included[0]]
        if self.config.mode == "weights":
            dtypes = [t.dtype for t in sample]
            upcast: list[torch.dtype | None] = [None] * len(sample)
        else:  # gradients are reduced in the global weights' accumulation dtype
            assert shard.weights is not None
            upcast = [
                accumulation_dtype(g.dtype) if torch.is_floating_point(g) else None
                for g in shard.weights
            ]
            dtypes = [t.dtype if u is None else u for u, t in zip(upcast, sample)]
        layout = sliced.Layout.of([tuple(t.shape) for t in sample], dtypes)
        check_after = self.config.mode == "weights" and getattr(
            self.strategy_cls, "propagates_nonfinite", False
        )
        return reduction.run(
            shard.strategy,
            layout,
            included,
            [values[w] for w in included],
            [refs[w] for w in included],
            upcast=upcast,
            check_inputs=not check_after,
        )

    def close(self) -> None:
        """Stop the sliced path's helper processes and remove its shared result segment.

        Optional: the runtime removes the segment at shutdown, or when this process dies.
        """
        if self.sliced is not None:
            self.sliced.close()

    def _exclude_nonfinite(self, values: dict[int, Any], excluded: dict[int, str]) -> None:
        for wid in sorted(values):
            bad = validation.first_nonfinite(values[wid])
            if bad is not None:
                excluded[wid] = f"nonfinite: parameter {bad}"

    def _aggregate(
        self, values: dict[int, Any], refs: dict[int, Any], excluded: dict[int, str]
    ) -> list[torch.Tensor] | None:
        """The round's new global weights, or None below quorum. Does not commit them."""
        included = sorted(w for w in values if w not in excluded)
        if len(included) < self.config.quorum:
            return None
        # Remote shards read the workers' results straight from the refs (shared memory on the
        # local backend); the local shard uses the values already fetched.
        lists = [refs[w] if self.remote is not None else values[w] for w in included]
        self._ensure_layout(values[included[0]])
        if self.config.mode == "weights":
            return self._step_round(included, lists)
        return self._apply_updates(included, [1.0] * len(included), lists)

    def _initialize_from(self, handles: dict[int, Any], deadline: float) -> None:
        """Gradients mode needs starting weights: the mean of what the workers hold now."""
        values, _, excluded = gather.call_all(handles, "get_weights", deadline)
        self._validate(values, "get_weights")
        usable = [
            values[w] for w in sorted(values) if validation.first_nonfinite(values[w]) is None
        ]
        if not usable:
            raise ValueError(
                f"gradients mode: no worker returned finite initial weights ({excluded}); "
                "call initialize(weights) first"
            )
        from miniray.ps.reducers import mean, per_parameter

        self._set_global(per_parameter(usable, mean))

    def _validate(self, values: dict[int, Any], method: str) -> None:
        """Every worker must match the global weights (or the first worker, before any)."""
        for wid in sorted(values):
            validation.check_weight_list(values[wid], wid, f"{method}()")
        if self.weights is not None:
            reference, name = self.weights, "the global weights"
        elif values:
            first = min(values)
            reference, name = values[first], f"worker {first}"
        else:
            return
        for wid in sorted(values):
            validation.check_same_structure(reference, values[wid], wid, reference_name=name)

    def _count_exclusions(self, excluded: dict[int, str]) -> None:
        for why in excluded.values():
            kind = why.split(":")[0]
            self.counters[f"num_excluded_{kind}"] += 1

    def _push_to(self, targets: list[Any], ids: list[int], ref: Any = None) -> dict[int, str]:
        """Ship the new weights once (``put``, unless ``ref`` holds them already) and let every
        worker load them from that ref."""
        assert self.weights is not None
        if ref is None:
            ref = miniray.put(self.weights)
        deadline = time.monotonic() + self.config.push_timeout_s
        _, _, failed = gather.call_all(dict(zip(ids, targets)), "set_weights", deadline, ref)
        self.counters["num_push_failures"] += len(failed)
        return failed

    # -- weights in and out ----------------------------------------------------------------
    def pull_weights(self) -> list[torch.Tensor]:
        """The global weights (a list of tensors in parameter order)."""
        if self.weights is None:
            raise ValueError(
                "pull_weights: the server has no global weights yet; run sync_from_workers() "
                "or initialize(weights) first (get_stats()['initialized'] tells)"
            )
        return self.weights

    def pull(self) -> tuple[int, list[torch.Tensor]]:
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
            "num_bytes": 0
            if self.weights is None
            else sum(t.numel() * t.element_size() for t in self.weights),
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
            self.remote.indices = [list(ix) for ix in state["shard_indices"]]
            self.remote.call_each("set_indices", [(ix,) for ix in self.remote.indices])
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


def _check_shardable(strategy_cls: type[SyncStrategy], num_shards: int) -> None:
    if num_shards > 1 and not getattr(strategy_cls, "coordinate_wise", True):
        raise ValueError(
            f"strategy {strategy_cls.__name__} needs the whole model at once "
            f"(coordinate_wise=False), so it cannot run with num_shards={num_shards}"
        )


def _check_aggregation(strategy: SyncStrategy, config: ServerConfig) -> None:
    if config.aggregation == "sliced" and not sliceable(strategy):
        raise ValueError(
            f"aggregation='sliced' needs a strategy that declares elementwise = True; "
            f"{type(strategy).__name__} does not (its aggregate may need whole models), so it "
            "runs on the gather path: use aggregation='auto' or 'gather'"
        )


def _nbytes(weights: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights)


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
    _check_shardable(strategy_cls, config.num_shards)
    strategy_kwargs = {k: v for k, v in kwargs.items() if k not in CONFIG_FIELDS}
    try:
        probe = strategy_cls(**strategy_kwargs)  # validate now, not on first use in the actor
    except TypeError as exc:
        raise ValueError(
            f"strategy {strategy_cls.__name__} does not accept {sorted(strategy_kwargs)}: {exc}; "
            f"server options are {sorted(CONFIG_FIELDS)}"
        ) from exc
    _check_aggregation(probe, config)
    actor = ParameterServerActor if name is None else ParameterServerActor.options(name=name)
    # Pass the class, not the name: a strategy registered in the driver's STRATEGIES does not
    # exist in the registry of a freshly started server process.
    return actor.remote(strategy_cls, strategy_kwargs, config)


# The actor class; ``ParameterServer`` itself stays a plain class that tests can drive directly.
ParameterServerActor = miniray.remote(ParameterServer)
