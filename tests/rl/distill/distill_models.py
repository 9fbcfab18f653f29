"""Tiny teacher/student checkpoints and arithmetic data for the distillation tests.

The teacher is pre-trained for a few dozen steps (it only has to be a fixed, non-uniform
distribution to distil from); the student is smaller and untrained. Both share the character
tokenizer, as distillation requires.
"""

from __future__ import annotations

import pathlib

import torch

from miniray.rl.models import char_tokenizer, pretrain, save, tiny_qwen2
from miniray.rl.tasks import ArithmeticTask, write_prompts

TASK = ArithmeticTask(max_operand=9)
STUDENT_SIZE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def make_models(root: pathlib.Path, *, teacher_steps: int = 40) -> dict[str, pathlib.Path]:
    torch.set_num_threads(1)
    tokenizer = char_tokenizer(TASK.alphabet)
    examples = [(r["prompt"], r["ground_truth"]) for r in TASK.rows(2000)]
    teacher = tiny_qwen2(tokenizer, seed=0)
    pretrain(teacher, tokenizer, examples, steps=teacher_steps, batch_size=64, lr=3e-3)
    student = tiny_qwen2(tokenizer, seed=1, **STUDENT_SIZE)
    return {
        "teacher": save(teacher, tokenizer, root / "teacher"),
        "student": save(student, tokenizer, root / "student"),
        "train": write_prompts(TASK.rows(256), root / "train.parquet"),
        "test": write_prompts(TASK.rows(16, split="test"), root / "test.parquet"),
    }
