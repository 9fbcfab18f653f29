"""The progress bar of a training run: one tqdm bar over the epochs.

Inside an epoch the only progress the driver can see is workers finishing their
``train_epoch`` call, so the bar's postfix shows ``workers 3/4`` while an epoch runs and the
epoch's metrics once it is done. The bar is on when stderr is a terminal (``progress=None``),
or when asked (``progress=True``); a log file or a CI job never receives carriage-return noise.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def wanted(progress: bool | None) -> bool:
    """Whether to show a bar: the user's choice, or "stderr is a terminal" when they made none."""
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class EpochProgress:
    """A bar from ``initial`` to ``total`` epochs; every method is a no-op when disabled."""

    def __init__(self, *, enabled: bool, total: int, initial: int, num_workers: int):
        self.num_workers = num_workers
        self.in_epoch = False
        self.bar: Any = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "progress=True needs tqdm: pip install tqdm (or pass progress=False)"
            ) from exc
        self.bar = tqdm(total=total, initial=initial, unit="epoch", dynamic_ncols=True)

    def epoch_started(self, epoch: int) -> None:
        self.in_epoch = True
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{self.bar.total}")
            self.bar.set_postfix_str(f"workers 0/{self.num_workers}")

    def workers_done(self, done: int, total: int) -> None:
        # Only inside an epoch: a checkpoint's calls after it must not hide the epoch's metrics.
        if self.bar is not None and self.in_epoch:
            self.bar.set_postfix_str(f"workers {done}/{total}")

    def epoch_done(self, result: Mapping[str, Any]) -> None:
        self.in_epoch = False
        if self.bar is not None:
            self.bar.set_postfix_str(summary(result), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary(result: Mapping[str, Any], max_items: int = 4) -> str:
    """``loss=0.123, accuracy=0.91``: the first few numeric fields, short enough for one line."""
    items = []
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        items.append(f"{key}={value:.4g}")
        if len(items) == max_items:
            break
    return ", ".join(items)
