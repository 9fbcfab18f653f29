"""The agent loop: conversations with tool calls through the rollouter, token in / token out,
tool failures as error texts, the turn and length caps, a weight sync between turns."""

from __future__ import annotations

import string
import threading
import time

import pytest
import yaml

from miniray.rl.engines.base import Generation
from miniray.rl.models import save, tiny_qwen2
from miniray.rl.multi_turn import (
    AgentLoop,
    Conversation,
    agent_loop_of,
    conversation_metrics,
    record_conversations,
)
from miniray.rl.queue import MessageQueue
from miniray.rl.rewards import RewardRequest
from miniray.rl.rollouter import FullyAsyncRollouter
from miniray.rl.tasks import write_prompts
from miniray.rl.tasks.tool_use import (
    ASSISTANT,
    CALL_PREFIX,
    CALL_SUFFIX,
    RESPONSE_END,
    RESPONSE_START,
    TOOL_CONFIG,
    ToolUseTask,
    answer_reward,
    tool_tokenizer,
)
from miniray.rl.tool_parser import CALL_END, CALL_START
from miniray.rl.tools import Tool, ToolRegistry
from miniray.rl.types import Sample

TASK = ToolUseTask(digits=3)
RELEASE = threading.Event()


def fails(expression):
    raise RuntimeError("the calculator is broken")


def hangs(expression):
    RELEASE.wait(60)
    return "late"


@pytest.fixture(scope="module")
def tokenizer():
    return tool_tokenizer(string.ascii_letters + " '.:()_,;/{}[]\"")  # texts readable


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("multi_turn")
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(40), root / "train.jsonl")
    (root / "tools.yaml").write_text(yaml.safe_dump(TOOL_CONFIG))
    return root


def config(workdir, *, max_response_length=40, **multi_turn):
    return {
        "data": {
            "train_files": [str(workdir / "train.jsonl")],
            "train_batch_size": 2,
            "max_prompt_length": 16,
            "max_response_length": max_response_length,
        },
        "actor_rollout_ref": {
            "model": {"path": str(workdir / "model")},
            "rollout": {
                "n": 2,
                "multi_turn": {
                    "enable": True,
                    "tool_config_path": str(workdir / "tools.yaml"),
                    **multi_turn,
                },
            },
        },
        "async_training": {
            "max_queue_size": 8,
            "generation_timeout": 60,
            "max_concurrent_rollouts": 2,  # one group per call
        },
        "trainer": {"total_training_steps": 2},
    }


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def solve(tokenizer, context):
    """A model that solves the task: call the calculator with the prompt's expression, then
    copy its answer."""
    text = tokenizer.decode(context)
    if RESPONSE_END not in text:
        expression = text.split("<|user|>")[1].split("=")[0]
        turn = f"{CALL_START}{CALL_PREFIX}{expression}{CALL_SUFFIX}{CALL_END}"
    else:
        turn = text.rsplit(RESPONSE_START, 1)[1].split(RESPONSE_END)[0]
    return [*ids(tokenizer, turn), tokenizer.eos_token_id]


def always_call(tokenizer, context):
    turn = f"{CALL_START}{CALL_PREFIX}1*2{CALL_SUFFIX}{CALL_END}"
    return [*ids(tokenizer, turn), tokenizer.eos_token_id]


class ScriptedEngine:
    """Plays a model turn by turn: ``script(tokenizer, context)`` gives the whole current turn
    from the context before it; a turn cut by a pause continues where it stopped. One token
    per ``delay`` seconds for every row at once; a token's log-prob is minus the tag of the
    weights that made it."""

    def __init__(self, tokenizer, script, delay=0.0):
        self.tokenizer, self.script, self.delay = tokenizer, script, delay
        self.tag = 0
        self.assistant = tokenizer.convert_tokens_to_ids(ASSISTANT)
        self.calls = 0

    def remaining(self, context):
        start = len(context) - context[::-1].index(self.assistant)  # after the last marker
        return self.script(self.tokenizer, context[:start])[len(context) - start :]

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None, **_):
        self.calls += 1
        todo = [self.remaining(list(p)) for p in prompts]
        made = [[] for _ in prompts]
        aborted = False
        for _step in range(max_new_tokens):
            if should_stop is not None and should_stop():
                aborted = True
                break
            if all(len(m) == len(t) for m, t in zip(made, todo)):
                break
            time.sleep(self.delay)
            for m, t in zip(made, todo):
                if len(m) < len(t):
                    m.append(t[len(m)])
        out = []
        for p, m, t in zip(prompts, made, todo):
            reason = "stop" if len(m) == len(t) else "aborted" if aborted else "length"
            out.append(
                Generation(
                    prompt_token_ids=list(p),
                    response_token_ids=m,
                    response_logprobs=[-float(self.tag)] * len(m),
                    finish_reason=reason,
                )
            )
        return out

    def load_weights(self, state_dict, *, take=False):
        self.tag = state_dict["tag"]


def test_observations_are_the_templates_tool_role_and_generation_prompt(tokenizer):
    agent = AgentLoop(ToolRegistry([]), tokenizer)
    expected = ids(tokenizer, f"{RESPONSE_START}56088{RESPONSE_END}{ASSISTANT}")
    assert agent.observation_ids(["56088"]) == expected
    assert len(expected) == 8  # one token per piece of the format, one per digit


def test_a_conversation_calls_the_tool_and_answers_with_its_result(workdir, tokenizer):
    rollouter = FullyAsyncRollouter(
        config(workdir),
        MessageQueue(max_queue_size=10),
        engine=ScriptedEngine(tokenizer, solve),
        reward_fn=answer_reward,
    )
    (group,) = rollouter.generate_groups(1, version=0)
    row = rollouter.prompts.rows[rollouter.prompts.order.row(0)]
    expression, product = row["prompt"][0]["content"].rstrip("="), row["ground_truth"]
    call = ids(tokenizer, f"{CALL_START}{CALL_PREFIX}{expression}{CALL_SUFFIX}{CALL_END}")
    observation = ids(tokenizer, f"{RESPONSE_START}{product}{RESPONSE_END}{ASSISTANT}")
    answer = ids(tokenizer, product)
    eos = tokenizer.eos_token_id
    for sample in group:
        # Token in, token out: the engine's tokens, the template's observation, nothing else.
        assert sample.response_token_ids == [*call, eos, *observation, *answer, eos]
        assert sample.response_mask == [1] * (len(call) + 1) + [0] * len(observation) + [1] * (
            len(answer) + 1
        )
        assert sample.num_generated_tokens == len(call) + len(answer) + 2
        assert sample.reward == 1.0
        summary = sample.metadata["multi_turn"]
        assert summary["assistant_turns"] == 2 and summary["tool_calls"] == 1
        assert summary["tool_errors"] == 0 and summary["ended"] == "answer"
        assert summary["calls"][0]["arguments"] == {"expression": expression}
        assert summary["calls"][0]["result"] == product
    stats = rollouter.get_statistics()
    assert stats["tool_calls"] == 2 and stats["tool_errors"] == 0
    assert stats["replicas"][0]["tokens"] == 2 * (len(call) + len(answer) + 2)  # no observations
    metrics = conversation_metrics(group)
    assert metrics["multi_turn/tool_calls"] == 1.0
    assert metrics["multi_turn/observation_tokens"] == len(observation)


def conversation_with(tokenizer, turn_text):
    sample = Sample(prompt_token_ids=[1, 2], response_token_ids=[], v_start=0)
    sample.append_tokens([*ids(tokenizer, turn_text), tokenizer.eos_token_id], None, 0)
    return sample, Conversation()


def test_tool_timeout_error_and_malformed_call_come_back_as_error_texts(tokenizer):
    schema = TOOL_CONFIG["tools"][0]["tool_schema"]
    registry = ToolRegistry(
        [
            Tool(name="calculator", fn=fails, schema=schema),
            Tool(name="slow", fn=hangs, schema=schema, timeout_s=0.2),
        ]
    )
    agent = AgentLoop(registry, tokenizer, max_tool_response_length=200)
    call = f"{CALL_START}{CALL_PREFIX}1*2{CALL_SUFFIX}{CALL_END}"
    turns = [
        conversation_with(tokenizer, call),
        conversation_with(tokenizer, call.replace("calculator", "slow")),
        conversation_with(tokenizer, f"{CALL_START}12*{CALL_END}"),  # not JSON
    ]
    try:
        done = agent.end_turns([(s, c, True) for s, c in turns], max_response_length=500)
    finally:
        RELEASE.set()
    assert done == [False, False, False]  # each goes on: the model reads the error
    for (sample, conv), kind, text in zip(
        turns,
        ["raised", "timeout", "malformed"],
        ["RuntimeError: the calculator is broken", "did not answer within 0.2 s", "is not JSON"],
    ):
        assert conv.errors == {kind: 1}
        observation = [t for t, m in zip(sample.response_token_ids, sample.response_mask) if not m]
        shown = tokenizer.decode(observation)
        assert shown.startswith(f"{RESPONSE_START}Error: ")
        assert text in shown
        assert conv.summary()["tool_errors"] == 1
    for sample, conv in turns:
        sample.metadata["multi_turn"] = conv.summary()
    metrics = conversation_metrics([sample for sample, _ in turns])
    assert metrics["multi_turn/tool_errors"] == 1.0
    assert metrics["multi_turn/tool_errors_timeout"] == pytest.approx(1 / 3)


def calculator_registry():
    from miniray.rl.tasks.tool_use import calculator

    return ToolRegistry(
        [Tool(name="calculator", fn=calculator, schema=TOOL_CONFIG["tools"][0]["tool_schema"])]
    )


def test_max_parallel_calls_runs_the_first_calls_of_a_turn(tokenizer):
    turn = "".join(
        f"{CALL_START}{CALL_PREFIX}{e}{CALL_SUFFIX}{CALL_END}" for e in ("2*3", "4*5", "6*7")
    )
    for limit, shown in ((1, ["6"]), (2, ["6", "20"])):
        agent = AgentLoop(calculator_registry(), tokenizer, max_parallel_calls=limit)
        sample, conv = conversation_with(tokenizer, turn)
        assert agent.end_turns([(sample, conv, True)], max_response_length=500) == [False]
        assert [c["result"] for c in conv.calls] == shown
        observation = [t for t, m in zip(sample.response_token_ids, sample.response_mask) if not m]
        assert observation == agent.observation_ids(shown)


def test_long_tool_answers_are_cut_to_max_tool_response_length(tokenizer):
    agent = AgentLoop(calculator_registry(), tokenizer, max_tool_response_length=4)
    sample, conv = conversation_with(
        tokenizer, f"{CALL_START}{CALL_PREFIX}123456*1000{CALL_SUFFIX}{CALL_END}"
    )
    agent.end_turns([(sample, conv, True)], max_response_length=500)
    observation = [t for t, m in zip(sample.response_token_ids, sample.response_mask) if not m]
    assert tokenizer.decode(observation) == (
        f"{RESPONSE_START}1234...(truncated){RESPONSE_END}{ASSISTANT}"
    )
    assert conv.calls[0]["result"] == "123456000"  # the whole answer is recorded


def test_the_turn_cap_ends_a_conversation(workdir, tokenizer):
    rollouter = FullyAsyncRollouter(
        config(workdir, max_response_length=200, max_assistant_turns=3),
        MessageQueue(max_queue_size=10),
        engine=ScriptedEngine(tokenizer, always_call),
        reward_fn=answer_reward,
    )
    (group,) = rollouter.generate_groups(1, version=0)
    for sample in group:
        summary = sample.metadata["multi_turn"]
        assert summary["ended"] == "max_assistant_turns"
        assert summary["assistant_turns"] == 3 and summary["tool_calls"] == 2
        assert sample.reward == 0.0  # the last turn is a call, not an answer
    assert rollouter.engine.calls == 3


def test_the_length_cap_ends_a_conversation_without_a_cut_observation(workdir, tokenizer):
    call_turn = len(always_call(tokenizer, []))
    observation = len(ids(tokenizer, f"{RESPONSE_START}2{RESPONSE_END}{ASSISTANT}"))
    # Two turns and one observation fit; the second observation would reach the limit.
    limit = 2 * call_turn + 2 * observation
    rollouter = FullyAsyncRollouter(
        config(workdir, max_response_length=limit),
        MessageQueue(max_queue_size=10),
        engine=ScriptedEngine(tokenizer, always_call),
        reward_fn=answer_reward,
    )
    (group,) = rollouter.generate_groups(1, version=0)
    for sample in group:
        assert sample.metadata["multi_turn"]["ended"] == "length"
        assert sample.num_response_tokens == 2 * call_turn + observation
        assert sample.response_mask[-1] == 1  # ends with the model's turn, no cut observation
        assert sample.metadata["multi_turn"]["tool_calls"] == 2


def run_with_one_sync(workdir, tokenizer, *, partial):
    """The async loop, paused in the first turn of the first conversations for a weight sync
    (tag 1: the new weights' tokens have log-prob -1); returns the first group queued."""
    engine = ScriptedEngine(tokenizer, solve, delay=0.02)
    queue = MessageQueue(max_queue_size=100, staleness_threshold=3)
    cfg = config(workdir)
    cfg["async_training"]["partial_rollout"] = partial
    rollouter = FullyAsyncRollouter(cfg, queue, engine=engine, reward_fn=answer_reward)
    rollouter.start()
    try:
        time.sleep(0.1)  # a few tokens of the first turn made
        assert rollouter.pause_rollout(timeout=5) is True
        rollouter.load_weights({"tag": 1}, 1)
        rollouter.resume_rollout()
        deadline = time.monotonic() + 20
        while queue.get_queue_size() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        rollouter.stop()
    return queue.get_samples(current_param_version=1), rollouter.get_statistics()


def test_a_conversation_continues_across_a_weight_sync(workdir, tokenizer):
    group, stats = run_with_one_sync(workdir, tokenizer, partial=True)
    assert stats["groups_partial"] >= 1 and stats["groups_aborted"] == 0
    for sample in group:
        assert (sample.v_start, sample.v_end) == (0, 1)
        assert sample.reward == 1.0 and sample.metadata["multi_turn"]["tool_calls"] == 1
        model = [lp for lp, m in zip(sample.response_logprobs, sample.response_mask) if m]
        before = model.count(-0.0)
        # The first turn's first tokens came from the old weights, the rest from the new.
        assert 1 <= before < len(model) and model == [-0.0] * before + [-1.0] * (
            len(model) - before
        )
        observed = [lp for lp, m in zip(sample.response_logprobs, sample.response_mask) if not m]
        assert observed and set(observed) == {0.0}


def test_without_partial_rollouts_a_conversation_is_made_by_one_version(workdir, tokenizer):
    group, stats = run_with_one_sync(workdir, tokenizer, partial=False)
    assert stats["groups_aborted"] >= 1 and stats["groups_partial"] == 0
    for sample in group:
        assert (sample.v_start, sample.v_end) == (1, 1)
        assert sample.metadata["prompt_position"] == 0  # the same prompt, issued again
        assert sample.reward == 1.0
        model = [lp for lp, m in zip(sample.response_logprobs, sample.response_mask) if m]
        assert set(model) == {-1.0}


def test_the_reward_sees_the_calls_and_the_turns():
    conv = Conversation(assistant_turns=2)
    from miniray.rl.tools import ToolCall, ToolResult

    conv.record(ToolCall("calculator", {"expression": "2*3"}), ToolResult(text="6"))
    sample = Sample(prompt_token_ids=[1], response_token_ids=[], v_start=0)
    request = RewardRequest(solution_str="...", ground_truth="6", extra_info={"index": 4})
    (out,) = record_conversations([request], [sample], [conv])
    assert out.extra_info["index"] == 4 and out.extra_info["num_turns"] == 2
    assert out.extra_info["tool_calls"] == [
        {"name": "calculator", "arguments": {"expression": "2*3"}, "result": "6", "error": None}
    ]
    assert sample.metadata["multi_turn"]["tool_calls"] == 1


def test_multi_turn_keys_are_refused_while_disabled_and_enable_needs_tools(workdir, tokenizer):
    from miniray.rl.config_loading import load_rl_config

    base = [
        f"data.train_files=[{workdir / 'train.jsonl'}]",
        f"actor_rollout_ref.model.path={workdir / 'model'}",
    ]
    assert agent_loop_of(load_rl_config(overrides=base), tokenizer) is None
    cfg = load_rl_config(
        overrides=[*base, "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3"]
    )
    with pytest.raises(ValueError, match="max_assistant_turns=3 does nothing while"):
        agent_loop_of(cfg, tokenizer)
    cfg = load_rl_config(overrides=[*base, "actor_rollout_ref.rollout.multi_turn.enable=true"])
    with pytest.raises(
        ValueError, match=r"needs actor_rollout_ref\.rollout\.multi_turn\.tool_config"
    ):
        agent_loop_of(cfg, tokenizer)
    from miniray.rl.models import char_tokenizer

    cfg = load_rl_config(
        overrides=[
            *base,
            "actor_rollout_ref.rollout.multi_turn.enable=true",
            f"actor_rollout_ref.rollout.multi_turn.tool_config_path={workdir / 'tools.yaml'}",
        ]
    )
    assert agent_loop_of(cfg, tokenizer).registry.tools.keys() == {"calculator"}
    with pytest.raises(ValueError, match="chat_template"):
        agent_loop_of(cfg, char_tokenizer("0123"))


class ScriptedEngines:
    """One ``ScriptedEngine`` per replica, each recording the prompts of the turns it made."""

    def __init__(self, tokenizer, delays):
        self.tokenizer, self.delays, self.made = tokenizer, delays, []

    def __call__(self, index):
        engine = ScriptedEngine(self.tokenizer, solve, delay=self.delays[index])
        original = engine.generate
        engine.turns = []

        def generate(prompts, **kwargs):
            engine.turns.extend(tuple(p) for p in prompts)
            return original(prompts, **kwargs)

        engine.generate = generate
        self.made.append(engine)
        return engine


@pytest.fixture
def inline_runtime():
    import miniray

    miniray.init(backend="inline")
    yield
    miniray.shutdown()


def test_conversations_over_two_replicas_finish_once_each(inline_runtime, workdir, tokenizer):
    """Any replica continues any open conversation (the unfinished list is shared): every
    conversation still ends with its answer, and every prompt is generated exactly once."""
    cfg = config(workdir)
    cfg["rollout"] = {"n_gpus_per_node": 2, "device": "cpu"}
    factory = ScriptedEngines(tokenizer, [0.002, 0.004])
    queue = MessageQueue(max_queue_size=100, staleness_threshold=3)
    rollouter = FullyAsyncRollouter(cfg, queue, engine_factory=factory, reward_fn=answer_reward)
    rollouter.start()
    try:
        deadline = time.monotonic() + 30
        while queue.get_queue_size() < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        rollouter.stop()
    groups = [queue.get_samples(current_param_version=0) for _ in range(6)]
    positions = sorted(g[0].metadata["prompt_position"] for g in groups)
    assert positions == sorted(set(positions)) and len(positions) == 6
    for group in groups:
        for sample in group:
            assert sample.reward == 1.0
            assert sample.metadata["multi_turn"]["tool_calls"] == 1
            product = sample.metadata["multi_turn"]["calls"][0]["result"]
            assert sample.response_mask.count(0) == len(product) + 3  # one observation
    assert all(engine.turns for engine in factory.made)  # both replicas made turns


def test_the_tools_schemas_are_rendered_into_chat_prompts(tmp_path, workdir, tokenizer):
    """As verl does: the chat template gets the tools (Qwen2.5's lists them in its system
    prompt); here a template that writes each tool's name first."""
    from miniray.rl.tasks.tool_use import CHAT_TEMPLATE

    listing = tool_tokenizer(string.ascii_letters + "[]")
    listing.chat_template = (
        "{%- for t in tools or [] -%}[{{ t['function']['name'] }}]{%- endfor -%}" + CHAT_TEMPLATE
    )
    save(tiny_qwen2(listing, hidden_size=32, intermediate_size=64), listing, tmp_path / "model")
    cfg = config(workdir)
    cfg["actor_rollout_ref"]["model"]["path"] = str(tmp_path / "model")
    cfg["data"]["max_prompt_length"] = 40
    rollouter = FullyAsyncRollouter(
        cfg, MessageQueue(max_queue_size=10), engine=object(), reward_fn=answer_reward
    )
    first = rollouter.prompts.rows[0]["prompt"][0]["content"]
    assert rollouter.prompts.prompt_texts[0] == f"[calculator]<|user|>{first}{ASSISTANT}"
    assert rollouter.prompts.prompt_ids[0] == ids(listing, rollouter.prompts.prompt_texts[0])


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        # Drops tool messages: the model would never see an answer.
        (
            "{%- for m in messages -%}{%- if m['role'] != 'tool' -%}{{ m['content'] }}"
            "{%- endif -%}{%- endfor -%}",
            "renders no 'tool' role",
        ),
        # Renders earlier messages differently once more follow: no tokens to append.
        (
            "{{ messages | length }}{%- for m in messages -%}{{ m['content'] }}{%- endfor -%}",
            "first tokens change",
        ),
    ],
)
def test_a_template_that_cannot_carry_tool_results_is_refused_at_start(template, pattern):
    broken = tool_tokenizer()
    broken.chat_template = template
    with pytest.raises(ValueError, match=pattern):
        AgentLoop(ToolRegistry([]), broken)
