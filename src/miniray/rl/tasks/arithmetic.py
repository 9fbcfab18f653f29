"""Small-number arithmetic: prompts like ``"12+7="``, answer ``"19"``, reward 1 on exact match.

Rows follow the layout verl users know from its parquet files: a ``prompt`` column and the
ground truth under ``reward_model.ground_truth`` (flattened here to ``ground_truth``), plus
``data_source``. ``write_prompts`` writes parquet or JSONL; ``miniray.rl.prompts.load_prompts``
reads either, so the real file-loading path is the one the demo and the tests exercise.
"""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ArithmeticTask:
    """Addition (and optionally subtraction) of numbers in ``[0, max_operand]``."""

    max_operand: int = 9
    operators: str = "+"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ValueError(f"ArithmeticTask.max_operand={self.max_operand} must be >= 1")
        if not self.operators or set(self.operators) - {"+", "-"}:
            raise ValueError(
                f"ArithmeticTask.operators={self.operators!r} must be a non-empty mix of '+' and '-'"
            )

    @property
    def alphabet(self) -> str:
        """Every character a prompt or an answer can contain."""
        return "0123456789+-="

    def problem(self, rng: random.Random) -> tuple[str, str]:
        a = rng.randint(0, self.max_operand)
        b = rng.randint(0, self.max_operand)
        op = rng.choice(self.operators)
        if op == "-" and b > a:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        return f"{a}{op}{b}=", str(answer)

    def rows(self, count: int, *, split: str = "train") -> list[dict[str, str]]:
        """``count`` problems; the train and test splits use different seeds."""
        rng = random.Random(f"{self.seed}-{split}")
        rows = []
        for _ in range(count):
            prompt, answer = self.problem(rng)
            rows.append({"prompt": prompt, "ground_truth": answer, "data_source": "arithmetic"})
        return rows


def exact_match_reward(response: str, ground_truth: str) -> float:
    """1.0 when the response, up to the first non-answer character, equals the answer."""
    text = response.strip()
    end = 0
    while end < len(text) and (text[end].isdigit() or (end == 0 and text[end] == "-")):
        end += 1
    return 1.0 if text[:end] == ground_truth.strip() else 0.0


def write_prompts(rows: Sequence[dict[str, str]], path: str | pathlib.Path) -> pathlib.Path:
    """Write rows as parquet (``.parquet``) or JSON lines (``.jsonl``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), path)
    elif path.suffix == ".jsonl":
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        raise ValueError(f"data file {str(path)!r}: suffix must be .parquet or .jsonl")
    return path
