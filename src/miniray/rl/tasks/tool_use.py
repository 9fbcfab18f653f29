"""Products of two 3-digit numbers, which a tiny model cannot compute but can look up with a
``calculator`` tool: the multi-turn demo's task (``python -m miniray.rl.demo --task tools``).

A solved conversation, as the chat template below renders it (one token per character, plus
one per fixed piece of the call format, as a BPE vocabulary would merge them)::

    <|user|>123*456=<|assistant|>                                            the prompt
    <tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call></s>
    <tool_response>56088</tool_response><|assistant|>                       the observation
    56088</s>                                                                the answer

``answer_reward`` scores the final answer only (the text after the last tool response): the
result of the tool, copied into the answer, earns the reward; a turn cut short or a last turn
that is still a call earns nothing. Rows carry ``data_source: tool_use``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from miniray.rl.tool_parser import CALL_END, CALL_START

__all__ = [
    "CALL_PREFIX",
    "CALL_SUFFIX",
    "CHAT_TEMPLATE",
    "TOOL_CONFIG",
    "ToolUseTask",
    "answer_reward",
    "calculator",
    "conversation_examples",
    "tool_tokenizer",
]

RESPONSE_START, RESPONSE_END = "<tool_response>", "</tool_response>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
CALL_PREFIX = '{"name": "calculator", "arguments": {"expression": "'
CALL_SUFFIX = '"}}'
# Roles as the template writes them; a tool message is its <tool_response> block.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}" + USER + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}" + ASSISTANT + "{{ m['content'] }}{{ eos_token }}"
    "{%- elif m['role'] == 'tool' -%}" + RESPONSE_START + "{{ m['content'] }}" + RESPONSE_END + ""
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)
# The tool config the demo writes next to its data (rl/tools.py's layout).
TOOL_CONFIG: dict[str, Any] = {
    "tools": [
        {
            "class_name": "miniray.rl.tasks.tool_use.calculator",
            "config": {"type": "native", "timeout_s": 2.0},
            "tool_schema": {
                "type": "function",
                "function": {
                    "name": "calculator",
                    "description": "the value of an integer expression a*b, a+b or a-b",
                    "parameters": {
                        "type": "object",
                        "properties": {"expression": {"type": "string"}},
                        "required": ["expression"],
                    },
                },
            },
        }
    ]
}
_EXPRESSION = re.compile(r"\s*(-?\d{1,12})\s*([*+-])\s*(-?\d{1,12})\s*")


def calculator(expression: str) -> str:
    """``a*b``, ``a+b`` or ``a-b`` of integers, as text; anything else raises ValueError
    (which the model reads back as a tool error)."""
    match = _EXPRESSION.fullmatch(expression)
    if match is None:
        raise ValueError(f"cannot evaluate {expression!r}: write a*b, a+b or a-b of integers")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return str(a * b if op == "*" else a + b if op == "+" else a - b)


def tool_tokenizer(extra_characters: str = "") -> Any:
    """The character tokenizer of the digits, ``*+-=`` and ``extra_characters``, plus one
    token per fixed piece of the chat and call format, with ``CHAT_TEMPLATE``. (The demo
    needs no letters: a tool error's text does not fit its 32 response tokens, so an error
    ends the conversation there; tests that read error texts add the letters.)"""
    from miniray.rl.models import char_tokenizer

    tokenizer = char_tokenizer("0123456789*+-=" + extra_characters)
    pieces = [USER, ASSISTANT, CALL_START, CALL_END, RESPONSE_START, RESPONSE_END]
    tokenizer.add_tokens([*pieces, CALL_PREFIX, CALL_SUFFIX])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def final_answer(conversation: str) -> str:
    """The text of the last model turn: after the last tool response and its assistant
    marker (the whole text when no tool answered)."""
    last = conversation.rsplit(RESPONSE_END, 1)[-1]
    return last.replace(ASSISTANT, "").strip()


def answer_reward(response: str, ground_truth: str) -> float:
    """1.0 when the final answer (``final_answer``) is exactly the product."""
    answer = final_answer(response)
    return 1.0 if CALL_START not in answer and answer == ground_truth.strip() else 0.0


@dataclass(frozen=True, kw_only=True)
class ToolUseTask:
    """``a*b`` with a and b of ``digits`` digits; train and test splits use different seeds."""

    digits: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise ValueError(f"ToolUseTask.digits={self.digits} must be in [1, 6]")

    def problem(self, rng: random.Random) -> tuple[str, str]:
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        a, b = rng.randint(low, high), rng.randint(low, high)
        return f"{a}*{b}", str(a * b)

    def rows(self, count: int, *, split: str = "train") -> list[dict[str, Any]]:
        """Rows with chat prompts (one user message ``a*b=``) and the product."""
        rng = random.Random(f"{self.seed}-{split}")
        rows = []
        for _ in range(count):
            expression, answer = self.problem(rng)
            rows.append(
                {
                    "prompt": [{"role": "user", "content": f"{expression}="}],
                    "ground_truth": answer,
                    "data_source": "tool_use",
                }
            )
        return rows


def conversation_examples(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    *,
    tool_fraction: float,
    seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """Supervised examples for the pre-training on the call format: (token ids, loss mask)
    with the loss on the assistant's tokens only. A ``tool_fraction`` of them call the
    calculator and copy its answer; the rest answer at once (a tiny model cannot multiply,
    so that path is mostly wrong: RL then has a better path to find)."""
    rng = random.Random(seed)
    examples = []
    for row in rows:
        messages = list(row["prompt"])
        expression = messages[-1]["content"].rstrip("=")
        answer = row["ground_truth"]
        if rng.random() < tool_fraction:
            call = f"{CALL_START}{CALL_PREFIX}{expression}{CALL_SUFFIX}{CALL_END}"
            messages += [
                {"role": "assistant", "content": call},
                {"role": "tool", "content": calculator(expression)},
            ]
        messages.append({"role": "assistant", "content": answer})
        examples.append(_with_loss_mask(tokenizer, messages))
    return examples


def _with_loss_mask(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` and a mask that is 1 on the assistant turns' tokens (their
    content and end of turn), found by rendering each prefix of the conversation."""
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        rendered = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        new = rendered[len(ids) :]
        if message["role"] == "assistant":
            head = len(
                _ids(
                    tokenizer.apply_chat_template(
                        messages[:i], tokenize=True, add_generation_prompt=True
                    )
                )
            )
            mask += [0] * (head - len(ids)) + [1] * (len(rendered) - head)
        else:
            mask += [0] * len(new)
        ids = rendered
    return ids, mask


def _ids(rendered: Any) -> list[int]:
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
