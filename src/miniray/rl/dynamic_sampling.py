"""Dynamic sampling (DAPO, verl's ``algorithm.filter_groups``): train only on groups whose
rewards differ.

A group whose responses all got the same reward has zero advantage under GRPO: it costs a
forward and backward pass and teaches nothing. With ``filter_groups.enable`` the trainer drops
such groups and draws more from the stream until the batch is full::

    loop --fill_batch(need)--> fetch(k) --> queue.get_batch(k)  (as many times as needed,
      ^                                                          at most max_num_gen_batches)
      |  kept groups (spread > 0), and the dropped ones
      +-- after each fetch: the rollouter gets the dropped groups' staleness room back
      |   (``discard_groups``), or it would stop at its admission bound short of the batch
      +-- marks the dropped groups' prompt positions trained, like the kept ones, so a resumed
          run does not issue them again and every prompt is consumed exactly once

``metric`` is what must differ: ``score`` (also verl's ``seq_reward`` / ``seq_final_reward``:
without a KL term in the reward they are the same number) or a numeric field the reward
function returned in its dict (e.g. ``acc``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REWARD_METRICS_KEY", "Filled", "fill_batch", "group_metric", "has_spread"]

REWARD_METRICS_KEY = "reward_metrics"  # Sample.metadata key: the reward function's extra numbers
SCORE_METRICS = ("score", "seq_reward", "seq_final_reward")


def group_metric(group: Sequence[Any], metric: str) -> list[float]:
    """``metric`` of every sample of ``group`` (see the module docstring)."""
    if metric in SCORE_METRICS:
        return [float(s.reward) for s in group]
    values = []
    for sample in group:
        extras = sample.metadata.get(REWARD_METRICS_KEY, {})
        if metric not in extras:
            raise ValueError(
                f"algorithm.filter_groups.metric={metric!r}: the reward function returned no "
                f"such field (it returned {sorted(extras)}); use one of {list(SCORE_METRICS)} "
                "or a numeric field of the reward function's dict"
            )
        values.append(float(extras[metric]))
    return values


def has_spread(group: Sequence[Any], metric: str) -> bool:
    """Whether the group's ``metric`` values are not all equal (a single sample has none)."""
    values = group_metric(group, metric)
    return max(values) > min(values)


@dataclass
class Filled:
    """What ``fill_batch`` gathered: ``kept`` groups to train on, ``dropped`` groups without
    spread, and how many fetches (generation batches) it took."""

    kept: list[Any] = field(default_factory=list)
    dropped: list[Any] = field(default_factory=list)
    fetches: int = 0


def fill_batch(
    fetch: Callable[[int], list[Any]],
    need: int,
    *,
    metric: str,
    max_num_gen_batches: int,
    on_drop: Callable[[list[Any]], None] | None = None,
) -> Filled:
    """Fetch groups until ``need`` of them have spread; ``max_num_gen_batches`` (> 0) bounds
    the fetches, 0 leaves them unbounded (verl's meaning). More groups than needed are never
    fetched, so nothing is generated only to be thrown away. ``on_drop`` hears of each
    fetch's drops before the next fetch: the rollouter must hand their staleness room back
    at once, or a producer held at its admission bound would never send the groups the next
    fetch waits for."""
    filled = Filled()
    while len(filled.kept) < need:
        if max_num_gen_batches > 0 and filled.fetches >= max_num_gen_batches:
            raise RuntimeError(
                f"dynamic sampling kept {len(filled.kept)} of the {need} groups a batch needs "
                f"after algorithm.filter_groups.max_num_gen_batches={max_num_gen_batches} "
                f"fetches ({len(filled.dropped)} groups had the same {metric} for every "
                "response): the prompts are too easy or too hard for the policy; raise "
                "max_num_gen_batches (0: no limit), use more responses per prompt "
                "(actor_rollout_ref.rollout.n) or other data"
            )
        filled.fetches += 1
        dropped: list[Any] = []
        for group in fetch(need - len(filled.kept)):
            (filled.kept if has_spread(group, metric) else dropped).append(group)
        filled.dropped.extend(dropped)
        if dropped and on_drop is not None:
            on_drop(dropped)
    return filled
