"""Pure reductions of K workers' tensors into one: mean, weighted mean, median, trimmed mean, Krum.

Every function takes one list entry per worker and returns a new tensor; none keeps state.
Floating tensors are reduced in at least fp32 and cast back to their own dtype at the end: four
fp16 values of 30,000 sum to ``inf`` in fp16, and bf16 accumulation loses most of an update's
bits. Integer and bool tensors (step counters, BatchNorm's ``num_batches_tracked``) are never
averaged: ``per_parameter`` copies the first worker's value, as the seed's median example does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor
WeightList = list[Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype (fp32, bf16, fp16, fp8) accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_parameter(
    weight_lists: Sequence[WeightList], reduce: Callable[[list[Tensor]], Tensor]
) -> WeightList:
    """Apply ``reduce`` to each parameter index across workers; non-floating tensors are copied."""
    out: WeightList = []
    for p_idx in range(len(weight_lists[0])):
        tensors = [w[p_idx] for w in weight_lists]
        if torch.is_floating_point(tensors[0]):
            acc = accumulation_dtype(tensors[0].dtype)
            out.append(reduce([t.to(acc) for t in tensors]).to(tensors[0].dtype))
        else:
            out.append(tensors[0].clone())
    return out


def mean(tensors: list[Tensor]) -> Tensor:
    # Accumulate in place instead of torch.stack: a 100 MB model would otherwise allocate K x 100 MB.
    acc = tensors[0] + tensors[1] if len(tensors) > 1 else tensors[0].clone()
    for t in tensors[2:]:
        acc.add_(t)
    return acc.div_(len(tensors))


def mean_into(out: Tensor, tensors: list[Tensor]) -> Tensor:
    """``mean(tensors)`` written into ``out`` (fp32/fp64: it is also the accumulator)."""
    if len(tensors) > 1:
        torch.add(tensors[0], tensors[1], out=out)
    else:
        out.copy_(tensors[0])
    for t in tensors[2:]:
        out.add_(t)
    return out.div_(len(tensors))


def weighted_mean(tensors: list[Tensor], weights: Sequence[float]) -> Tensor:
    total = float(sum(weights))
    acc = tensors[0] * (weights[0] / total)
    for t, w in zip(tensors[1:], weights[1:]):
        acc.add_(t, alpha=w / total)
    return acc


def median(tensors: list[Tensor]) -> Tensor:
    """Coordinate-wise median; for an even count the mean of the two middle values.

    ``torch.median`` returns the lower middle value for an even count (2.0 for [1, 2, 3, 10]),
    which biases the aggregate downwards; we use the textbook definition instead.
    """
    ordered = torch.stack(tensors).sort(dim=0).values
    n = len(tensors)
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(tensors: list[Tensor], num_trim: int) -> Tensor:
    """Per coordinate, drop the ``num_trim`` largest and smallest values and average the rest."""
    n = len(tensors)
    if n - 2 * num_trim < 1:
        raise ValueError(
            f"trimmed_mean: trimming {num_trim} from each end of {n} workers leaves none; "
            "the rule is 2 * num_trim < number of workers"
        )
    ordered = torch.stack(tensors).sort(dim=0).values
    return ordered[num_trim : n - num_trim].mean(dim=0)


def num_trimmed(num_workers: int, trim_fraction: float) -> int:
    return math.floor(trim_fraction * num_workers)


def krum_scores(weight_lists: Sequence[WeightList], num_byzantine: int) -> list[float]:
    """Krum score of each worker: sum of squared distances to its K - f - 2 nearest neighbours.

    Blanchard et al. (NIPS'17) need K >= 2f + 3 for the nearest-neighbour set to outvote f
    Byzantine workers; below that we refuse rather than return a meaningless choice.
    """
    k = len(weight_lists)
    if k < 2 * num_byzantine + 3:
        raise ValueError(
            f"krum: {k} workers cannot tolerate num_byzantine={num_byzantine}; "
            f"the rule is workers >= 2 * num_byzantine + 3 = {2 * num_byzantine + 3}"
        )
    dist = torch.zeros(k, k, dtype=torch.float64)
    for p_idx in range(len(weight_lists[0])):
        if not torch.is_floating_point(weight_lists[0][p_idx]):
            continue
        flat = torch.stack([w[p_idx].reshape(-1).to(torch.float64) for w in weight_lists])
        # The mm-free path is exact; the default matmul trick cancels catastrophically when
        # workers are close together, which is exactly the honest case.
        dist += torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    num_neighbours = k - num_byzantine - 2
    scores = []
    for i in range(k):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(others.sort().values[:num_neighbours].sum()))
    return scores


def krum_select(
    weight_lists: Sequence[WeightList], num_byzantine: int, num_selected: int = 1
) -> list[int]:
    """Indices of the ``num_selected`` best-scoring workers (Multi-Krum when > 1), best first."""
    if num_selected > len(weight_lists) - num_byzantine:
        raise ValueError(
            f"krum: num_selected={num_selected} with {len(weight_lists)} workers and "
            f"num_byzantine={num_byzantine}; the rule is num_selected <= workers - num_byzantine"
        )
    scores = krum_scores(weight_lists, num_byzantine)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return order[:num_selected]
