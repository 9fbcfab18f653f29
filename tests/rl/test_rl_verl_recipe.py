"""verl recipes as users paste them: verl's parquet layout with chat prompts, a compute_score
file, dynamic sampling, KL to a reference and the Hugging Face export, through the real loop."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import miniray
from miniray.rl.loop import run
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.queue import ProducerCrashedError
from miniray.rl.tasks import ArithmeticTask, write_prompts

TASK = ArithmeticTask(max_operand=9)
# Renders only characters the tiny tokenizer knows: BOS, the user's text, '=' as the
# generation prompt (what the pre-training format expects after a question).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)
REWARD_FILE = """
import json, os

def my_score(data_source, solution_str, ground_truth, extra_info=None):
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps([data_source, ground_truth, extra_info]) + "\\n")
    correct = solution_str.strip().startswith(ground_truth)
    return {"score": 1.0 if correct else 0.0, "acc": float(correct), "pred": solution_str}
"""


def verl_rows(count, split):
    rows = []
    for i, row in enumerate(TASK.rows(count, split=split)):
        rows.append(
            {
                "data_source": "arithmetic_chat",
                "prompt": [{"role": "user", "content": row["prompt"].rstrip("=")}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": row["ground_truth"]},
                "extra_info": {"split": split, "index": i},
            }
        )
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl")
    tokenizer = char_tokenizer(TASK.alphabet)
    tokenizer.chat_template = TEMPLATE
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    pq.write_table(pa.Table.from_pylist(verl_rows(60, "train")), root / "train.parquet")
    pq.write_table(pa.Table.from_pylist(verl_rows(4, "test")), root / "test.parquet")
    write_prompts(TASK.rows(60), root / "plain.parquet")
    (root / "reward.py").write_text(REWARD_FILE)
    return root


@pytest.mark.slow
def test_a_verl_command_line_runs_chat_rows_a_reward_file_kl_and_the_hf_export(workdir, tmp_path):
    log = tmp_path / "reward_log.jsonl"
    words = [
        "--config-name=e2e_minimal",
        f"data.train_files=[{workdir / 'train.parquet'}]",
        f"data.val_files=[{workdir / 'test.parquet'}]",
        "data.prompt_key=prompt",
        "data.train_batch_size=2",
        "data.max_prompt_length=16",
        "data.max_response_length=3",
        f"actor_rollout_ref.model.path={workdir / 'model'}",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.01",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        f"custom_reward_function.path={workdir / 'reward.py'}",
        "custom_reward_function.name=my_score",
        "async_training.max_queue_size=8",
        "async_training.generation_timeout=120",
        "trainer.total_training_steps=2",
        "trainer.save_freq=2",
        f"trainer.default_local_dir={tmp_path / 'run'}",
        "trainer.experiment_name=verl_recipe",
        "trainer.logger=[console,jsonl,wandb,mlflow]",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "miniray.rl.main", *words],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "REWARD_LOG": str(log)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # every response was scored by the user's function, with verl's fields
    assert calls and all(source == "arithmetic_chat" for source, _, _ in calls)
    assert {"split", "index"} <= set(calls[0][2])
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all("reward_extra/acc" in m and "kl_loss" in m for m in metrics)
    # the same steps reached wandb (offline) and MLflow (SQLite in the run directory)
    import mlflow
    from test_rl_tracking import wandb_records

    (record_file,) = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    wandb_steps = [r.history.step.num for r in wandb_records(record_file) if r.HasField("history")]
    assert wandb_steps == [m["step"] for m in metrics]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("miniray_rl").experiment_id])
    assert run.info.run_name == "verl_recipe"
    history = client.get_metric_history(run.info.run_id, "kl_loss")
    assert [(h.step, h.value) for h in history] == [(m["step"], m["kl_loss"]) for m in metrics]
    export = tmp_path / "run" / "verl_recipe" / "checkpoints" / "global_step_2" / "huggingface"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size == len(char_tokenizer(TASK.alphabet))
    assert AutoTokenizer.from_pretrained(export).chat_template == TEMPLATE


def config(workdir, *, train="plain.parquet", **sections):
    cfg = {
        "data": {
            "train_files": [str(workdir / train)],
            "train_batch_size": 2,
            "max_prompt_length": 16,
            "max_response_length": 3,
        },
        "actor_rollout_ref": {
            "model": {"path": str(workdir / "model")},
            "actor": {"optim": {"lr": 1e-3}},
            "rollout": {"n": 2},
        },
        "async_training": {"max_queue_size": 8, "generation_timeout": 60},
        "trainer": {"total_training_steps": 3, "trigger_parameter_sync_step": 1},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


@pytest.fixture
def rt():
    miniray.init(backend="local", num_workers=1)
    yield
    miniray.shutdown()


_calls = itertools.count()
_lock = threading.Lock()


def half_flat_reward(response: str, ground_truth: str) -> float:
    """Even answers: the same reward for every response (no spread, dropped); odd answers:
    alternating 0 and 1 between consecutive calls, so each group of two has spread."""
    if int(ground_truth) % 2 == 0:
        return 0.5
    with _lock:
        return float(next(_calls) % 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_dynamic_sampling_drops_flat_groups_refills_and_consumes_each_prompt_once(
    rt, workdir, mode
):
    # staleness 0: without the dropped groups' room handed back, the rollouter would stop at
    # its admission bound short of a full batch and the run would time out.
    cfg = config(
        workdir,
        algorithm={"filter_groups": {"enable": True, "metric": "score"}},
        async_training={"mode": mode, "staleness_threshold": 0},
        trainer={"total_training_steps": 4},
    )
    result = run(cfg, reward_fn=half_flat_reward)
    assert len(result.history) == 4
    dropped = [p for step in result.dropped_positions for p in step]
    trained = [p for step in result.trained_positions for p in step]
    assert dropped, "some even-answer prompt should have come up in 4 steps"
    assert all(len(step) == 2 for step in result.trained_positions)  # batches were refilled
    assert len(set(dropped + trained)) == len(dropped + trained)  # each prompt used once
    assert result.history[-1]["filter_groups/dropped_total"] == len(dropped)
    # only groups with spread were trained: their rewards are 0 and 1, never 0.5
    assert all(m["reward_mean"] == 0.5 for m in result.history)  # (0 + 1) / 2 per group


def constant_reward(response: str, ground_truth: str) -> float:
    return 1.0


def test_max_num_gen_batches_ends_a_run_that_cannot_fill_a_batch(rt, workdir):
    cfg = config(
        workdir,
        algorithm={"filter_groups": {"enable": True, "max_num_gen_batches": 2}},
        trainer={"total_training_steps": 1},
    )
    with pytest.raises(RuntimeError, match="max_num_gen_batches=2"):
        run(cfg, reward_fn=constant_reward)


def raising_reward(response: str, ground_truth: str) -> float:
    raise ZeroDivisionError("a bug in the reward")


def test_a_reward_function_that_raises_ends_the_run_naming_it_and_the_prompt(rt, workdir):
    with pytest.raises(ProducerCrashedError) as info:
        run(config(workdir), reward_fn=raising_reward)
    text = str(info.value) + info.value.producer_error
    assert "raising_reward" in text and "ZeroDivisionError" in text and "for the prompt" in text


def test_rows_of_an_unknown_data_source_need_a_reward_function(workdir):
    from miniray.rl.rollouter import FullyAsyncRollouter

    with pytest.raises(ValueError, match=r"data_source='arithmetic_chat'.*custom_reward_function"):
        FullyAsyncRollouter(config(workdir, train="train.parquet"))


def test_the_trainer_loads_a_frozen_reference_only_with_use_kl_loss(workdir):
    from miniray.rl.trainer import FullyAsyncTrainer

    plain = FullyAsyncTrainer(config(workdir))
    assert plain.updater.ref_model is None
    kl = FullyAsyncTrainer(
        config(
            workdir,
            actor_rollout_ref={
                "model": {"path": str(workdir / "model")},
                "actor": {"use_kl_loss": True, "kl_loss_type": "k2"},
            },
        )
    )
    ref = kl.updater.ref_model
    assert ref is not None and ref is not kl.model
    assert all(not p.requires_grad for p in ref.parameters())
    assert kl.updater.config.kl_loss_type == "k2"
    for (name, a), b in zip(ref.state_dict().items(), kl.model.state_dict().values()):
        assert torch.equal(a, b), name
