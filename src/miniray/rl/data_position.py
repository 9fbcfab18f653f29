"""The data position of a run: which prompt comes next, and which prompts were trained on.

Prompts form an endless stream of *positions* 0, 1, 2, ...: position ``p`` is row
``order(p // N)[p % N]`` of the N training rows, where ``order(e)`` is epoch ``e``'s permutation
(seeded by ``data.seed`` and ``e``; the identity without ``data.shuffle``). A position is a pure
function of the config, so a resumed run draws the same prompts in the same order.

    rollouter: PromptCursor.next() -> position p -> generate a group for row(p)
               aborted by a pause / rejected as stale  -> give_back(p): p is issued again
    trainer:   TrainedPositions.add(p) when a group of p is trained (twice is an error)
    checkpoint: TrainedPositions (watermark + the few trained positions above it)
    resume:    PromptCursor(trained) issues every untrained position from the watermark on

So across a crash each position is trained at most once, and a group that was generated but
not trained when the checkpoint was written (in flight, in the queue, or trained after the
checkpoint and lost with the crash) has its prompt issued again.
"""

from __future__ import annotations

import heapq
import random
import threading
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["PromptCursor", "PromptOrder", "TrainedPositions"]


class PromptOrder:
    """Position -> row index: a fresh seeded permutation per epoch (or the identity)."""

    def __init__(self, num_rows: int, *, seed: int = 0, shuffle: bool = True):
        if num_rows < 1:
            raise ValueError(f"num_rows={num_rows} is invalid: the prompt set must not be empty")
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._perm: list[int] = []

    def row(self, position: int) -> int:
        _check_position(position)
        epoch, offset = divmod(position, self.num_rows)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            # A string seed hashes deterministically (unlike a tuple of ints across versions).
            perm = list(range(self.num_rows))
            random.Random(f"miniray-rl-prompts:{self.seed}:{epoch}").shuffle(perm)
            self._epoch, self._perm = epoch, perm
        return self._perm[offset]


class TrainedPositions:
    """The set of trained positions as ``watermark`` (all below it trained) + the rest above."""

    def __init__(self, watermark: int = 0, above: Iterable[int] = ()):
        _check_position(watermark, "watermark")
        self.watermark = watermark
        self.above: set[int] = set()
        for position in above:
            self.add(position)

    def add(self, position: int) -> None:
        """Record that a group of ``position`` was trained; a second time is a double count."""
        _check_position(position)
        if position in self:
            raise ValueError(
                f"prompt position {position} was already trained on: training it again would "
                "count it twice"
            )
        self.above.add(position)
        while self.watermark in self.above:  # keep the stored set small: slide the watermark
            self.above.remove(self.watermark)
            self.watermark += 1

    def __contains__(self, position: object) -> bool:
        return isinstance(position, int) and (position < self.watermark or position in self.above)

    def __len__(self) -> int:
        return self.watermark + len(self.above)

    def positions(self) -> list[int]:
        return [*range(self.watermark), *sorted(self.above)]

    def to_dict(self) -> dict[str, Any]:
        return {"watermark": self.watermark, "above": sorted(self.above)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainedPositions:
        missing = {"watermark", "above"} - set(data)
        if missing:
            raise ValueError(
                f"data position {dict(data)!r} is invalid: missing keys {sorted(missing)}"
            )
        return cls(int(data["watermark"]), [int(p) for p in data["above"]])


class PromptCursor:
    """Issues positions: given-back ones first (lowest first), then fresh ones, never a
    position already trained. Thread-safe: the generation loop and actor calls share it."""

    def __init__(self, trained: TrainedPositions | None = None):
        self.trained = trained or TrainedPositions()
        self._next = self.trained.watermark
        self._given_back: list[int] = []
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            if self._given_back:
                return heapq.heappop(self._given_back)
            while self._next in self.trained:
                self._next += 1
            position = self._next
            self._next += 1
            return position

    def give_back(self, position: int) -> None:
        """No trainable group came of ``position`` (aborted, rejected): issue it again."""
        _check_position(position)
        with self._lock:
            heapq.heappush(self._given_back, position)


def _check_position(value: Any, name: str = "position") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 0")
    return value
