"""The agent loop: a rollout is a conversation in which the model calls tools.

The rollouter stays the driver (admission, partial rollouts, replicas, rewards, the queue);
this module decides, each time a model turn ends, whether the conversation goes on::

    rollouter lane: one engine call continues every unfinished conversation by one turn
        row ends with EOS ---> AgentLoop.end_turns: parse the turn's tool calls (Hermes),
                               run them (tools.ToolRegistry.call_many, each with a deadline),
                               append the results as observation tokens (tool role), or end
        row aborted by a pause: the turn's tokens stay, the next call (new weights) continues
        row cut by max_response_length: the conversation ends
    not ended -> the group stays unfinished; the lane's next call (any replica) continues it

Token in, token out: the model's tokens are kept as the engine returned them, with their
behaviour log-probs; an observation is the token ids the chat template gives the tool messages
(``observation_ids``), appended with mask 0 (``Sample.append_observation``), so no decoded
text is tokenized again. A conversation ends when a turn has no tool call (the answer), at
``max_assistant_turns``, or when ``max_response_length`` (model and observation tokens, as in
verl) has no room for the next observation or turn. ``v_start`` is the first turn's version;
a weight sync in between moves ``v_end`` only, as for a single-turn partial rollout.

Where this differs from verl's ``ToolAgentLoop`` on purpose:

* a malformed call is answered with an error text (verl drops it silently), and each error
  is counted by kind (``tools.ERROR_KINDS``);
* tools are plain callables, stateless (``tools``); the reward sees the whole conversation as
  text plus ``extra_info["tool_calls"]`` / ``["num_turns"]`` (verl passes ``num_turns``);
* a tool's answer longer than ``max_tool_response_length`` characters keeps its head (verl
  can keep the middle or the tail too).

As in verl, the tools' schemas are rendered into chat prompts by the template (``tools=``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from miniray.rl.rewards import RewardRequest
from miniray.rl.tool_parser import parse_hermes
from miniray.rl.tools import ERROR_KINDS, ToolCall, ToolRegistry, ToolResult, load_tool_config
from miniray.rl.types import Sample

__all__ = [
    "AgentLoop",
    "Conversation",
    "agent_loop_of",
    "conversation_metrics",
    "greedy_conversations",
    "record_conversations",
]

METADATA_KEY = "multi_turn"  # Sample.metadata: what the conversation did (``Conversation.summary``)
# A conversation the template is asked to continue: its rendering is the prefix the tool
# messages' rendering is cut from (``AgentLoop.observation_ids``).
_PREFIX: list[dict[str, str]] = [
    {"role": "user", "content": "1"},
    {"role": "assistant", "content": "2"},
]


@dataclass
class Conversation:
    """The agent state of one sample: where its current turn starts, what it did so far."""

    turn_start: int = 0  # index in response_token_ids where the current model turn begins
    assistant_turns: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    observation_tokens: int = 0
    ended: str | None = None  # answer | max_assistant_turns | length

    def record(self, call: ToolCall | None, result: ToolResult) -> None:
        self.calls.append(
            {
                "name": None if call is None else call.name,
                "arguments": None if call is None else dict(call.arguments),
                "result": result.text,
                "error": result.error,
            }
        )
        if result.error is not None:
            self.errors[result.error] = self.errors.get(result.error, 0) + 1

    def summary(self) -> dict[str, Any]:
        """What ``Sample.metadata["multi_turn"]`` holds (plain data: it travels with the
        sample to the trainer and the metrics)."""
        return {
            "assistant_turns": self.assistant_turns,
            "tool_calls": len(self.calls),
            "tool_errors": sum(self.errors.values()),
            "tool_errors_by_kind": dict(self.errors),
            "observation_tokens": self.observation_tokens,
            "ended": self.ended,
            "calls": list(self.calls),
        }


class AgentLoop:
    """Ends model turns: runs their tool calls and appends the observations (module doc)."""

    def __init__(
        self,
        registry: ToolRegistry,
        tokenizer: Any,
        *,
        max_assistant_turns: int | None = None,
        max_parallel_calls: int = 1,
        max_tool_response_length: int = 256,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "actor_rollout_ref.rollout.multi_turn.enable=true needs a tokenizer with a "
                "chat_template that renders the 'tool' role (tool results are appended in it); "
                "the tokenizer of actor_rollout_ref.model.path has none"
            )
        self.registry = registry
        self.tokenizer = tokenizer
        self.max_assistant_turns = max_assistant_turns
        self.max_parallel_calls = max_parallel_calls
        self.max_tool_response_length = max_tool_response_length
        self._prefix_ids = self._render(_PREFIX, generation_prompt=False)
        # A template that cannot append tool results, or drops them, fails now, not mid-run.
        if self.observation_ids(["1"]) == self.observation_ids(["2"]):
            raise ValueError(
                "the chat template of actor_rollout_ref.model.path renders no 'tool' role "
                "messages (two different tool results give the same tokens): the model would "
                "never see a tool's answer; use a template with a tool role"
            )

    # -- observations ----------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True
        )
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def observation_ids(self, texts: Sequence[str]) -> list[int]:
        """Token ids of tool answers ``texts`` as the chat template renders them in the tool
        role, followed by the generation prompt of the next assistant turn: the template's
        rendering of a conversation ending in these tool messages, less its rendering of the
        conversation before them (verl cuts a system prompt off the same way)."""
        messages = [{"role": "tool", "content": text} for text in texts]
        full = self._render([*_PREFIX, *messages], generation_prompt=True)
        prefix = self._prefix_ids
        if full[: len(prefix)] != prefix:
            raise ValueError(
                "the chat template of actor_rollout_ref.model.path renders a conversation "
                "differently once tool messages follow it (its first tokens change), so the "
                "tool results cannot be appended as tokens: use a template whose rendering of "
                "earlier messages does not depend on later ones"
            )
        return full[len(prefix) :]

    def _shown(self, text: str) -> str:
        limit = self.max_tool_response_length
        return text if len(text) <= limit else text[:limit] + "...(truncated)"

    # -- turns -----------------------------------------------------------------------------
    def end_turns(
        self,
        turns: Sequence[tuple[Sample, Conversation, bool]],
        *,
        max_response_length: int,
    ) -> list[bool]:
        """For each ``(sample, conversation, ended_with_eos)`` whose model turn just ended
        (with EOS, or cut by the length budget): True when the conversation is over. The
        tools of every turn here run at once; each continuing sample gets its observation."""
        done: list[bool] = []
        pending: list[tuple[int, list[ToolCall | None], list[ToolResult | None]]] = []
        for index, (sample, conv, eos) in enumerate(turns):
            conv.assistant_turns += 1
            text = self.tokenizer.decode(sample.response_token_ids[conv.turn_start :])
            parsed = parse_hermes(text)
            ended = None
            if not eos:
                ended = "length"
            elif not parsed.wants_tools:
                ended = "answer"
            elif self.max_assistant_turns and conv.assistant_turns >= self.max_assistant_turns:
                ended = "max_assistant_turns"
            conv.ended = ended
            done.append(ended is not None)
            if ended is None:
                calls: list[ToolCall | None] = list(parsed.calls[: self.max_parallel_calls])
                results: list[ToolResult | None] = [None] * len(calls)
                for problem in parsed.malformed[: self.max_parallel_calls - len(calls)]:
                    calls.append(None)
                    results.append(
                        ToolResult.failed("malformed", f"malformed tool call: {problem}")
                    )
                pending.append((index, calls, results))
        to_run = [c for _, calls, _ in pending for c in calls if c is not None]
        answers = iter(self.registry.call_many(to_run))
        for index, calls, results in pending:
            sample, conv, _ = turns[index]
            filled = [r if r is not None else next(answers) for r in results]
            for call, result in zip(calls, filled):
                conv.record(call, result)
            observation = self.observation_ids([self._shown(r.text) for r in filled])
            # verl's rule: no room for the observation and a next turn ends the conversation.
            if sample.num_response_tokens + len(observation) >= max_response_length:
                conv.ended = "length"
                done[index] = True
                continue
            sample.append_observation(observation)
            conv.observation_tokens += len(observation)
            conv.turn_start = sample.num_response_tokens
        return done


def agent_loop_of(config: Any, tokenizer: Any) -> AgentLoop | None:
    """The agent loop ``actor_rollout_ref.rollout.multi_turn`` asks for, None when disabled.
    A multi-turn key set while disabled is refused: it would do nothing."""
    mt = config.actor_rollout_ref.rollout.multi_turn
    if not mt.enable:
        defaults = type(mt)()
        for name in (f.name for f in dataclasses.fields(mt) if f.name != "enable"):
            if getattr(mt, name) != getattr(defaults, name):
                raise ValueError(
                    f"{mt.key(name)}={getattr(mt, name)!r} does nothing while "
                    f"{mt.key('enable')}=false: set {mt.key('enable')}=true or drop it"
                )
        return None
    if mt.format != "hermes":
        raise ValueError(f"{mt.key('format')}={mt.format!r} is refused: only 'hermes' is read")
    if not mt.tool_config_path:
        raise ValueError(
            f"{mt.key('enable')}=true needs {mt.key('tool_config_path')}: the YAML file "
            "describing the tools (rl/tools.py)"
        )
    return AgentLoop(
        load_tool_config(mt.tool_config_path),
        tokenizer,
        max_assistant_turns=mt.max_assistant_turns,
        max_parallel_calls=mt.max_parallel_calls,
        max_tool_response_length=mt.max_tool_response_length,
    )


def greedy_conversations(
    agent: AgentLoop,
    generate: Callable[[list[list[int]], int], list[list[int]]],
    prompts: Sequence[list[int]],
    *,
    eos_token_id: int,
    max_response_length: int,
) -> list[tuple[Sample, Conversation]]:
    """Run whole conversations for ``prompts`` with ``generate(ids, max_new_tokens)`` (greedy
    token ids, EOS included when reached): the held-out evaluation of a multi-turn run. Each
    round continues every open conversation by one turn."""
    samples = [Sample(prompt_token_ids=list(p), response_token_ids=[], v_start=0) for p in prompts]
    convs = [Conversation() for _ in prompts]
    open_rows = list(range(len(prompts)))
    while open_rows:
        budgets = [max_response_length - samples[i].num_response_tokens for i in open_rows]
        outs = generate(
            [samples[i].prompt_token_ids + samples[i].response_token_ids for i in open_rows],
            max(budgets),
        )
        turns = []
        for i, budget, tokens in zip(open_rows, budgets, outs):
            tokens = list(tokens[:budget])
            samples[i].append_tokens(tokens, None, 0)
            turns.append((samples[i], convs[i], bool(tokens) and tokens[-1] == eos_token_id))
        done = agent.end_turns(turns, max_response_length=max_response_length)
        open_rows = [i for i, d in zip(open_rows, done) if not d]
    return list(zip(samples, convs))


def record_conversations(
    requests: Sequence[RewardRequest], samples: Sequence[Sample], convs: Sequence[Conversation]
) -> list[RewardRequest]:
    """Record each finished conversation on its sample (``metadata["multi_turn"]``) and return
    the reward requests with what it did in ``extra_info``: ``tool_calls`` (name, arguments,
    result, error of each) and ``num_turns`` (model turns)."""
    out = []
    for request, sample, conv in zip(requests, samples, convs, strict=True):
        sample.metadata[METADATA_KEY] = conv.summary()
        extra = {**request.extra_info, "tool_calls": list(conv.calls)}
        extra["num_turns"] = conv.assistant_turns
        out.append(dataclasses.replace(request, extra_info=extra))
    return out


def conversation_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """Means over ``samples`` of what their conversations did, as ``multi_turn/<name>``: model
    turns, tool calls and errors per conversation (errors by kind too), observation tokens;
    empty for single-turn samples."""
    summaries = [s.metadata[METADATA_KEY] for s in samples if METADATA_KEY in s.metadata]
    if not summaries:
        return {}
    n = len(summaries)
    metrics = {
        f"multi_turn/{key}": sum(s[key] for s in summaries) / n
        for key in ("assistant_turns", "tool_calls", "tool_errors", "observation_tokens")
    }
    for kind in ERROR_KINDS:
        metrics[f"multi_turn/tool_errors_{kind}"] = (
            sum(s["tool_errors_by_kind"].get(kind, 0) for s in summaries) / n
        )
    metrics["multi_turn/answered_fraction"] = sum(s["ended"] == "answer" for s in summaries) / n
    return metrics
