"""Every key of the RL and distillation config trees is read by the code it names, or refused.

``record_reads()`` records which keys miniray's code reads (every thread; the inline backend
runs the actors in this process) while short real runs go through ``python -m ...main`` and
the few paths a plain run never takes (a resume from a named checkpoint, a failed weight sync).
A key added to a tree that nothing reads fails ``test_every_*_key_is_read_or_refused``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rl_fakes import FakeClock, FakeRollouter, FakeTrainer

import miniray
from miniray.config import config_keys
from miniray.rl.config import REFUSED, RLConfig
from miniray.rl.config_loading import load_rl_config
from miniray.rl.config_reads import record_reads
from miniray.rl.distill.config import DISTILL_REFUSED, DistillConfig, load_distill_config
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.tasks import ArithmeticTask, write_prompts

REQUIRED = ["data.train_files=[a.jsonl]", "actor_rollout_ref.model.path=/models/tiny"]


@pytest.fixture(scope="module")
def rl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reads")
    task = ArithmeticTask(max_operand=9)
    tokenizer = char_tokenizer(task.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "m")
    write_prompts(task.rows(20), root / "train.jsonl")
    write_prompts(task.rows(4, split="test"), root / "test.jsonl")
    return root


@pytest.fixture
def inline_runtime():
    miniray.init(backend="inline")
    try:
        yield
    finally:
        miniray.shutdown()


def leaf_reads(keys: set[str], cls: type) -> set[str]:
    return keys & set(config_keys(cls))


def rl_reads(root: Path, run_dir: Path) -> set[str]:
    from miniray.rl.main import main
    from miniray.rl.param_sync import UnifiedParameterSynchronizer

    words = [
        "--config-name=e2e_minimal",
        f"data.train_files={root / 'train.jsonl'}",
        f"data.val_files={root / 'test.jsonl'}",
        f"actor_rollout_ref.model.path={root / 'm'}",
        "data.train_batch_size=2",
        "data.max_response_length=3",
        "actor_rollout_ref.rollout.n=2",
        "async_training.max_queue_size=8",
        f"trainer.default_local_dir={run_dir}",
        "trainer.experiment_name=reads",
        "trainer.save_freq=1",
    ]
    with record_reads() as keys:
        main([*words, "trainer.total_training_steps=1"])
        # The paths a plain run does not take: a resume from a named checkpoint ...
        main(
            [
                *words,
                "trainer.total_training_steps=2",
                "trainer.resume_mode=resume_path",
                f"trainer.resume_from_path={run_dir / 'reads' / 'checkpoints'}",
            ]
        )
        # ... and a weight sync that fails once and is retried after sync_retry_delay.
        clock = FakeClock()
        cfg = load_rl_config("e2e_minimal", overrides=REQUIRED)
        sync = UnifiedParameterSynchronizer(
            cfg, FakeTrainer(), FakeRollouter(fail_loads=1), clock=clock, sleep=clock.sleep
        )
        assert sync.sync_to_rollouter(1) and clock.sleeps == [cfg.async_training.sync_retry_delay]
    return leaf_reads(keys, RLConfig)


@pytest.mark.slow
def test_every_rl_key_is_read_or_refused(rl_files, tmp_path, inline_runtime):
    reads = rl_reads(rl_files, tmp_path)
    unread = set(config_keys(RLConfig)) - reads - set(REFUSED)
    assert not unread, f"keys nothing reads: read them or add them to REFUSED: {sorted(unread)}"
    assert set(REFUSED) <= set(config_keys(RLConfig))


@pytest.mark.slow
def test_every_distillation_key_is_read_or_refused(tmp_path, inline_runtime):
    sys.path.insert(0, str(Path(__file__).parent / "distill"))
    from distill_models import make_models

    from miniray.rl.distill.main import main

    models = make_models(tmp_path / "models")
    words = [
        "--config-name=on_policy_distill_trainer",
        f"actor_rollout_ref.model.path={models['student']}",
        f"data.train_files={models['train']}",
        f"data.val_files={models['test']}",
        "data.train_batch_size=4",
        "data.max_response_length=3",
        "actor_rollout_ref.teacher.topk=0",
        f"trainer.default_local_dir={tmp_path / 'run'}",
        "actor_rollout_ref.teacher.launch=true",
        f"actor_rollout_ref.teacher.model_path={models['teacher']}",
        "actor_rollout_ref.teacher.server_port=0",
        "trainer.total_training_steps=3",
    ]
    with record_reads() as keys:
        main(words)
    reads = leaf_reads(keys, DistillConfig)
    unread = set(config_keys(DistillConfig)) - reads - set(DISTILL_REFUSED)
    assert not unread, f"keys nothing reads: read them or add them to REFUSED: {sorted(unread)}"


def test_reads_are_recorded_for_code_not_for_the_config_machinery():
    cfg = load_rl_config(overrides=REQUIRED)
    with record_reads() as keys:
        cfg.to_dict()  # the machinery reads everything: not a use
        assert cfg == load_rl_config(overrides=REQUIRED)  # nor is a comparison
        from miniray.rl.trainer import policy_update_config

        policy_update_config(cfg)
    assert "actor_rollout_ref.actor.clip_ratio_low" in keys
    assert "algorithm.norm_adv_by_std_in_grpo" in keys
    assert "async_training.max_queue_size" not in keys
    cfg.async_training.max_queue_size  # noqa: B018  (outside the block: not recorded)
    assert "async_training.max_queue_size" not in keys


REFUSED_CASES = [
    ("rl", "actor_rollout_ref.rollout.tensor_model_parallel_size=2"),
    ("rl", "actor_rollout_ref.rollout.calculate_log_probs=false"),
    ("distill", "trainer.nnodes=2"),
    ("distill", "trainer.n_gpus_per_node=2"),
]


@pytest.mark.parametrize(("tree", "override"), REFUSED_CASES)
def test_refused_values_are_errors_naming_the_key_and_why(tree, override):
    key = override.partition("=")[0]
    load = load_rl_config if tree == "rl" else load_distill_config
    with pytest.raises(ValueError, match=rf"^{key}=.* is refused: .*(scale-out|log-probs)"):
        load(overrides=[*REQUIRED, override])


def test_every_refused_key_has_a_case_and_the_supported_value_loads():
    assert {k for t, o in REFUSED_CASES if t == "rl" for k in [o.partition("=")[0]]} == set(REFUSED)
    assert {k for t, o in REFUSED_CASES if t == "distill" for k in [o.partition("=")[0]]} == set(
        DISTILL_REFUSED
    )
    cfg = load_rl_config(
        "e2e_minimal",
        overrides=[
            *REQUIRED,
            "trainer.nnodes=1",
            "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        ],
    )
    assert (cfg.trainer.n_gpus_per_node, cfg.rollout.n_gpus_per_node) == (1, 1)
    assert load_rl_config("performance", overrides=REQUIRED).trainer.n_gpus_per_node == 1
