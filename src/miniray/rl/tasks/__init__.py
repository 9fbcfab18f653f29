"""Synthetic tasks with rule-based rewards, generated locally (no data set is downloaded)."""

from miniray.rl.tasks.arithmetic import (
    ArithmeticTask,
    exact_match_reward,
    load_prompts,
    write_prompts,
)

__all__ = ["ArithmeticTask", "exact_match_reward", "load_prompts", "write_prompts"]
