"""What the RL loop refuses or reports instead of going on wrong: the data keys it is told to
read, prompts longer than the limit, a timeout of inf, a dead rollouter, non-finite weights.

The slow versions with real processes killed and a real model diverging are in
``tests/faults/test_rl_faults.py``.
"""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

import miniray
from engine_fakes import echo_generations
from miniray.rl.batch_source import _ProducerWatch
from miniray.rl.errors import NonFiniteWeightsError, ProducerCrashedError
from miniray.rl.loop import run
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.queue import MessageQueue
from miniray.rl.rollouter import FullyAsyncRollouter
from miniray.rl.tasks import ArithmeticTask, load_prompts, write_prompts
from miniray.rl.trainer import FullyAsyncTrainer, non_finite_parameters

TASK = ArithmeticTask(max_operand=9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_guards")
    tokenizer = char_tokenizer(TASK.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(40), root / "train.parquet")
    return root


def config(workdir, train_file="train.parquet", data=None, **async_training):
    return {
        "data": {
            "train_files": [str(workdir / train_file)],
            "train_batch_size": 2,
            "max_prompt_length": 8,
            "max_response_length": 2,
            **(data or {}),
        },
        "actor_rollout_ref": {
            "model": {"path": str(workdir / "model")},
            "actor": {"optim": {"lr": 1e-3}},
            "rollout": {"n": 2},
        },
        "async_training": {"max_queue_size": 8, "generation_timeout": 60, **async_training},
        "trainer": {"total_training_steps": 3, "trigger_parameter_sync_step": 1},
    }


# What every EchoEngine loaded, by its key. Module-level: the inline backend ships the engine
# to the rollouter as a copy, in this same process.
LOADED: dict[str, list] = {}


class EchoEngine:
    """Answers every prompt with its last token; records the prompts and the loaded weights."""

    def __init__(self, key: str = ""):
        self.prompts: list[list[int]] = []
        self.key = key

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        self.prompts.extend(list(p) for p in prompts)
        return echo_generations(prompts)

    def load_weights(self, state_dict, *, take=False):
        LOADED.setdefault(self.key, []).append(state_dict)


@pytest.fixture
def inline():
    miniray.init(backend="inline")
    yield
    miniray.shutdown()


# -- async_training.generation_timeout=inf ----------------------------------------------------
def test_a_generation_timeout_of_inf_means_no_deadline(inline, workdir):
    result = run(config(workdir, generation_timeout=float("inf")), engine=EchoEngine())
    assert result.summary["steps"] == 3


def test_the_queue_waits_without_a_deadline_for_inf_and_refuses_nan():
    queue = MessageQueue(max_queue_size=4, staleness_threshold=1)
    queue.put_samples("a", param_version=0)
    assert queue.get_batch(1, 0, timeout=math.inf) == ["a"]
    assert queue.get_samples(0, timeout=0) is None
    with pytest.raises(ValueError, match="timeout=nan"):
        queue.get_batch(1, 0, timeout=math.nan)


# -- data.prompt_key / data.answer_key --------------------------------------------------------
def test_the_prompt_and_answer_columns_are_the_ones_the_config_names(workdir):
    rows = [{"question": q["prompt"], "solution": q["ground_truth"]} for q in TASK.rows(6)]
    write_prompts(rows, workdir / "questions.parquet")
    cfg = config(
        workdir, "questions.parquet", data={"prompt_key": "question", "answer_key": "solution"}
    )
    rollouter = FullyAsyncRollouter(
        cfg,
        MessageQueue(max_queue_size=8),
        engine=EchoEngine(),
        reward_fn=lambda response, truth: float(truth),  # the reward shows what it compared to
    )
    groups = rollouter.generate_groups(6, version=0)
    assert sorted(g[0].prompt for g in groups) == sorted(r["question"] for r in rows)
    solution = {r["question"]: float(r["solution"]) for r in rows}
    assert all(s.reward == solution[s.prompt] for g in groups for s in g)
    loaded = load_prompts(
        workdir / "questions.parquet", prompt_key="question", answer_key="solution"
    )
    assert [r["ground_truth"] for r in loaded] == [r["solution"] for r in rows]
    with pytest.raises(ValueError, match=r"lacks the column 'prompt' \(data\.prompt_key\)"):
        load_prompts(workdir / "questions.parquet")


def test_distillation_reads_the_named_prompt_column_too(workdir):
    from miniray.rl.distill.config import DistillConfig
    from miniray.rl.distill.loop import _load_rows

    rows = [{"question": "1+2=", "solution": "3"}, {"question": "12+30=", "solution": "42"}]
    write_prompts(rows, workdir / "distill_questions.jsonl")
    cfg = DistillConfig.load(
        overrides=[
            f"data.train_files=[{workdir / 'distill_questions.jsonl'}]",
            "data.prompt_key=question",
            "data.answer_key=solution",
            "data.max_prompt_length=5",  # "12+30=" and BOS are 7 tokens: skipped
            f"actor_rollout_ref.model.path={workdir / 'model'}",
        ]
    )
    kept = _load_rows(cfg, char_tokenizer(TASK.alphabet))
    assert [(r["question"], r["ground_truth"]) for r in kept] == [("1+2=", "3")]


def test_the_answer_key_wins_over_a_ground_truth_column(workdir):
    rows = [{"prompt": "1+1=", "ground_truth": "3", "answer": "2"}]
    write_prompts(rows, workdir / "both.jsonl")
    assert load_prompts(workdir / "both.jsonl", answer_key="answer")[0]["ground_truth"] == "2"
    assert load_prompts(workdir / "both.jsonl", answer_key="nope")[0]["ground_truth"] == "3"


# -- data.max_prompt_length -------------------------------------------------------------------
def test_prompts_longer_than_the_limit_are_skipped_not_truncated(workdir):
    # With the BOS token "1=" is 3 tokens and "0+5=" is 5: a limit of 4 keeps only the short.
    rows = [{"prompt": p, "ground_truth": "1"} for p in ("1=", "0+5=", "2=", "12+3=")]
    write_prompts(rows, workdir / "mixed.jsonl")
    engine = EchoEngine()
    cfg = config(workdir, "mixed.jsonl", data={"max_prompt_length": 4})
    rollouter = FullyAsyncRollouter(cfg, MessageQueue(max_queue_size=8), engine=engine)
    assert rollouter.get_statistics()["prompts_skipped_too_long"] == 2
    groups = rollouter.generate_groups(4, version=0)  # two epochs of the two short prompts
    assert sorted(g[0].prompt for g in groups) == ["1=", "1=", "2=", "2="]
    tokenizer = rollouter.tokenizer
    for group in groups:
        full = [tokenizer.bos_token_id, *tokenizer(group[0].prompt)["input_ids"]]
        assert group[0].prompt_token_ids == full  # whole, never cut to the limit
    assert all(len(p) <= 4 for p in engine.prompts)


MIXED = [{"prompt": p, "ground_truth": "1"} for p in ("1=", "0+5=", "2=", "12+3=")]


@pytest.mark.parametrize("truncation", ["left", "right"])
def test_without_the_filter_overlong_prompts_are_cut_from_the_side_asked(workdir, truncation):
    write_prompts(MIXED, workdir / "cut.jsonl")
    data = {"max_prompt_length": 4, "filter_overlong_prompts": False, "truncation": truncation}
    rollouter = FullyAsyncRollouter(
        config(workdir, "cut.jsonl", data=data), MessageQueue(max_queue_size=8), engine=EchoEngine()
    )
    stats = rollouter.get_statistics()
    assert (stats["prompts_skipped_too_long"], stats["prompts_truncated"]) == (0, 2)
    tokenizer = rollouter.tokenizer
    full = [[tokenizer.bos_token_id, *tokenizer(r["prompt"])["input_ids"]] for r in MIXED]
    expected = [ids[-4:] if truncation == "left" else ids[:4] for ids in full]
    assert rollouter.prompts.prompt_ids == expected  # every row kept, in order; the long ones cut


def test_truncation_error_names_the_row_and_its_length(workdir):
    write_prompts(MIXED, workdir / "refused.jsonl")
    data = {"max_prompt_length": 4, "filter_overlong_prompts": False, "truncation": "error"}
    with pytest.raises(ValueError, match=r"refused\.jsonl: row 1: the prompt has 5 tokens.*=4"):
        FullyAsyncRollouter(
            config(workdir, "refused.jsonl", data=data),
            MessageQueue(max_queue_size=8),
            engine=EchoEngine(),
        )


def test_distillation_fits_prompts_the_same_way(workdir):
    from miniray.rl.distill.config import load_distill_config
    from miniray.rl.distill.loop import PROMPT_IDS, _load_rows

    write_prompts(MIXED, workdir / "distill_cut.jsonl")
    tokenizer = char_tokenizer(TASK.alphabet)

    def rows(*overrides):
        cfg = load_distill_config(
            overrides=[
                f"data.train_files=[{workdir / 'distill_cut.jsonl'}]",
                "actor_rollout_ref.model.path=/m",
                "data.max_prompt_length=4",
                *overrides,
            ]
        )
        return [r[PROMPT_IDS] for r in _load_rows(cfg, tokenizer)]

    assert len(rows()) == 2  # filtered
    cut = rows("data.filter_overlong_prompts=false", "data.truncation=right")
    assert len(cut) == 4 and all(len(ids) <= 4 for ids in cut)
    with pytest.raises(ValueError, match=r"row 1: the prompt has 5 tokens"):
        rows("data.filter_overlong_prompts=false")


def test_every_prompt_too_long_is_an_error_naming_the_key(workdir):
    cfg = config(workdir, data={"max_prompt_length": 2})
    with pytest.raises(ValueError, match=r"data\.max_prompt_length=2 .*every one of the 40"):
        FullyAsyncRollouter(cfg, MessageQueue(max_queue_size=8), engine=EchoEngine())


# -- a dead rollouter -------------------------------------------------------------------------
class BlockingProducer:
    """Stands in for the rollouter: ``wait_loop_end`` blocks as the real one does."""

    def pid(self):
        return os.getpid()

    def wait_loop_end(self):
        time.sleep(600)


class SilentQueue:
    def get_batch(self, *args, **kwargs):
        time.sleep(600)

    def close(self, error=None):
        return True


def test_a_killed_producer_is_reported_at_once_not_at_the_timeout():
    miniray.init(backend="local", num_workers=1)
    try:
        producer = miniray.remote(max_concurrency=4)(BlockingProducer).remote()
        queue = miniray.remote(max_concurrency=4)(SilentQueue).remote()
        pid = miniray.get(producer.pid.remote(), timeout=60)
        watch = _ProducerWatch(producer, queue)
        batch = queue.get_batch.remote(2, 0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ProducerCrashedError, match=r"the rollouter died.*SIGKILL") as info:
            watch.get(batch, timeout=30)
        assert time.monotonic() - start < 1.5
        assert "BlockingProducer" in str(info.value) and info.value.producer_error
        with pytest.raises(ProducerCrashedError):  # and every later check says so too
            watch.check()
    finally:
        miniray.shutdown()


# -- non-finite weights -----------------------------------------------------------------------
def test_non_finite_parameters_are_named_in_order():
    weights = {
        "a": torch.zeros(2),
        "b": torch.tensor([1.0, math.nan]),
        "steps": torch.tensor([3]),  # integers are always finite
        "c": torch.tensor([math.inf]),
    }
    assert non_finite_parameters(weights) == ["b", "c"]
    assert non_finite_parameters({"a": torch.ones(3)}) == []


class PoisonedTrainer(FullyAsyncTrainer):
    """Trains normally, but its step ``poison_at`` leaves NaN in one parameter (as a diverged
    update does)."""

    poison_at = 2

    def train_step(self, groups):
        metrics = super().train_step(groups)
        if self.updater.steps == self.poison_at:
            with torch.no_grad():
                self.model.get_parameter("model.norm.weight")[0] = math.nan
        return metrics


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_non_finite_weights_are_never_published_and_fail_the_run_naming_step_and_parameter(
    inline, workdir, mode
):
    cfg = config(workdir, mode=mode)
    key = f"poisoned-{mode}"
    with pytest.raises(NonFiniteWeightsError, match=r"step 2\b.*model\.norm\.weight") as info:
        run(cfg, engine=EchoEngine(key), trainer=PoisonedTrainer(cfg))
    assert (info.value.step, info.value.parameter) == (2, "model.norm.weight")
    # The rollouter got the first step's weights, and never the poisoned ones.
    assert len(LOADED[key]) == 1 and not non_finite_parameters(LOADED[key][0])


def test_a_checkpoint_is_not_written_from_non_finite_weights(inline, workdir, tmp_path):
    cfg = config(workdir)
    cfg["trainer"].update(
        trigger_parameter_sync_step=3, save_freq=1, default_local_dir=str(tmp_path)
    )
    with pytest.raises(NonFiniteWeightsError, match=r"step 2\b"):
        run(cfg, engine=EchoEngine(), trainer=PoisonedTrainer(cfg))
    saved = sorted(p.name for p in (tmp_path / "fully_async" / "checkpoints").iterdir())
    assert saved == ["global_step_1", "latest"]


class PreparingTrainer(FullyAsyncTrainer):
    """Records the steps the loop prepared a publish for (``TrainerGroup.prepare_publish``)."""

    def prepare_publish(self, step, finite_at, *, extrapolation):
        self.prepared = [*getattr(self, "prepared", []), (step, extrapolation)]


def test_the_loop_prepares_a_publish_before_each_publishing_step(inline, workdir):
    cfg = config(workdir)
    cfg["trainer"].update(total_training_steps=4, trigger_parameter_sync_step=2)
    trainer = PreparingTrainer(cfg)
    run(cfg, engine=EchoEngine("prepared"), trainer=trainer)
    assert trainer.prepared == [(2, 0.0), (4, 0.0)]
