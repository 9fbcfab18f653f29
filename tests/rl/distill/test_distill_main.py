"""The config tree and ``python -m miniray.rl.distill.main``: seed keys, errors, a real run."""

from __future__ import annotations

import json
import time

import pytest
from distill_models import make_models

from miniray.config import from_dict, parse_overrides, read_yaml
from miniray.rl.config import CONFIG_DIR
from miniray.rl.distill.config import DistillConfig, load_distill_config, parse_distill_args
from miniray.rl.distill.main import main

REQUIRED = ["actor_rollout_ref.model.path=/models/student", "data.train_files=train.parquet"]

# The seed's command line (003_gkd_rollout_sync_hang.md), verbatim apart from the paths.
SEED_COMMAND = [
    "--config-name=on_policy_distill_trainer",
    "actor_rollout_ref.model.path=/path/to/Qwen2.5-1.5B-Instruct",
    "data.train_files=/path/to/data.parquet",
    "trainer.total_epochs=1",
    "trainer.n_gpus_per_node=1",
    "rollout.n_gpus_per_node=3",
    "actor_rollout_ref.teacher.server_ip=127.0.0.1",
    "actor_rollout_ref.teacher.server_port=15555",
    "actor_rollout_ref.nccl_timeout=300",
    "trainer.scheduler=one_step_off",
    "actor_rollout_ref.teacher.n_server_workers=4",
    "actor_rollout_ref.teacher.num_microbatches=4",
]


def test_the_seed_command_line_parses():
    cfg = parse_distill_args(SEED_COMMAND)
    assert cfg.actor_rollout_ref.nccl_timeout == 300
    assert cfg.actor_rollout_ref.teacher.server_port == 15555
    assert cfg.actor_rollout_ref.teacher.num_microbatches == 4
    assert cfg.trainer.scheduler == "one_step_off"
    assert cfg.num_rollout_workers == 3
    assert cfg.data.train_files == ["/path/to/data.parquet"]


def test_defaults_are_the_seeds_and_the_yaml_equals_the_dataclasses():
    cfg = load_distill_config(overrides=REQUIRED)
    assert cfg.actor_rollout_ref.nccl_timeout == 600
    t = cfg.actor_rollout_ref.teacher
    assert (t.server_ip, t.server_port, t.n_server_workers) == ("127.0.0.1", 15555, 1)
    assert cfg == from_dict(DistillConfig, parse_overrides(REQUIRED))
    raw = read_yaml(CONFIG_DIR / "on_policy_distill_trainer.yaml")

    def leaves(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and v:
                yield from leaves(v, key)
            else:
                yield key

    from miniray.config import config_keys

    assert sorted(leaves(raw)) == sorted(config_keys(DistillConfig))


def test_bad_keys_and_values_are_named():
    with pytest.raises(ValueError, match=r"'actor_rollout_ref.teacher.server_prot'.*server_port"):
        load_distill_config(overrides=[*REQUIRED, "actor_rollout_ref.teacher.server_prot=1"])
    with pytest.raises(ValueError, match=r"trainer.scheduler='one_step' is invalid"):
        load_distill_config(overrides=[*REQUIRED, "trainer.scheduler=one_step"])
    with pytest.raises(ValueError, match=r"distill.beta=2(\.0)? is invalid: must be <= 1"):
        load_distill_config(overrides=[*REQUIRED, "distill.beta=2"])
    with pytest.raises(
        ValueError, match=r"actor_rollout_ref.nccl_timeout=0(\.0)? is invalid: must be > 0"
    ):
        load_distill_config(overrides=[*REQUIRED, "actor_rollout_ref.nccl_timeout=0"])
    with pytest.raises(ValueError, match=r"teacher.model_path=None is invalid with .*launch=true"):
        load_distill_config(overrides=[*REQUIRED, "actor_rollout_ref.teacher.launch=true"])
    with pytest.raises(ValueError, match=r"data.train_files.*required|must be set"):
        load_distill_config(overrides=["actor_rollout_ref.model.path=x"])
    with pytest.raises(ValueError, match="unknown option '--config'"):
        parse_distill_args(["--config=x"])


def test_help_prints_usage(capsys):
    assert main(["--help"]) == {}
    assert "--config-name=on_policy_distill_trainer" in capsys.readouterr().out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("distill_main"))


def _args(models, tmp_path, *extra):
    return [
        "--config-name=on_policy_distill_trainer",
        f"actor_rollout_ref.model.path={models['student']}",
        f"data.train_files={models['train']}",
        f"data.val_files={models['test']}",
        "data.train_batch_size=8",
        "data.max_response_length=3",
        "actor_rollout_ref.teacher.topk=0",
        "actor_rollout_ref.actor.optim.lr=5e-3",
        f"trainer.default_local_dir={tmp_path}",
        "trainer.experiment_name=run",
        *extra,
    ]


def test_an_unreachable_teacher_fails_within_the_request_timeout(models, tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"127\.0\.0\.1:1"):
        main(
            _args(
                models,
                tmp_path,
                "actor_rollout_ref.teacher.server_port=1",
                "actor_rollout_ref.teacher.request_timeout=1",
                "actor_rollout_ref.teacher.max_retries=0",
            )
        )
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_main_launches_the_teacher_server_and_distils(models, tmp_path, capsys):
    summary = main(
        _args(
            models,
            tmp_path,
            "actor_rollout_ref.teacher.launch=true",
            f"actor_rollout_ref.teacher.model_path={models['teacher']}",
            "actor_rollout_ref.teacher.server_port=0",
            "actor_rollout_ref.teacher.num_microbatches=2",
            "trainer.total_training_steps=8",
            "trainer.scheduler=one_step_off",
            "distill.loss=jsd",
            "distill.beta=0.9",
        )
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    assert summary["steps"] == 8 and summary["max_staleness"] == 1
    assert summary["final_reverse_kl"] < summary["initial_reverse_kl"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 8


def test_measure_schedules_needs_a_pipeline():
    from miniray.rl.distill.measure import measure_schedules

    with pytest.raises(ValueError, match="steps=1 is invalid"):
        measure_schedules(steps=1)
