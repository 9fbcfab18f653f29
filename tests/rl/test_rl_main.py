"""``python -m miniray.rl.main --config-name=... key=value``: config words in, a run out."""

from __future__ import annotations

import json

import pytest

import miniray
from miniray.rl.main import main
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.tasks import ArithmeticTask, write_prompts


@pytest.mark.slow
def test_main_runs_from_config_words(tmp_path, capsys):
    task = ArithmeticTask(max_operand=9)
    tokenizer = char_tokenizer(task.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, tmp_path / "m")
    write_prompts(task.rows(50), tmp_path / "train.jsonl")
    write_prompts(task.rows(6, split="test"), tmp_path / "test.parquet")
    summary = main(
        [
            "--config-name=e2e_minimal",
            f"data.train_files={tmp_path / 'train.jsonl'}",
            f"data.val_files={tmp_path / 'test.parquet'}",
            f"actor_rollout_ref.model.path={tmp_path / 'm'}",
            "data.train_batch_size=2",
            "data.max_response_length=3",
            "actor_rollout_ref.rollout.n=2",
            "async_training.max_queue_size=8",
            "trainer.total_training_steps=2",
            f"trainer.default_local_dir={tmp_path / 'run'}",
        ]
    )
    assert not miniray.is_initialized()
    assert summary["steps"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_main_rejects_a_mistyped_key_by_name():
    with pytest.raises(ValueError, match="max_queue_sise"):
        main(
            [
                "--config-name=e2e_minimal",
                "actor_rollout_ref.model.path=/nonexistent",
                "data.train_files=/nonexistent.parquet",
                "async_training.max_queue_sise=5",
            ]
        )
