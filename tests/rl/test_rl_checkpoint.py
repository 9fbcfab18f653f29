"""Checkpoint and resume of an RL run: nothing lost, nothing counted twice, written atomically.

The runs use the inline backend (one process) and a deterministic fake engine, so a run takes
about a second and the sync-mode runs are exactly reproducible: a crashed-and-resumed run must
end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from rl_fakes import Crash, DeterministicEngine, reward_by_digit

import miniray
from miniray.rl import checkpoint
from miniray.rl.config_loading import load_rl_config
from miniray.rl.data_position import PromptCursor, PromptOrder, TrainedPositions
from miniray.rl.loop import run
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.rollouter import as_rl_config
from miniray.rl.tasks import ArithmeticTask, write_prompts
from miniray.rl.trainer import FullyAsyncTrainer
from process_support import dead_pid

TASK = ArithmeticTask(max_operand=9)
STEPS, BATCH = 6, 2


# -- the data position ----------------------------------------------------------------------
def test_prompt_order_is_a_seeded_permutation_per_epoch():
    order = PromptOrder(7, seed=3)
    epochs = [[order.row(e * 7 + i) for i in range(7)] for e in range(3)]
    assert all(sorted(rows) == list(range(7)) for rows in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled each epoch
    assert [PromptOrder(7, seed=3).row(p) for p in range(21)] == [
        row for rows in epochs for row in rows
    ]
    assert [PromptOrder(7, seed=4).row(p) for p in range(7)] != epochs[0]
    assert [PromptOrder(4, shuffle=False).row(p) for p in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="num_rows=0"):
        PromptOrder(0)


def test_trained_positions_slide_a_watermark_and_refuse_a_double_count():
    trained = TrainedPositions()
    for position in (0, 2, 1, 5):
        trained.add(position)
    assert trained.to_dict() == {"watermark": 3, "above": [5]}
    assert len(trained) == 4 and 2 in trained and 4 not in trained
    with pytest.raises(ValueError, match="position 2 was already trained"):
        trained.add(2)
    again = TrainedPositions.from_dict(trained.to_dict())
    assert again.positions() == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="missing keys"):
        TrainedPositions.from_dict({"watermark": 1})
    with pytest.raises(ValueError, match="position=-1"):
        trained.add(-1)


def test_cursor_reissues_given_back_positions_and_skips_trained_ones():
    cursor = PromptCursor()
    assert [cursor.next() for _ in range(3)] == [0, 1, 2]
    cursor.give_back(1)
    assert [cursor.next() for _ in range(2)] == [1, 3]
    resumed = PromptCursor(TrainedPositions(2, [3, 5]))
    assert [resumed.next() for _ in range(4)] == [2, 4, 6, 7]


def test_resume_path_needs_a_path_and_names_a_missing_checkpoint(tmp_path):
    data = {"data": {"train_files": ["x"]}, "actor_rollout_ref": {"model": {"path": "m"}}}
    with pytest.raises(ValueError, match=r"trainer\.resume_from_path"):
        load_rl_config(data=data, overrides=["trainer.resume_mode=resume_path"])
    cfg = load_rl_config(
        data=data,
        overrides=["trainer.resume_mode=resume_path", f"trainer.resume_from_path={tmp_path}"],
    )
    with pytest.raises(FileNotFoundError, match="holds no global_step_<N> checkpoint"):
        checkpoint.resume_path(cfg)
    disabled = load_rl_config(data=data, overrides=["trainer.resume_mode=disable"])
    assert checkpoint.resume_path(disabled) is None


# -- runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_ckpt")
    tokenizer = char_tokenizer(TASK.alphabet)
    torch.manual_seed(0)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(40), root / "train.parquet")
    return root


def config(workdir, out, mode, **trainer):
    return {
        "data": {
            "train_files": [str(workdir / "train.parquet")],
            "train_batch_size": BATCH,
            "max_prompt_length": 8,
            "max_response_length": 2,
        },
        "actor_rollout_ref": {
            "model": {"path": str(workdir / "model")},
            "actor": {"optim": {"lr": 1e-2}},
            "rollout": {"n": 4},
        },
        "async_training": {"mode": mode, "max_queue_size": 8, "staleness_threshold": 1},
        "trainer": {
            "total_training_steps": STEPS,
            "default_local_dir": str(out),
            "resume_mode": "auto",
            **trainer,
        },
    }


def do_run(workdir, out, mode, *, crash_at=None, **trainer_cfg):
    cfg = as_rl_config(config(workdir, out, mode, **trainer_cfg))
    trainer = FullyAsyncTrainer(cfg)
    digits = [trainer.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]

    def on_step(step, metrics):
        if step == crash_at:
            raise Crash(f"killed at step {step}")

    miniray.init(backend="inline", num_workers=1)
    try:
        result = run(
            cfg,
            reward_fn=reward_by_digit,
            engine=DeterministicEngine(digits),
            trainer=trainer,
            on_step=on_step,
        )
    finally:
        miniray.shutdown()
    return result, trainer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_neither_loses_nor_double_counts(workdir, tmp_path, mode):
    straight, straight_trainer = do_run(workdir, tmp_path / "straight", mode)
    expected = collections.Counter(p for step in straight.trained_positions for p in step)
    # With in-order generation and no stale drops, a run trains exactly the first prompts.
    assert expected == collections.Counter(range(STEPS * BATCH))

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        do_run(workdir, out, mode, crash_at=5, save_freq=2)  # checkpoints at steps 2 and 4
    ckpt_dir = checkpoint.checkpoint_dir(as_rl_config(config(workdir, out, mode)))
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)] == [2, 4]

    resumed, resumed_trainer = do_run(workdir, out, mode, save_freq=2)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("global_step_4")
    # Step and version numbering continue from the checkpoint.
    assert [m["step"] for m in resumed.history] == [5, 6]
    assert [m["version"] for m in resumed.history] == [5, 6]
    assert resumed_trainer.version == 6 and resumed_trainer.updater.steps == STEPS
    # What step 5 of the crashed run trained died with it; the checkpoint's data position plus
    # the resumed run's steps are exactly the uninterrupted run's prompts: each once.
    ckpt = checkpoint.latest_checkpoint(ckpt_dir)
    assert ckpt is not None and ckpt.name == "global_step_6"
    state = FullyAsyncTrainer(as_rl_config(config(workdir, out, mode)))
    final_extra = state.load_checkpoint(ckpt)
    step4 = TrainedPositions.from_dict(
        FullyAsyncTrainer(as_rl_config(config(workdir, out, mode))).load_checkpoint(
            ckpt_dir / "global_step_4"
        )["data_position"]
    )
    across = collections.Counter(step4.positions())
    across.update(p for step in resumed.trained_positions for p in step)
    assert across == expected
    assert TrainedPositions.from_dict(final_extra["data_position"]).positions() == sorted(expected)
    assert final_extra["step"] == STEPS and state.version == 6
    if mode == "sync":
        # Same prompts, same order, model + optimizer + RNG restored: the same final weights.
        for name, value in straight_trainer.model.state_dict().items():
            torch.testing.assert_close(resumed_trainer.model.state_dict()[name], value)
    assert resumed.summary["max_age"] <= 1


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(
    workdir, tmp_path, monkeypatch
):
    cfg = as_rl_config(config(workdir, tmp_path, "sync"))
    trainer = FullyAsyncTrainer(cfg)
    trainer.set_version(1)
    first = checkpoint.save_step(trainer, cfg, 1, {"step": 1, "data_position": {}})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(1.0)
    trainer.set_version(2)
    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(3)}, f)  # some bytes reach the disk, then the crash
        raise OSError("disk died mid-write")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="mid-write"):
        checkpoint.save_step(trainer, cfg, 2, {"step": 2, "data_position": {}})
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = checkpoint.checkpoint_dir(cfg)
    assert checkpoint.latest_checkpoint(ckpt_dir) == first
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)] == [1]
    assert not (ckpt_dir / "global_step_2").exists()
    fresh = FullyAsyncTrainer(cfg)
    assert fresh.load_checkpoint(checkpoint.resume_path(cfg))["step"] == 1
    assert fresh.version == 1
    for name, value in before.items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value)


def test_old_checkpoints_are_pruned_and_a_trainer_without_save_is_named(workdir, tmp_path):
    cfg = as_rl_config(config(workdir, tmp_path, "sync", max_actor_ckpt_to_keep=2))
    trainer = FullyAsyncTrainer(cfg)
    for step in (1, 2, 3):
        checkpoint.save_step(trainer, cfg, step, {"step": step, "data_position": {}})
    steps = [s for s, _ in checkpoint.list_checkpoints(checkpoint.checkpoint_dir(cfg))]
    assert steps == [2, 3]
    with pytest.raises(TypeError, match="has no save_checkpoint"):
        checkpoint.save_step(object(), cfg, 4, {})


def writer_dir(directory, step, kind, pid):
    """A directory named as ``checkpoint.write`` names its temporaries, for writer ``pid``."""
    from miniray import atomic_dir

    path = Path(atomic_dir.temp_name(str(directory / f"global_step_{step}"), kind, pid=pid))
    path.mkdir(parents=True)
    (path / "trainer.pt").write_bytes(b"half a checkpoint")
    return path


def test_a_save_removes_temporaries_of_dead_writers_only(workdir, tmp_path, monkeypatch):
    import os

    from miniray import atomic_dir

    cfg = as_rl_config(config(workdir, tmp_path, "sync"))
    trainer = FullyAsyncTrainer(cfg)
    ckpt_dir = checkpoint.checkpoint_dir(cfg)
    stale = writer_dir(ckpt_dir, 2, "tmp", dead_pid())
    stale_old = writer_dir(ckpt_dir, 4, "old", dead_pid())
    running = writer_dir(ckpt_dir, 3, "tmp", os.getpid())  # a save in progress: keep it
    elsewhere = ckpt_dir / "global_step_3.tmp-anotherhost-1-abcd1234"  # cannot be asked
    foreign = ckpt_dir / "global_step_3.tmp-notours"  # not this writer's naming
    for path in (elsewhere, foreign):
        path.mkdir()
    written_in = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        written_in.append(Path(f).parent.name)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    first = checkpoint.save_step(trainer, cfg, 1, {"step": 1, "data_position": {}})
    assert not stale.exists() and not stale_old.exists()
    assert running.exists() and elsewhere.exists() and foreign.exists()
    # The writer names its temporaries with its pid and host, so a later run can tell whose.
    owner = ("global_step_1", "tmp", atomic_dir.HOST, os.getpid())
    assert atomic_dir.owner(written_in[0]) == owner
    assert checkpoint.latest_checkpoint(ckpt_dir) == first
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith("global_step_1.")]


def test_a_hugging_face_export_rides_in_the_atomic_write_and_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = char_tokenizer("0123456789+=")
    model = tiny_qwen2(tokenizer, seed=3)
    path = checkpoint.write(
        tmp_path / "global_step_1", {"step": 1}, {"x": torch.ones(1)}, hf_model=(model, tokenizer)
    )
    export = path / checkpoint.HF_DIR
    assert (export / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(export)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (
        AutoTokenizer.from_pretrained(export)("1+2")["input_ids"] == tokenizer("1+2")["input_ids"]
    )
    assert not list(tmp_path.glob("*.tmp-*"))  # written inside the temporary directory


def test_a_failing_export_leaves_no_checkpoint_behind(tmp_path):
    class Unsaveable:
        def save_pretrained(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.write(tmp_path / "global_step_1", {}, {}, hf_model=(Unsaveable(), None))
    assert list(tmp_path.iterdir()) == []
