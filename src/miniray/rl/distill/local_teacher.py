"""LocalTeacher: the teacher in this process, with ``TeacherClient``'s ``score``/``submit``.

It runs the same scoring code as a teacher server's worker (``teacher_worker.TeacherModel``)
and returns the same ``TeacherScores``, without a network in between: for tests, for
single-process runs, and to check that a served teacher answers what the model says.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from miniray.rl.distill.teacher_worker import TeacherModel
from miniray.rl.errors import TeacherTimeoutError
from miniray.rl.types import TeacherScores

__all__ = ["LocalTeacher"]


class LocalTeacher:
    """Scores sequences with a local causal LM (``model`` object or ``model_path``)."""

    def __init__(self, model: Any = None, *, model_path: str | None = None):
        if (model is None) == (model_path is None):
            raise ValueError("LocalTeacher needs exactly one of model= or model_path=")
        self.teacher = (
            TeacherModel.from_pretrained(str(model_path)) if model is None else TeacherModel(model)
        )
        self.vocab_size = self.teacher.vocab_size
        self._lock = threading.Lock()  # one forward at a time, like one server worker
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="local-teacher"
        )

    def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "max_seq_len": self.teacher.max_seq_len}

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        topk: int = 0,
        temperature: float = 1.0,
        timeout: float | None = None,
        allow_partial: bool = False,
    ) -> TeacherScores:
        """Like ``TeacherClient.score``; ``timeout`` bounds the wait for the forward pass."""
        future = self.submit(sequences, topk=topk, temperature=temperature)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise TeacherTimeoutError(
                f"the local teacher did not score {len(sequences)} sequences within {timeout}s"
            ) from exc

    def submit(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        topk: int = 0,
        temperature: float = 1.0,
        **_: Any,
    ) -> concurrent.futures.Future:
        """``score`` on a background thread; returns a future of ``TeacherScores``."""
        if topk < 0 or topk > self.vocab_size:
            raise ValueError(f"topk={topk} is invalid: must be in [0, {self.vocab_size}]")
        seqs = [list(map(int, s)) for s in sequences]
        return self._executor.submit(self._score, seqs, topk, temperature)

    def _score(self, seqs: list[list[int]], topk: int, temperature: float) -> TeacherScores:
        start = time.monotonic()
        lengths = [len(s) for s in seqs]
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        with self._lock:
            tok, top_lp, top_idx = self.teacher.score(
                ids, lengths, topk=topk, temperature=temperature
            )
        out = TeacherScores(token_logprobs=[], topk_logprobs=[], topk_indices=[])
        at = 0
        for n in lengths:
            rows = slice(at, at + n - 1)
            out.token_logprobs.append(tok[rows].clone() if tok is not None else None)
            out.topk_logprobs.append(top_lp[rows].clone() if top_lp is not None else None)
            out.topk_indices.append(top_idx[rows].clone() if top_idx is not None else None)
            at += max(0, n - 1)
        out.elapsed_s = time.monotonic() - start
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
