"""What a sync round and an asynchronous push report back: plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SyncResult:
    """Outcome of one ``sync_from_workers`` round.

    ``applied`` is False when the round was discarded (fewer than ``quorum`` usable workers);
    then ``version`` is unchanged and no worker received weights. ``excluded`` maps a worker id
    to why it was left out ('timeout', 'died: ...', 'error: ...', 'nonfinite: parameter i').
    """

    applied: bool
    version: int
    included: tuple[int, ...]
    excluded: dict[int, str] = field(default_factory=dict)
    reason: str = ""
    duration_s: float = 0.0
    push_failed: dict[int, str] = field(default_factory=dict)
    # Seconds per phase: 'gather', 'validate', 'aggregate', 'push'.
    timings: dict[str, float] = field(default_factory=dict)
    bytes_in: int = 0  # bytes of worker tensors collected
    bytes_out: int = 0  # bytes of the aggregate shipped (once, shared by every worker)
    # 'sliced': reduced slice by slice (by the round's workers on the local backend);
    # 'gather': whole models, by the server alone.
    aggregation: str = "gather"
    # Sliced rounds: slice index -> why the process reducing it failed (the server reduced
    # every slice itself instead, so the round's result is the same).
    reduce_failed: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PushResult:
    """Outcome of one asynchronous ``push``.

    ``status`` is 'applied' (the server version advanced), 'buffered' (accepted, waiting for
    more pushes of this version), or 'rejected_stale' (``staleness > staleness_bound``: pull the
    current weights with ``pull()`` and recompute). ``version`` is the server version after the call.
    """

    status: str
    version: int
    staleness: int
    staleness_bound: int | None
    message: str = ""

    @property
    def accepted(self) -> bool:
        return self.status in ("applied", "buffered")
