"""The server's options (``ServerConfig``) and the checks that need the strategy too.

Every option is checked where ``create_parameter_server`` is called, so a bad value raises in
the caller, naming the option, the value and the rule, not later inside the server actor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from miniray.ps.outer import OuterSGD
from miniray.ps.strategies import SyncStrategy, sliceable

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
    # 'auto': sliced reduction when it applies (docs/ps.md "Sliced reduction"), else gather;
    # 'sliced': whenever the strategy allows (on backends without shared segments the server
    # then reduces alone); 'gather': always the server alone, whole models.
    aggregation: str = "auto"
    # Processes reducing a sliced round: the server and P - 1 of the round's workers;
    # None: min(workers in the round, CPUs).
    reduce_processes: int | None = None
    # 'auto' gathers smaller models: a sliced round costs three calls per worker, not two.
    sliced_min_bytes: int = 8 * 2**20

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


def check_shardable(strategy_cls: type[SyncStrategy], num_shards: int) -> None:
    if num_shards > 1 and not getattr(strategy_cls, "coordinate_wise", True):
        raise ValueError(
            f"strategy {strategy_cls.__name__} needs the whole model at once "
            f"(coordinate_wise=False), so it cannot run with num_shards={num_shards}"
        )


def check_aggregation(strategy: SyncStrategy, config: ServerConfig) -> None:
    if config.aggregation == "sliced" and not sliceable(strategy):
        raise ValueError(
            f"aggregation='sliced' needs a strategy that declares elementwise = True; "
            f"{type(strategy).__name__} does not (its aggregate may need whole models), so it "
            "runs on the gather path: use aggregation='auto' or 'gather'"
        )
