"""Where a trainer's metrics go: ``<log_dir>/metrics.jsonl`` and TensorBoard event files.

One JSONL line per record: ``{"phase": "train", "epoch": 3, "time": <unix s>, "loss": ...}``;
``phase`` is ``train`` for an epoch's result and ``eval`` for ``evaluate()``, and ``epoch``
counts the epochs completed when the record was made (the hooks' 0-based ``epoch`` + 1; an
evaluation before training is at 0). TensorBoard gets every finite numeric field as the scalar
``<phase>/<field>`` at that step.

A run resumed after k epochs must not leave the killed run's records of later epochs behind
(they would be plotted twice, and differ): the JSONL file is rewritten without records of
epochs > k and TensorBoard is opened with ``purge_step=k + 1``, which hides the events from
that step on. A fresh run (``resume_epoch=None``) replaces whatever the directory held.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

JSONL_NAME = "metrics.jsonl"


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: numbers, strings, lists, dicts; anything else as repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/Infinity
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars, one-element tensors
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return jsonable(item())
    return repr(value)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric fields (bools are flags, not measurements)."""
    out = {}
    for key, value in metrics.items():
        value = jsonable(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class MetricsWriter:
    """Appends records to the JSONL file and, if wanted, to TensorBoard; flushes every record."""

    def __init__(
        self, log_dir: str, *, tensorboard: bool | None = None, resume_epoch: int | None = None
    ):
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.jsonl_path = os.path.join(log_dir, JSONL_NAME)
        _drop_records_after(self.jsonl_path, -1 if resume_epoch is None else resume_epoch)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._tb: Any = None
        if tensorboard or tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                if tensorboard:
                    raise ImportError(
                        "tensorboard=True needs the tensorboard package: pip install tensorboard "
                        "(or pass tensorboard=False to write metrics.jsonl only)"
                    ) from exc
            else:
                purge = 0 if resume_epoch is None else resume_epoch + 1
                self._tb = SummaryWriter(log_dir, purge_step=purge)

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, epoch: int, metrics: Mapping[str, Any], *, phase: str = "train") -> None:
        record = {"phase": phase, "epoch": epoch, "time": time.time()}
        record.update({k: jsonable(v) for k, v in metrics.items() if k not in record})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars(metrics).items():
                self._tb.add_scalar(f"{phase}/{key}", value, epoch)
            self._tb.flush()

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every record of a metrics file (a helper for notebooks and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _drop_records_after(path: str, last_epoch: int) -> None:
    """Rewrite ``path`` without records of epochs > ``last_epoch`` (atomically)."""
    if not os.path.exists(path):
        return
    records = read_jsonl(path)
    keep = [r for r in records if r.get("epoch", 0) <= last_epoch]
    if len(keep) == len(records):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)
