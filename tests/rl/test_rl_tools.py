"""Tools: the YAML registry, calls with a deadline, every failure an error text of its kind;
the Hermes call parser on well-formed and malformed turns."""

from __future__ import annotations

import threading
import time

import pytest

from miniray.rl.tool_parser import parse_hermes
from miniray.rl.tools import Tool, ToolCall, ToolRegistry, load_tool_config

SCHEMA = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "adds two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
RELEASE = threading.Event()


def add(a, b):
    return a + b


def divide(a, b):
    return a // b


def hang(a, b):
    RELEASE.wait(60)  # released at the end of the test that hangs it
    return "late"


def schema_named(name):
    return {**SCHEMA, "function": {**SCHEMA["function"], "name": name}}


@pytest.fixture
def registry():
    return ToolRegistry(
        [
            Tool(name="add", fn=add, schema=SCHEMA),
            Tool(name="divide", fn=divide, schema=schema_named("divide")),
            Tool(name="hang", fn=hang, schema=schema_named("hang"), timeout_s=0.2),
        ]
    )


def test_a_call_answers_with_the_tools_value_as_text(registry):
    result = registry.call(ToolCall("add", {"a": 2, "b": 40}))
    assert (result.text, result.error) == ("42", None)


@pytest.mark.parametrize(
    ("call", "kind", "text"),
    [
        (ToolCall("divide", {"a": 1, "b": 0}), "raised", "ZeroDivisionError"),
        (ToolCall("nope", {}), "unknown_tool", "unknown tool 'nope'; the tools are: add, divide"),
        (ToolCall("add", {"a": 1}), "bad_arguments", "missing argument 'b'"),
        (ToolCall("add", {"a": 1, "b": 2, "c": 3}), "bad_arguments", "unknown argument 'c'"),
        (ToolCall("add", {"a": "1", "b": 2}), "bad_arguments", "must be a JSON integer"),
        (ToolCall("add", {"a": True, "b": 2}), "bad_arguments", "must be a JSON integer"),
    ],
)
def test_every_failure_is_an_error_text_of_its_kind(registry, call, kind, text):
    result = registry.call(call)
    assert result.error == kind
    assert result.text.startswith("Error: ") and text in result.text


def test_a_hung_tool_times_out_without_holding_the_others(registry):
    try:
        started = time.monotonic()
        results = registry.call_many(
            [ToolCall("hang", {"a": 1, "b": 2}), ToolCall("add", {"a": 1, "b": 2})]
        )
        took = time.monotonic() - started
        assert results[0].error == "timeout"
        assert "did not answer within 0.2 s" in results[0].text
        assert results[1].text == "3"
        assert took < 2.0  # the deadline, not the hang (60 s)
        hung = [t for t in threading.enumerate() if t.name == "tool-hang"]
        assert hung and all(t.daemon for t in hung)  # cannot keep the process alive
    finally:
        RELEASE.set()


def test_yaml_tool_config_builds_the_registry(tmp_path):
    path = tmp_path / "tools.yaml"
    path.write_text(
        """
tools:
  - class_name: test_rl_tools.add
    config: {type: native, timeout_s: 0.5}
    tool_schema:
      type: function
      function:
        name: add
        parameters:
          type: object
          properties: {a: {type: integer}, b: {type: integer}}
          required: [a, b]
"""
    )
    registry = load_tool_config(path)
    assert registry.tools["add"].timeout_s == 0.5
    assert registry.schemas[0]["function"]["name"] == "add"
    assert registry.call(ToolCall("add", {"a": 1, "b": 1})).text == "2"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("tools: []", "non-empty list under 'tools'"),
        ("tools: [{class_name: nomodule.fn, tool_schema: {function: {name: x}}}]", "import"),
        ("tools: [{class_name: test_rl_tools.missing}]", "no callable 'missing'"),
        ("tools: [{class_name: test_rl_tools.add, tool_schema: {}}]", "function.name"),
        ("tools: [{class_name: test_rl_tools.add, config: {type: mcp}}]", "only 'native'"),
        ("tools: [{class_name: test_rl_tools.add, config: {timeout_s: 0}}]", "timeout_s=0"),
        ("tools: [{class_name: test_rl_tools.add, extra: 1}]", "unknown keys \\['extra'\\]"),
    ],
)
def test_bad_tool_configs_name_the_file_the_tool_and_the_field(tmp_path, text, pattern):
    path = tmp_path / "tools.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=pattern) as info:
        load_tool_config(path)
    assert str(path) in str(info.value)


def test_parser_reads_hermes_calls_and_the_text_around_them():
    turn = (
        'Let me compute. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call></s>'
    )
    parsed = parse_hermes(turn)
    assert parsed.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 3, "b": 4})]
    assert parsed.content == "Let me compute. </s>"
    assert not parsed.malformed and parsed.wants_tools
    answer = parse_hermes("the answer is 3</s>")
    assert not answer.wants_tools and answer.content == "the answer is 3</s>"


@pytest.mark.parametrize(
    ("turn", "problem"),
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1}', "without </tool_call>"),
        ("<tool_call>{name: add}</tool_call>", "is not JSON"),
        ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', "needs a 'name'"),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>', "are not JSON"),
    ],
)
def test_parser_reports_each_malformed_call(turn, problem):
    parsed = parse_hermes(turn)
    assert parsed.calls == [] and parsed.wants_tools
    assert len(parsed.malformed) == 1 and problem in parsed.malformed[0]
