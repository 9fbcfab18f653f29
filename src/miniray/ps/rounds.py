"""One synchronous round's bookkeeping, shared by the gather and the sliced paths.

``Round`` is what a round has learned so far (who answered, who was left out and why, the time
of each phase); ``worker_handles`` checks ``sync_from_workers``' arguments at the edge;
``exclude_nonfinite`` and ``check_after`` are the NaN/Inf rules of the gather path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from miniray.ps import validation
from miniray.ps.strategies import SyncStrategy


@dataclass
class Round:
    """A round in progress."""

    handles: dict[int, Any]  # worker id -> actor handle
    start: float = field(default_factory=time.monotonic)
    answered: list[int] = field(default_factory=list)  # returned something, sorted
    excluded: dict[int, str] = field(default_factory=dict)  # worker id -> why
    bytes_in: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.monotonic)
    reduce_failed: dict[int, str] = field(default_factory=dict)

    def lap(self, phase: str) -> None:
        """Close ``phase``: the time since the previous lap."""
        now = time.monotonic()
        self.timings[phase] = now - self.clock
        self.clock = now

    @property
    def included(self) -> list[int]:
        return [w for w in self.answered if w not in self.excluded]

    def answered_handles(self) -> dict[int, Any]:
        return {w: self.handles[w] for w in self.answered}


def worker_handles(workers: Any, quorum: int, timeout: float | None) -> dict[int, Any]:
    """``sync_from_workers``' arguments checked: worker id -> handle."""
    if isinstance(workers, dict):
        handles = dict(workers)
    elif isinstance(workers, (list, tuple)):
        handles = dict(enumerate(workers))
    else:
        raise ValueError(
            "sync_from_workers: workers must be a list of actor handles, got "
            f"{type(workers).__name__}"
        )
    if not handles:
        raise ValueError("sync_from_workers: workers is empty; pass at least one actor handle")
    if quorum > len(handles):
        raise ValueError(
            f"sync_from_workers: quorum={quorum} but only {len(handles)} workers "
            "were given; no round could ever be applied"
        )
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise ValueError(f"sync_from_workers: timeout={timeout!r} must be None or a number > 0")
    return handles


def check_after(strategy_cls: type[SyncStrategy], mode: str) -> bool:
    """May NaN/Inf be looked for in the result only (inputs scanned only when it has some)?

    For a mean, NaN/Inf in any input shows up in the output, so checking the one aggregate
    replaces scanning all K inputs (a full extra pass over K x model bytes). Stateful
    strategies must not see a NaN at all (it would enter their buffers): they scan first.
    """
    return mode == "weights" and bool(getattr(strategy_cls, "propagates_nonfinite", False))


def exclude_nonfinite(values: dict[int, Any], excluded: dict[int, str]) -> None:
    """Leave out every worker whose values hold NaN/Inf, naming its first such parameter."""
    for wid in sorted(values):
        bad = validation.first_nonfinite(values[wid])
        if bad is not None:
            excluded[wid] = f"nonfinite: parameter {bad}"


def nbytes(weights: Sequence[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in weights)
