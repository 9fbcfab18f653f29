"""Synthetic tasks with rule-based rewards, generated locally (no data set is downloaded)."""

from miniray.rl.prompts import load_prompts  # the one reader of prompt files, re-exported
from miniray.rl.tasks.arithmetic import ArithmeticTask, exact_match_reward, write_prompts
from miniray.rl.tasks.tool_use import ToolUseTask, answer_reward

__all__ = [
    "ArithmeticTask",
    "ToolUseTask",
    "answer_reward",
    "exact_match_reward",
    "load_prompts",
    "write_prompts",
]
