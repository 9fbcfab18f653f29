"""Synchronization strategies: how K workers' weights become the new global weights.

A strategy needs one method, ``aggregate(weight_lists) -> weights``; that is all the seed's
custom-strategy example implements, and register it with ``STRATEGIES['name'] = Cls``.
Two optional hooks let a strategy do more:

* ``reduce(weight_lists, worker_ids)``: combine contributions (defaults to ``aggregate``);
  the server also uses it to combine gradients and asynchronous deltas, so every reducer
  (median, trimmed mean, Krum...) works in every mode.
* ``step(global_weights, weight_lists, worker_ids)``: the new global weights of a round
  (defaults to ``apply(global_weights, reduce(...))``, and ``apply`` defaults to replacing the
  global weights). Stateful strategies (EMA, DiLoCo) override ``apply`` and expose their state
  through ``state_dict``/``load_state_dict`` for checkpoints.

A strategy whose ``reduce`` computes each element of its result from that element of every
input alone (a mean, a median, a trimmed mean) declares ``elementwise = True`` in the class that
defines its arithmetic. The server may then cut the flattened parameters into slices and have
several processes reduce one slice each (``miniray.ps.sliced``), then call ``apply`` once on the
whole result. Only built-ins declare it; a custom strategy, or a subclass that overrides
``aggregate``/``reduce``/``step``/``apply`` without declaring it again, runs on the gather path,
where ``aggregate`` sees every worker's whole model at once (``sliceable`` decides).

Every built-in strategy is an outer optimizer on the pseudo-gradient ``global - reduce(...)``:
average is SGD(lr=1), momentum (EMA, factor b) is SGD(lr=1-b), DiLoCo is Nesterov SGD.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from miniray.ps import reducers
from miniray.ps.outer import OuterSGD

WeightList = list[torch.Tensor]


class SyncStrategy(ABC):
    """Base class of every strategy. Subclasses implement ``aggregate``."""

    # True when each parameter can be aggregated on its own, so the server may shard the
    # parameters over several actors. Set False if ``aggregate`` needs the whole model at once.
    coordinate_wise = True
    # True when NaN/Inf in any worker's weights always reaches the aggregate and the strategy
    # keeps no state: the server may then check the one aggregate instead of every worker.
    propagates_nonfinite = False
    # True when reduce() is elementwise across workers and step() is apply(global, reduce(...)):
    # see the module docstring. Read through ``sliceable``, never inherited by an override.
    elementwise = False

    def __init__(self) -> None:
        # Per-worker weights (e.g. sample counts) set through ParameterServer.set_worker_weight;
        # strategies that do not weight workers ignore them.
        self.worker_weights: dict[int, float] = {}

    @abstractmethod
    def aggregate(self, weight_lists: Sequence[WeightList]) -> WeightList:
        """Combine one weight list per worker (same length, shapes, dtypes) into one."""

    def reduce(self, weight_lists: Sequence[WeightList], worker_ids: Sequence[int]) -> WeightList:
        return self.aggregate(weight_lists)

    def reduce_into(
        self, out: WeightList, weight_lists: Sequence[WeightList], worker_ids: Sequence[int]
    ) -> None:
        """Write ``reduce(weight_lists, worker_ids)`` into ``out`` (the sliced path's buffers)."""
        for target, value in zip(out, self.reduce(weight_lists, worker_ids)):
            target.copy_(value)

    def apply(self, global_weights: WeightList | None, reduced: WeightList) -> WeightList:
        """The new global weights given the round's reduced weights; default: adopt them."""
        return reduced

    def step(
        self,
        global_weights: WeightList | None,
        weight_lists: Sequence[WeightList],
        worker_ids: Sequence[int],
    ) -> WeightList:
        return self.apply(global_weights, self.reduce(weight_lists, worker_ids))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned; stateless strategies have nothing to restore."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no state but was given {sorted(state)[:3]}...; "
                "was the checkpoint written by another strategy?"
            )


class AverageStrategy(SyncStrategy):
    """Plain mean of every worker's weights (the default)."""

    propagates_nonfinite = True
    elementwise = True

    def aggregate(self, weight_lists: Sequence[WeightList]) -> WeightList:
        return reducers.per_parameter(weight_lists, reducers.mean)

    def reduce_into(
        self, out: WeightList, weight_lists: Sequence[WeightList], worker_ids: Sequence[int]
    ) -> None:
        # The hot path of a sliced round: sum straight into the shared buffer, no temporaries.
        for p_idx, target in enumerate(out):
            tensors = [w[p_idx] for w in weight_lists]
            if target.dtype in (torch.float32, torch.float64):
                reducers.mean_into(target, tensors)
            else:
                target.copy_(reducers.per_parameter([[t] for t in tensors], reducers.mean)[0])


class WeightedStrategy(SyncStrategy):
    """Mean weighted by ``worker_weights`` (e.g. sample counts); unset workers weigh 1."""

    propagates_nonfinite = True  # 0 x NaN and 0 x Inf are NaN: even a weight-0 worker shows
    elementwise = True

    def aggregate(
        self, weight_lists: Sequence[WeightList], weights: Sequence[float] | None = None
    ) -> WeightList:
        if weights is None:
            weights = [1.0] * len(weight_lists)
        if sum(weights) <= 0:
            raise ValueError(
                f"weighted: worker weights {list(weights)} sum to {sum(weights)}; "
                "the rule is that the workers in a round have a positive total weight"
            )
        return reducers.per_parameter(weight_lists, lambda ts: reducers.weighted_mean(ts, weights))

    def reduce(self, weight_lists: Sequence[WeightList], worker_ids: Sequence[int]) -> WeightList:
        weights = [self.worker_weights.get(i, 1.0) for i in worker_ids]
        return self.aggregate(weight_lists, weights)


class MedianStrategy(SyncStrategy):
    """Coordinate-wise median (mean of the two middle values for an even count)."""

    elementwise = True

    def aggregate(self, weight_lists: Sequence[WeightList]) -> WeightList:
        return reducers.per_parameter(weight_lists, reducers.median)


class TrimmedMeanStrategy(SyncStrategy):
    """Per coordinate, drop ``floor(trim_fraction * K)`` largest and smallest, average the rest."""

    elementwise = True

    def __init__(self, trim_fraction: float = 0.2):
        super().__init__()
        if not (isinstance(trim_fraction, (int, float)) and 0 <= trim_fraction < 0.5):
            raise ValueError(f"trimmed_mean: trim_fraction={trim_fraction!r} must be in [0, 0.5)")
        self.trim_fraction = float(trim_fraction)

    def aggregate(self, weight_lists: Sequence[WeightList]) -> WeightList:
        k = reducers.num_trimmed(len(weight_lists), self.trim_fraction)
        return reducers.per_parameter(weight_lists, lambda ts: reducers.trimmed_mean(ts, k))


class KrumStrategy(SyncStrategy):
    """Krum (``num_selected=1``) or Multi-Krum: average of the best-scoring workers' weights."""

    coordinate_wise = False  # scores use distances over the whole model

    def __init__(self, num_byzantine: int = 1, num_selected: int = 1):
        super().__init__()
        for field, value, low in (
            ("num_byzantine", num_byzantine, 0),
            ("num_selected", num_selected, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"krum: {field}={value!r} must be an integer >= {low}")
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected
        self.last_selected: list[int] = []

    def aggregate(self, weight_lists: Sequence[WeightList]) -> WeightList:
        chosen = reducers.krum_select(weight_lists, self.num_byzantine, self.num_selected)
        self.last_selected = chosen
        return reducers.per_parameter([weight_lists[i] for i in chosen], reducers.mean)


class OuterOptimizerStrategy(SyncStrategy):
    """Outer SGD on the pseudo-gradient ``global - reducer(workers)``; defaults are DiLoCo's.

    ``reducer`` names another registered strategy (e.g. 'median') that combines the workers;
    the first round, with no global weights yet, adopts the reduced weights as they are.
    """

    def __init__(
        self,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        reducer: str = "average",
        **reducer_kwargs: Any,
    ):
        super().__init__()
        if reducer not in STRATEGIES or issubclass(STRATEGIES[reducer], OuterOptimizerStrategy):
            known = sorted(
                k for k, v in STRATEGIES.items() if not issubclass(v, OuterOptimizerStrategy)
            )
            raise ValueError(f"outer: reducer={reducer!r} is not a known reducer; known: {known}")
        self.reducer = STRATEGIES[reducer](**reducer_kwargs)
        self.reducer.worker_weights = self.worker_weights  # one dict, shared on purpose
        self.optimizer = OuterSGD(lr=lr, momentum=momentum, nesterov=nesterov)

    def aggregate(self, weight_lists: Sequence[WeightList]) -> WeightList:
        return self.reducer.aggregate(weight_lists)

    def reduce(self, weight_lists: Sequence[WeightList], worker_ids: Sequence[int]) -> WeightList:
        return self.reducer.reduce(weight_lists, worker_ids)

    @property
    def elementwise(self) -> bool:  # type: ignore[override]
        # The optimizer step is elementwise; whether the reduction is depends on the reducer.
        return sliceable(self.reducer)

    def reduce_into(
        self, out: WeightList, weight_lists: Sequence[WeightList], worker_ids: Sequence[int]
    ) -> None:
        self.reducer.reduce_into(out, weight_lists, worker_ids)

    def apply(self, global_weights: WeightList | None, target: WeightList) -> WeightList:
        if global_weights is None:
            return target
        deltas = [
            g.to(reducers.accumulation_dtype(g.dtype)) - t.to(reducers.accumulation_dtype(g.dtype))
            if torch.is_floating_point(g)
            else g
            for g, t in zip(global_weights, target)
        ]
        new = self.optimizer.step(global_weights, deltas)
        # Counters and other integer tensors follow the workers, not the optimizer.
        return [n if torch.is_floating_point(n) else t.clone() for n, t in zip(new, target)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(state)


class MomentumStrategy(OuterOptimizerStrategy):
    """EMA of the global weights: ``new = momentum * global + (1 - momentum) * mean(workers)``.

    This damps each round's update (x0.1 at momentum=0.9); it is outer SGD with lr=1-momentum
    and no momentum buffer, despite its name. For acceleration use 'diloco'.
    """

    def __init__(self, momentum: float = 0.9, reducer: str = "average", **reducer_kwargs: Any):
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum: momentum={momentum!r} must be in [0, 1)")
        super().__init__(
            lr=1.0 - momentum, momentum=0.0, nesterov=False, reducer=reducer, **reducer_kwargs
        )
        self.momentum = float(momentum)


_ARITHMETIC = ("aggregate", "reduce", "reduce_into", "step", "apply")


def sliceable(strategy: SyncStrategy) -> bool:
    """May the server reduce slices of the parameters separately with this strategy?

    The class nearest in the MRO that defines any arithmetic method must itself declare
    ``elementwise``: a subclass of ``AverageStrategy`` with its own ``aggregate`` does not inherit
    the promise, so it gets the gather path (its ``aggregate`` sees whole models).
    """
    for cls in type(strategy).__mro__:
        if any(name in vars(cls) for name in _ARITHMETIC):
            if "elementwise" not in vars(cls):
                return False
            return bool(strategy.elementwise)
    return False


STRATEGIES: dict[str, type[SyncStrategy]] = {
    "average": AverageStrategy,
    "weighted": WeightedStrategy,
    "momentum": MomentumStrategy,
    "median": MedianStrategy,
    "trimmed_mean": TrimmedMeanStrategy,
    "krum": KrumStrategy,
    "outer": OuterOptimizerStrategy,
    "diloco": OuterOptimizerStrategy,
}


def resolve_strategy(strategy: str | type[SyncStrategy] | SyncStrategy) -> type[SyncStrategy]:
    """The class for a registered name or a class; unknown names list the known ones."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"strategy={strategy!r} is unknown; known strategies are {sorted(STRATEGIES)} "
                "(register your own with STRATEGIES['name'] = MyStrategy)"
            )
        return STRATEGIES[strategy]
    if isinstance(strategy, type) and issubclass(strategy, SyncStrategy):
        return strategy
    raise TypeError(f"strategy={strategy!r} must be a registered name or a SyncStrategy subclass")
