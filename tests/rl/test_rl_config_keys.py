"""The recipe keys each do what they say: a test per key that fails when the key is ignored.

algorithm.{adv_estimator, norm_adv_by_std_in_grpo}, actor_rollout_ref.model.{dtype,
trust_remote_code, enable_gradient_checkpointing}, trainer.{seed, logger, project_name,
experiment_name, test_freq, val_before_train}. (rollout.top_p / top_k: test_rl_tasks_models_engines.py and
test_rl_vllm_engine.py; data.filter_overlong_prompts / truncation: test_rl_run_guards.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

from miniray.rl.config_loading import load_rl_config
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.tasks import ArithmeticTask, write_prompts

TASK = ArithmeticTask(max_operand=9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    tokenizer = char_tokenizer(TASK.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(20), root / "train.jsonl")
    return root


def cfg(workdir, *overrides):
    return load_rl_config(
        overrides=[
            f"data.train_files=[{workdir / 'train.jsonl'}]",
            f"actor_rollout_ref.model.path={workdir / 'model'}",
            "data.train_batch_size=2",
            "data.max_response_length=4",
            "actor_rollout_ref.rollout.n=4",
            "async_training.max_queue_size=8",
            *overrides,
        ]
    )


# -- algorithm --------------------------------------------------------------------------------
def scored_samples(tokenizer):
    from miniray.rl.types import Sample

    prompt = [tokenizer.bos_token_id, *tokenizer("3+4=")["input_ids"]]
    return [
        Sample(
            prompt_token_ids=prompt,
            response_token_ids=[*tokenizer(text)["input_ids"], tokenizer.eos_token_id],
            response_logprobs=[-1.0] * (len(text) + 1),
            reward=reward,
            group_id="g0",
            v_start=0,
        )
        for text, reward in (("7", 1.0), ("8", 0.0), ("9", 0.0), ("7", 1.0))
    ]


@pytest.mark.parametrize(("norm", "expected"), [(True, 0.5 / (1 / 3) ** 0.5), (False, 0.5)])
def test_norm_adv_by_std_false_is_dr_grpo(workdir, norm, expected):
    from miniray.rl.policy import PolicyUpdater
    from miniray.rl.trainer import policy_update_config

    tokenizer = char_tokenizer(TASK.alphabet)
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64)
    config = policy_update_config(cfg(workdir, f"algorithm.norm_adv_by_std_in_grpo={norm}"))
    updater = PolicyUpdater(model, pad_token_id=tokenizer.pad_token_id, config=config)
    metrics = updater.step(scored_samples(tokenizer))
    # Rewards 1, 0, 0, 1: centred +-0.5; the group's (unbiased) std is sqrt(1/3).
    assert metrics["advantage_abs_mean"] == pytest.approx(expected, rel=1e-4)


def test_an_unsupported_advantage_estimator_names_the_supported_one(workdir):
    with pytest.raises(ValueError, match=r"algorithm\.adv_estimator='gae' is invalid.*'grpo'"):
        cfg(workdir, "algorithm.adv_estimator=gae")
    from miniray.rl.policy import PolicyUpdateConfig

    with pytest.raises(ValueError, match=r"adv_estimator='rloo' is unknown.*\['grpo'\]"):
        PolicyUpdateConfig(adv_estimator="rloo")


# -- the model --------------------------------------------------------------------------------
def test_model_dtype_reaches_the_trainer_and_the_engine(workdir):
    from miniray.rl.rollouter import FullyAsyncRollouter
    from miniray.rl.trainer import FullyAsyncTrainer

    config = cfg(workdir, "actor_rollout_ref.model.dtype=bfloat16")
    assert next(FullyAsyncTrainer(config).model.parameters()).dtype == torch.bfloat16
    engine = FullyAsyncRollouter(config).engine
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert next(FullyAsyncTrainer(cfg(workdir)).model.parameters()).dtype == torch.float32


def test_float16_is_refused_on_the_cpu_naming_the_key(workdir):
    from miniray.rl.trainer import FullyAsyncTrainer

    with pytest.raises(ValueError, match=r"actor_rollout_ref\.model\.dtype='float16' is refused"):
        FullyAsyncTrainer(cfg(workdir, "actor_rollout_ref.model.dtype=float16"))


def test_trust_remote_code_reaches_from_pretrained(workdir, monkeypatch):
    import transformers

    from miniray.rl.trainer import FullyAsyncTrainer

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    FullyAsyncTrainer(cfg(workdir, "actor_rollout_ref.model.trust_remote_code=true"))
    assert sorted(seen) == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]
    seen.clear()
    FullyAsyncTrainer(cfg(workdir))
    assert {flag for _, flag in seen} == {False}


def test_gradient_checkpointing_is_enabled_and_trains(workdir):
    from miniray.rl.trainer import FullyAsyncTrainer, is_activation_checkpointing

    trainer = FullyAsyncTrainer(
        cfg(workdir, "actor_rollout_ref.model.enable_gradient_checkpointing=true")
    )
    assert is_activation_checkpointing(trainer.model)
    tokenizer = trainer.tokenizer
    metrics = trainer.train_step([scored_samples(tokenizer)])
    assert metrics["grad_norm"] > 0
    assert not is_activation_checkpointing(FullyAsyncTrainer(cfg(workdir)).model)


# -- trainer ----------------------------------------------------------------------------------
def first_tokens(config):
    from miniray.rl.rollouter import FullyAsyncRollouter

    groups = FullyAsyncRollouter(config).generate_groups(2, version=0)
    return [s.response_token_ids for group in groups for s in group]


def test_trainer_seed_decides_the_sampled_tokens(workdir):
    same = first_tokens(cfg(workdir, "trainer.seed=5"))
    assert first_tokens(cfg(workdir, "trainer.seed=5")) == same
    assert first_tokens(cfg(workdir, "trainer.seed=6")) != same


def test_loggers_write_what_they_name(tmp_path, capsys):
    from miniray.rl.tracking import build_loggers

    sinks = build_loggers(
        ["console", "jsonl", "tensorboard"], run_dir=tmp_path, project="proj", experiment="exp"
    )
    for sink in sinks:
        sink.log({"step": 1, "loss": 0.25, "note": "text"}, 1)
        sink.close()
    assert "[proj/exp] step 1: loss=0.25" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1,
        "loss": 0.25,
        "note": "text",
    }
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    build_loggers(["jsonl"], run_dir=tmp_path / "quiet", project="p", experiment="e")
    assert capsys.readouterr().out == ""  # no console sink, no console lines


def test_an_unknown_logger_names_itself_and_the_valid_ones(workdir):
    with pytest.raises(ValueError, match=r"trainer\.logger=.*'tensorbord' is not a logger.*mlflow"):
        cfg(workdir, "trainer.logger=[console,tensorbord]")


def test_the_run_logs_under_project_and_experiment(workdir, tmp_path, capsys):
    import miniray
    from miniray.rl.loop import run

    miniray.init(backend="inline")
    try:
        run(
            cfg(
                workdir,
                "trainer.total_training_steps=1",
                "trainer.project_name=proj",
                "trainer.experiment_name=exp1",
                "trainer.logger=[console]",
            ),
            log_dir=tmp_path,
        )
    finally:
        miniray.shutdown()
    assert "[proj/exp1] step 1:" in capsys.readouterr().out
    assert not (tmp_path / "metrics.jsonl").exists()  # jsonl was not asked for


@pytest.mark.parametrize(
    ("overrides", "eval_steps"),
    [
        ((), [0]),  # verl's defaults: before training only
        (("trainer.test_freq=2",), [0, 2, 4, 5]),  # every 2 steps and after the last
        (("trainer.test_freq=3", "trainer.val_before_train=false"), [3, 5]),
        (("trainer.val_before_train=false",), []),
    ],
)
def test_test_freq_and_val_before_train_decide_when_the_run_evaluates(
    workdir, overrides, eval_steps
):
    import math

    import miniray
    from miniray.rl.loop import run

    miniray.init(backend="inline")
    try:
        result = run(
            cfg(workdir, "trainer.total_training_steps=5", *overrides),
            eval_rows=TASK.rows(2, split="test"),
        )
    finally:
        miniray.shutdown()
    assert [step for step, _, _ in result.evals] == eval_steps
    evaluated = [m["step"] for m in result.history if "eval_reward" in m]
    assert evaluated == [s for s in eval_steps if s > 0]
    if not eval_steps:
        assert math.isnan(result.summary["initial_reward"])


def test_test_freq_zero_is_refused_naming_the_key(workdir):
    with pytest.raises(ValueError, match=r"trainer\.test_freq=0 is invalid"):
        cfg(workdir, "trainer.test_freq=0")
