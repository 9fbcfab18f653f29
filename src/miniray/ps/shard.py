"""One shard of the global weights: the parameter indices it owns, their values, the strategy and
server-optimizer state for them, and the arithmetic of a round.

With ``num_shards=1`` the server holds one ``ParameterShard`` in its own process; with k > 1 it
starts k shard actors, gives each a size-balanced set of parameter indices (``assign``) and
runs their arithmetic in parallel. Shards receive workers' *full* weight lists (on the local
backend these are shared-memory maps, so passing them costs no copy) and read only their slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import miniray
from miniray.ps.outer import OuterSGD
from miniray.ps.reducers import accumulation_dtype
from miniray.ps.strategies import SyncStrategy

WeightList = list[torch.Tensor]


def assign(sizes: Sequence[int], num_shards: int) -> list[list[int]]:
    """Size-balanced assignment of parameter indices to shards (largest first, to the lightest).

    Greedy LPT keeps the heaviest shard within one largest-parameter of the ideal. Indices stay
    sorted within a shard so that each shard's slice preserves parameter order.
    """
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise ValueError(f"num_shards={num_shards!r} must be an integer >= 1")
    loads = [0] * num_shards
    owned: list[list[int]] = [[] for _ in range(num_shards)]
    for idx in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(num_shards), key=lambda s: (loads[s], s))
        owned[target].append(idx)
        loads[target] += sizes[idx]
    return [sorted(o) for o in owned]


class ParameterShard:
    """Global weights and optimizer state for ``indices`` (None = every parameter)."""

    def __init__(
        self,
        strategy_cls: type[SyncStrategy],
        strategy_kwargs: dict[str, Any],
        server_opt: dict[str, Any],
    ):
        self.strategy = strategy_cls(**strategy_kwargs)
        if not hasattr(self.strategy, "worker_weights"):  # a subclass that skipped super().__init__
            self.strategy.worker_weights = {}
        self.server_opt = OuterSGD(**server_opt)
        self.indices: list[int] | None = None
        self.weights: WeightList | None = None

    def set_indices(self, indices: list[int] | None) -> None:
        self.indices = indices

    def _slice(self, weights: Sequence[torch.Tensor]) -> WeightList:
        return list(weights) if self.indices is None else [weights[i] for i in self.indices]

    def set_weights(self, weights: Sequence[torch.Tensor]) -> None:
        self.weights = [t.clone() for t in self._slice(weights)]

    def set_worker_weight(self, worker_id: int, weight: float) -> None:
        # Mutate in place: OuterOptimizerStrategy shares this dict with its reducer.
        self.strategy.worker_weights[worker_id] = weight

    def step_round(self, worker_ids: Sequence[int], *weight_lists: WeightList) -> WeightList:
        """A synchronous weights round: the strategy turns the workers' weights into new ones."""
        lists = [self._slice(w) for w in weight_lists]
        self.weights = self.strategy.step(self.weights, lists, list(worker_ids))
        return self.weights

    def apply_updates(
        self, worker_ids: Sequence[int], scales: Sequence[float], *update_lists: WeightList
    ) -> WeightList:
        """Gradients or deltas (pseudo-gradients): reduce them, then one server-optimizer step.

        Updates may arrive in bf16/fp16 (mixed precision); they are upcast to the global weights'
        dtype before reducing, so accumulation never happens in the low-precision type.
        """
        assert self.weights is not None, "apply_updates needs initialized weights"
        lists = []
        for update, scale in zip(update_lists, scales):
            sliced = self._slice(update)
            lists.append(
                [
                    u.to(accumulation_dtype(g.dtype)).mul_(scale)
                    if torch.is_floating_point(g)
                    else u
                    for u, g in zip(sliced, self.weights)
                ]
            )
        delta = self.strategy.reduce(lists, list(worker_ids))
        self.weights = self.server_opt.step(self.weights, delta)
        return self.weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"strategy.{k}": v for k, v in self.strategy.state_dict().items()}
        state.update({f"server_opt.{k}": v for k, v in self.server_opt.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        def under(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        self.strategy.load_state_dict(under("strategy."))
        self.server_opt.load_state_dict(under("server_opt."))


class RemoteShards:
    """k shard actors behind the same calls as one local ``ParameterShard``."""

    def __init__(
        self,
        strategy_cls: type[SyncStrategy],
        strategy_kwargs: dict[str, Any],
        server_opt: dict[str, Any],
        num_shards: int,
        timeout_s: float,
    ):
        shard_actor = miniray.remote(ParameterShard)
        self.handles = [
            shard_actor.remote(strategy_cls, strategy_kwargs, server_opt) for _ in range(num_shards)
        ]
        self.timeout_s = timeout_s
        self.indices: list[list[int]] = []

    def call(self, method: str, *args: Any) -> list[Any]:
        refs = [getattr(h, method).remote(*args) for h in self.handles]
        return miniray.get(refs, timeout=self.timeout_s)

    def call_each(self, method: str, per_shard_args: list[tuple]) -> list[Any]:
        refs = [getattr(h, method).remote(*a) for h, a in zip(self.handles, per_shard_args)]
        return miniray.get(refs, timeout=self.timeout_s)

    def ensure_layout(self, sample: Sequence[torch.Tensor]) -> None:
        """Assign parameters to shards the first time their sizes are known."""
        if not self.indices:
            self.set_layout(
                assign([t.numel() * t.element_size() for t in sample], len(self.handles))
            )

    def set_layout(self, indices: list[list[int]]) -> None:
        self.indices = [list(ix) for ix in indices]
        self.call_each("set_indices", [(ix,) for ix in self.indices])

    def assemble(self, parts: list[list[torch.Tensor]]) -> WeightList:
        """The full weight list from each shard's part."""
        out: list[Any] = [None] * sum(len(p) for p in parts)
        for indices, part in zip(self.indices, parts):
            for i, t in zip(indices, part):
                out[i] = t
        return out
