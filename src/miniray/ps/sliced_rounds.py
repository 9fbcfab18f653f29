"""The sliced path of a one-shard server's round: which kind applies, and running it.

    SlicedRounds.spreads(weights)    local backend, layout known  -> spread_round: the workers
                                     write, reduce and load through shared segments (spread.py)
    SlicedRounds.alone_applies(vals) anything else sliceable      -> alone: the server reduces
                                     the gathered values slice by slice (sliced.reduce_alone)

Both reduce, exclude the workers found holding NaN/Inf and reduce again without them (so
``apply`` and the strategy's state only ever see a finite round), then apply the strategy or
the server optimizer to the whole result. Neither commits anything: the server does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from miniray.ps import sliced, spread
from miniray.ps.config import ServerConfig
from miniray.ps.reducers import accumulation_dtype
from miniray.ps.rounds import Round, check_after, nbytes
from miniray.ps.shard import ParameterShard
from miniray.ps.strategies import SyncStrategy, sliceable

WeightList = list[torch.Tensor]
Run = Callable[[list[int]], tuple[WeightList, dict[int, int], dict[int, str]]]
Push = Callable[[dict[int, Any], WeightList], dict[int, str]]


class SlicedRounds:
    """The sliced path of the server owning ``shard`` (its strategy and optimizer state)."""

    def __init__(
        self,
        shard: ParameterShard,
        strategy_cls: type[SyncStrategy],
        strategy_kwargs: dict[str, Any],
        config: ServerConfig,
    ):
        self.shard = shard
        self.config = config
        self.check_inputs = not check_after(strategy_cls, config.mode)
        self.spread = spread.SpreadReduction(
            strategy_cls, strategy_kwargs, config.reduce_processes, config.sync_timeout_s
        )

    def _enabled(self) -> bool:
        return self.config.aggregation != "gather" and sliceable(self.shard.strategy)

    def spreads(self, weights: WeightList | None) -> bool:
        """Will this round be reduced by its workers through shared segments?"""
        if not self._enabled() or weights is None or not spread.SpreadReduction.available():
            return False
        return (
            self.config.aggregation == "sliced" or nbytes(weights) >= self.config.sliced_min_bytes
        )

    def alone_applies(self, values: dict[int, Any]) -> bool:
        """Will the server reduce these gathered values slice by slice itself?"""
        if not self._enabled() or not values:
            return False
        if self.config.aggregation == "sliced":
            return True
        big = nbytes(next(iter(values.values()))) >= self.config.sliced_min_bytes
        return big and spread.SpreadReduction.available()

    def spread_round(
        self, rnd: Round, method: str, deadline: float, weights: WeightList
    ) -> tuple[WeightList | None, Push | None]:
        """Collect and reduce through the workers: ``(new weights or None below quorum, how
        to push them)``; the push is None when the new weights are not the result segment
        itself (a stateful strategy computed them): then the server puts them."""
        reduction = self.spread
        layout = sliced.Layout.like(weights)
        answered, rnd.excluded = reduction.collect(rnd.handles, method, layout, deadline)
        rnd.answered = sorted(answered)
        rnd.bytes_in = len(answered) * nbytes(weights)
        rnd.lap("gather")  # each worker checked the structure before it copied
        result_layout, upcast = self._result_layout(weights, weights)

        def run(included: list[int]) -> tuple[WeightList, dict[int, int], dict[int, str]]:
            out = reduction.reduce(
                self.shard.strategy,
                rnd.handles,
                included,
                layout,
                result_layout,
                upcast=upcast,
                check_inputs=self.check_inputs,
            )
            return out.reduced, out.nonfinite, out.failed

        new, reduced = self._aggregate(rnd, run)
        rnd.lap("aggregate")
        if new is None or reduced is None or any(n is not r for n, r in zip(new, reduced)):
            return new, None

        def push(targets: dict[int, Any], _new: WeightList) -> dict[int, str]:
            due = time.monotonic() + self.config.push_timeout_s
            return reduction.load(targets, result_layout, "set_weights", due)

        return new, push

    def alone(
        self, rnd: Round, values: dict[int, Any], weights: WeightList | None
    ) -> WeightList | None:
        """The server reduces the gathered ``values`` itself: new weights, or None."""
        layout, upcast = self._result_layout(values[rnd.answered[0]], weights)

        def run(included: list[int]) -> tuple[WeightList, dict[int, int], dict[int, str]]:
            reduced, bad = sliced.reduce_alone(
                self.shard.strategy,
                layout,
                included,
                [values[w] for w in included],
                upcast=upcast,
                check_inputs=self.check_inputs,
            )
            return reduced, bad, {}

        new, _ = self._aggregate(rnd, run)
        return new

    def _result_layout(
        self, sample: Sequence[torch.Tensor], weights: WeightList | None
    ) -> tuple[sliced.Layout, list[torch.dtype | None]]:
        """The reduced values' layout, and the dtype each input is upcast to first (gradients
        are reduced in the global weights' accumulation dtype)."""
        if self.config.mode == "weights":
            return sliced.Layout.like(sample), [None] * len(sample)
        assert weights is not None
        upcast = [
            accumulation_dtype(g.dtype) if torch.is_floating_point(g) else None for g in weights
        ]
        dtypes = [t.dtype if u is None else u for u, t in zip(upcast, sample)]
        return sliced.Layout.of([tuple(t.shape) for t in sample], dtypes), upcast

    def _aggregate(self, rnd: Round, run: Run) -> tuple[WeightList | None, WeightList | None]:
        """``(new global weights, reduced)`` from ``run`` (reduced, NaN/Inf report, failed
        slices), or Nones below quorum. Workers holding NaN/Inf are excluded and ``run`` goes
        again without them."""
        shard = self.shard
        included = rnd.included
        while True:
            if len(included) < self.config.quorum:
                return None, None
            reduced, nonfinite, failed = run(included)
            rnd.reduce_failed.update(failed)
            if not nonfinite:
                break
            for wid in sorted(nonfinite):
                rnd.excluded[wid] = f"nonfinite: parameter {nonfinite[wid]}"
            included = rnd.included
        if self.config.mode == "weights":
            return shard.strategy.apply(shard.weights, reduced), reduced
        assert shard.weights is not None
        return shard.server_opt.step(shard.weights, reduced), reduced

    def close(self) -> None:
        self.spread.close()
