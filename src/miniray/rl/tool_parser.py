"""Tool calls in a model's turn, in the one format this package reads: Hermes / Qwen2.5's

    <tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>

(several calls: several blocks). ``arguments`` is a JSON object, or a string holding one (the
OpenAI wire form). verl's ``HermesToolParser`` logs a malformed call and drops it; here it
becomes a ``malformed`` entry the agent loop answers with an error text, so the model learns
that the call failed instead of seeing nothing (and the metrics count it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from miniray.rl.prompts import short_repr
from miniray.rl.tools import ToolCall

__all__ = ["CALL_END", "CALL_START", "ParsedTurn", "parse_hermes"]

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_START) + r"(.*?)(?:" + re.escape(CALL_END) + r"|$)", re.DOTALL)


@dataclass
class ParsedTurn:
    """A turn's text outside the calls (``content``), its calls in order, and why each
    malformed one could not be read (in order of appearance)."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    @property
    def wants_tools(self) -> bool:
        """The turn asked for a tool, well-formed or not: the conversation goes on."""
        return bool(self.calls or self.malformed)


def parse_hermes(text: str) -> ParsedTurn:
    """The tool calls in ``text`` (module docstring); never raises on the model's output."""
    parsed = ParsedTurn(content=_BLOCK.sub("", text).strip())
    for match in _BLOCK.finditer(text):
        body = match.group(1)
        if not match.group(0).endswith(CALL_END):
            parsed.malformed.append(f"{CALL_START} without {CALL_END}")
            continue
        call, problem = _call_of(body.strip())
        if call is None:
            parsed.malformed.append(problem)
        else:
            parsed.calls.append(call)
    return parsed


def _call_of(body: str) -> tuple[ToolCall | None, str]:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return None, f"the call {short_repr(body)} is not JSON ({exc.msg})"
    if not isinstance(value, dict):
        return None, f"the call {short_repr(body)} must be a JSON object"
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None, f"the call {short_repr(body)} needs a 'name' (text)"
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return None, f"the arguments of {name!r} are not JSON ({exc.msg})"
    if not isinstance(arguments, dict):
        return None, f"the arguments of {name!r} must be a JSON object"
    return ToolCall(name=name, arguments=arguments), ""
