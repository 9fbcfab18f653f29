"""Tools a multi-turn rollout may call: a registry read from a YAML file in verl's layout, and
calls with a deadline whose every failure becomes an error text for the model.

The file (``actor_rollout_ref.rollout.multi_turn.tool_config_path``)::

    tools:
      - class_name: miniray.rl.tasks.tool_use.calculator   # a callable, by its dotted path
        config: {type: native, timeout_s: 2.0}             # timeout_s: 10 s when absent
        tool_schema:                                       # the OpenAI function schema
          type: function
          function:
            name: calculator
            description: evaluates an arithmetic expression
            parameters:
              type: object
              properties: {expression: {type: string}}
              required: [expression]

verl's ``class_name`` names a ``BaseTool`` class with async create/execute/release (per-rollout
state, tool rewards); here it names a plain callable, called with the arguments as keywords,
whose return value (``str()`` of it) is the observation: stateless tools, on purpose (a tool
needing state keeps it itself). Every other difference is in the error handling, which the
model sees as text and the metrics count by kind (``ToolResult.error``):

* ``unknown_tool``: a name not in the registry;
* ``bad_arguments``: a required argument missing, one the schema does not list, or one of the
  wrong JSON type;
* ``raised``: the tool raised (verl: "Error when executing tool: ...");
* ``timeout``: no answer within the tool's ``timeout_s``;
* ``malformed``: the call itself could not be parsed (``tool_parser``).

Who waits for whom (``call_many``)::

    rollouter lane --start--> one daemon thread per call: tool(**arguments)
                   <--join, until each call's own deadline (start + timeout_s)
    a call still running then is abandoned (its daemon thread cannot be stopped from Python
    and keeps no process alive at shutdown); the model reads the timeout text.
"""

from __future__ import annotations

import importlib
import pathlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from miniray.rl.prompts import short_repr

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ERROR_KINDS",
    "Tool",
    "ToolCall",
    "ToolRegistry",
    "ToolResult",
    "load_tool_config",
]

DEFAULT_TIMEOUT_S = 10.0
ERROR_KINDS = ("unknown_tool", "bad_arguments", "raised", "timeout", "malformed")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What the model reads back (``text``) and, for a failed call, the kind of failure."""

    text: str
    error: str | None = None  # one of ERROR_KINDS, None for a call that answered

    @classmethod
    def failed(cls, kind: str, text: str) -> ToolResult:
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind {kind!r} is unknown: must be one of {ERROR_KINDS}")
        return cls(text=f"Error: {text}", error=kind)


@dataclass(frozen=True)
class Tool:
    """A callable with its schema (``tool_schema`` of the YAML) and its deadline."""

    name: str
    fn: Callable[..., Any]
    schema: Mapping[str, Any]
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"tool {self.name!r}: fn={self.fn!r} is not callable")
        if not self.timeout_s > 0:
            raise ValueError(f"tool {self.name!r}: timeout_s={self.timeout_s} must be > 0")

    @property
    def parameters(self) -> Mapping[str, Any]:
        return self.schema.get("function", {}).get("parameters", {}) or {}

    def argument_error(self, arguments: Mapping[str, Any]) -> str | None:
        """Why ``arguments`` do not fit the schema, or None: required ones present, none the
        schema does not list, each of its declared JSON type."""
        properties = self.parameters.get("properties", {}) or {}
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if missing:
            return f"missing argument {missing[0]!r}"
        for key, value in arguments.items():
            if properties and key not in properties:
                return f"unknown argument {key!r}; it takes {sorted(properties)}"
            kind = (properties.get(key) or {}).get("type")
            types = _JSON_TYPES.get(kind) if isinstance(kind, str) else None
            wrong_bool = isinstance(value, bool) and kind in ("integer", "number")
            if types is not None and (not isinstance(value, types) or wrong_bool):
                return f"argument {key!r}={short_repr(value)} must be a JSON {kind}"
        return None


class ToolRegistry:
    """The tools by name; ``call_many`` runs calls in parallel, each within its deadline."""

    def __init__(self, tools: Sequence[Tool]):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}: names must be unique")
            self.tools[tool.name] = tool

    @property
    def schemas(self) -> list[Mapping[str, Any]]:
        """The tools' schemas, as a chat template's ``tools=`` takes them."""
        return [tool.schema for tool in self.tools.values()]

    def check(self, call: ToolCall) -> tuple[Tool | None, ToolResult | None]:
        """The tool ``call`` names, or the result explaining why it cannot run."""
        tool = self.tools.get(call.name)
        if tool is None:
            names = ", ".join(sorted(self.tools)) or "none"
            return None, ToolResult.failed(
                "unknown_tool", f"unknown tool {call.name!r}; the tools are: {names}"
            )
        problem = tool.argument_error(call.arguments)
        if problem is not None:
            return None, ToolResult.failed(
                "bad_arguments", f"tool {call.name!r} was called wrongly: {problem}"
            )
        return tool, None

    def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Every call's result, in order: all start at once, each on its own daemon thread,
        and each is waited for until its own deadline (``Tool.timeout_s`` after the start)."""
        results: list[ToolResult | None] = [None] * len(calls)
        running: list[tuple[int, Tool, threading.Thread, float]] = []
        for i, call in enumerate(calls):
            tool, refused = self.check(call)
            if tool is None:
                results[i] = refused
                continue
            thread = threading.Thread(
                target=_run, args=(tool, call, results, i), name=f"tool-{tool.name}", daemon=True
            )
            thread.start()
            running.append((i, tool, thread, time.monotonic() + tool.timeout_s))
        # Each answer is decided once, here: an abandoned thread that finishes later writes
        # into ``results`` only, never into what the model is shown.
        answers = list(results)
        for i, tool, thread, deadline in running:
            thread.join(max(0.0, deadline - time.monotonic()))
            answer = results[i]
            if thread.is_alive() or answer is None:
                answer = ToolResult.failed(
                    "timeout", f"tool {tool.name!r} did not answer within {tool.timeout_s} s"
                )
            answers[i] = answer
        assert all(a is not None for a in answers)  # refused or run: every call has one
        return [a for a in answers if a is not None]

    def call(self, call: ToolCall) -> ToolResult:
        return self.call_many([call])[0]


def _run(tool: Tool, call: ToolCall, results: list[ToolResult | None], i: int) -> None:
    """One call on its thread; an exception becomes the error text (never a crash)."""
    try:
        value = tool.fn(**call.arguments)
        results[i] = ToolResult(text=value if isinstance(value, str) else str(value))
    except BaseException as exc:  # the model reads what went wrong, the rollouter goes on
        results[i] = ToolResult.failed(
            "raised", f"tool {tool.name!r} failed: {type(exc).__name__}: {exc}"
        )


def load_tool_config(path: str | pathlib.Path) -> ToolRegistry:
    """The registry a tool config file describes (module docstring); every rule it breaks is
    an error naming the file, the tool's index and the field."""
    import yaml

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"actor_rollout_ref.rollout.multi_turn.tool_config_path={str(path)!r} does not exist"
        )
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("tools") if isinstance(data, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: needs a non-empty list under 'tools'")
    return ToolRegistry([_tool_of(entry, f"{path}: tools[{i}]") for i, entry in enumerate(entries)])


def _tool_of(entry: Any, where: str) -> Tool:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} is {short_repr(entry)}: must be a mapping")
    unknown = set(entry) - {"class_name", "config", "tool_schema"}
    if unknown:
        raise ValueError(
            f"{where} has unknown keys {sorted(unknown)}: a tool has class_name, config and "
            "tool_schema"
        )
    fn = _import(entry.get("class_name"), f"{where}.class_name")
    config = entry.get("config") or {}
    if not isinstance(config, Mapping) or set(config) - {"type", "timeout_s"}:
        raise ValueError(
            f"{where}.config={short_repr(config)} is invalid: it may hold type (native) and "
            "timeout_s (seconds one call may take) only"
        )
    if config.get("type", "native") != "native":
        raise ValueError(
            f"{where}.config.type={config['type']!r} is refused: only 'native' (a Python "
            "callable in this process) is supported; verl's mcp and sandbox tools are not"
        )
    timeout_s = config.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise ValueError(f"{where}.config.timeout_s={timeout_s!r} must be a number > 0")
    schema: Mapping[str, Any] = entry.get("tool_schema") or {}
    function = schema.get("function") if isinstance(schema, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{where}.tool_schema={short_repr(schema)} is invalid: it needs function.name "
            "(the name the model calls the tool by)"
        )
    parameters = function.get("parameters", {}) if isinstance(function, Mapping) else {}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{where}.tool_schema.function.parameters must be a mapping")
    return Tool(name=name, fn=fn, schema=dict(schema), timeout_s=float(timeout_s))


def _import(dotted: Any, where: str) -> Callable[..., Any]:
    if not isinstance(dotted, str) or "." not in dotted:
        raise ValueError(
            f"{where}={dotted!r} is invalid: name a callable by its dotted path "
            "(package.module.function)"
        )
    module_name, _, attr = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{where}={dotted!r}: cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"{where}={dotted!r}: {module_name!r} has no callable {attr!r}")
    return fn
