"""End-to-end runs of the RL loop on a tiny model: async, strictly on-policy, sync, crashes."""

from __future__ import annotations

import time

import pytest

import miniray
from miniray.rl.engines.base import Generation
from miniray.rl.loop import run
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.queue import MessageQueue, ProducerCrashedError
from miniray.rl.rollouter import FullyAsyncRollouter
from miniray.rl.tasks import ArithmeticTask, write_prompts

TASK = ArithmeticTask(max_operand=9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    tokenizer = char_tokenizer(TASK.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(200), root / "train.parquet")
    return root


def config(workdir, **async_training):
    return {
        "data": {
            "train_files": [str(workdir / "train.parquet")],
            "train_batch_size": 2,
            "max_prompt_length": 8,
            "max_response_length": 3,
        },
        "actor_rollout_ref": {
            "model": {"path": str(workdir / "model")},
            "actor": {"optim": {"lr": 1e-3}},
            "rollout": {"n": 4},
        },
        "async_training": {"max_queue_size": 8, "generation_timeout": 60, **async_training},
        "trainer": {"total_training_steps": 6, "trigger_parameter_sync_step": 1},
    }


@pytest.fixture
def rt():
    miniray.init(backend="local", num_workers=1)
    yield
    miniray.shutdown()


@pytest.mark.slow
def test_async_run_trains_overlapping_and_respects_the_staleness_bound(rt, workdir):
    result = run(config(workdir, staleness_threshold=1), eval_rows=TASK.rows(8, split="test"))
    summary = result.summary
    assert summary["steps"] == 6 and summary["mode"] == "async"
    assert summary["max_age"] <= 1
    assert len(result.ages) == 6 * 2
    assert 0.0 <= summary["initial_reward"] <= 1.0 and 0.0 <= summary["final_reward"] <= 1.0
    assert [m["version"] for m in result.history] == [1, 2, 3, 4, 5, 6]
    assert summary["sync_ms_p50"] > 0
    assert summary["sync_phase_ms"]["pause_p50"] >= 0 and "load_p95" in summary["sync_phase_ms"]


@pytest.mark.slow
def test_strictly_on_policy_never_trains_on_older_data(rt, workdir):
    result = run(config(workdir, staleness_threshold=0))
    assert result.ages and set(result.ages) == {0}


@pytest.mark.slow
def test_sync_baseline_runs_on_the_same_workload(rt, workdir):
    result = run(config(workdir, mode="sync"))
    assert result.summary["mode"] == "sync" and result.summary["steps"] == 6
    assert set(result.ages) == {0}


def broken_reward(response, truth):
    raise ZeroDivisionError("the reward function is broken")


@pytest.mark.slow
def test_a_crashed_rollouter_surfaces_as_an_error_not_a_clean_end(rt, workdir):
    start = time.monotonic()
    with pytest.raises(ProducerCrashedError, match="reward function is broken"):
        run(config(workdir), reward_fn=broken_reward)
    assert time.monotonic() - start < 60


class FakeEngine:
    """Generates one token per call slowly, so pause can interrupt it mid-generation."""

    def __init__(self):
        self.loaded = None

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        for _ in range(50):
            if should_stop is not None and should_stop():
                return [
                    Generation(
                        prompt_token_ids=p,
                        response_token_ids=[],
                        response_logprobs=[],
                        finish_reason="aborted",
                    )
                    for p in prompts
                ]
            time.sleep(0.01)
        return [
            Generation(
                prompt_token_ids=p,
                response_token_ids=[5],
                response_logprobs=[-1.0],
                finish_reason="length",
            )
            for p in prompts
        ]

    def load_weights(self, state_dict):
        self.loaded = state_dict


def test_pause_and_resume_answer_true_while_generating_and_while_idle(workdir):
    queue = MessageQueue(max_queue_size=100, staleness_threshold=3)
    rollouter = FullyAsyncRollouter(config(workdir), queue, engine=FakeEngine())
    assert rollouter.pause_rollout() is True  # idle: safe
    assert rollouter.pause_rollout() is True  # idempotent
    assert rollouter.resume_rollout() is True
    assert rollouter.resume_rollout() is True
    rollouter.start()
    time.sleep(0.2)  # in the middle of a generation
    start = time.monotonic()
    assert rollouter.pause_rollout(timeout=5) is True
    assert time.monotonic() - start < 1.0  # the generation stopped at its next token
    assert rollouter.get_statistics()["groups_aborted"] >= 1
    rollouter.load_weights({"w": 1}, 1)
    assert rollouter.get_statistics()["version"] == 1
    assert rollouter.resume_rollout() is True
    time.sleep(1.0)
    rollouter.stop()
    stats = rollouter.get_statistics()
    assert stats["groups_accepted"] >= 1 and stats["error"] is None
    item = queue.get_samples(current_param_version=1)
    assert item[0].v_start in (0, 1)


def test_load_weights_while_generating_is_refused(workdir):
    rollouter = FullyAsyncRollouter(
        config(workdir), MessageQueue(max_queue_size=10), engine=FakeEngine()
    )
    rollouter.start()
    try:
        with pytest.raises(RuntimeError, match="pause_rollout"):
            rollouter.load_weights({}, 1)
    finally:
        rollouter.stop()
