"""Faults injected into real RL runs: a SIGKILLed rollouter, a loss that turns NaN, checkpoint
writers killed mid-save. Each asserts what the run reports and how fast, not just that it ends.

Real processes on the local backend (the rollouter is its own process, as in production), a
tiny model; the fast versions of these checks are in ``tests/rl/``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import miniray
from engine_fakes import echo_generations
from miniray.rl import checkpoint
from miniray.rl.data_position import TrainedPositions
from miniray.rl.errors import NonFiniteWeightsError, ProducerCrashedError
from miniray.rl.loop import run
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.rollouter import as_rl_config
from miniray.rl.tasks import ArithmeticTask, write_prompts
from miniray.rl.trainer import FullyAsyncTrainer

pytestmark = pytest.mark.slow

TASK = ArithmeticTask(max_operand=9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_faults")
    tokenizer = char_tokenizer(TASK.alphabet)
    torch.manual_seed(0)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(200), root / "train.parquet")
    return root


def config(workdir, *, steps=40, trigger=1, out=None, **async_training):
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
        "async_training": {"max_queue_size": 8, "generation_timeout": 30, **async_training},
        "trainer": {
            "total_training_steps": steps,
            "trigger_parameter_sync_step": trigger,
            "default_local_dir": str(out or workdir / "runs"),
        },
    }


@pytest.fixture
def local():
    miniray.init(backend="local", num_workers=1)
    yield
    miniray.shutdown()


# -- a SIGKILLed rollouter --------------------------------------------------------------------
class PidEngine:
    """Writes the pid of the process it generates in (the rollouter's) to ``pid_file``."""

    def __init__(self, pid_file):
        self.pid_file = str(pid_file)

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        if not os.path.exists(self.pid_file):
            with open(self.pid_file + ".part", "w") as f:
                f.write(str(os.getpid()))
            os.rename(self.pid_file + ".part", self.pid_file)
        time.sleep(0.02)
        return echo_generations(prompts)

    def load_weights(self, state_dict, *, take=False):
        pass


@pytest.mark.parametrize(
    ("trigger", "timeout"),
    [
        pytest.param(1000, 30, id="no_sync_pending"),
        pytest.param(1, 30, id="syncing"),
        pytest.param(1, math.inf, id="syncing_no_deadline"),
    ],
)
def test_a_sigkilled_rollouter_is_a_producer_crash_within_a_second(
    local, workdir, tmp_path, trigger, timeout
):
    pid_file = tmp_path / "rollouter.pid"
    killed_at: list[float] = []

    def kill_the_rollouter(step, metrics):
        if step == 3:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # as the OOM killer would
            killed_at.append(time.monotonic())

    cfg = config(
        workdir,
        trigger=trigger,
        generation_timeout=timeout,
        sync_retry_delay=1.0,
        max_sync_retries=3,
    )
    with pytest.raises(ProducerCrashedError, match="the rollouter died") as info:
        run(cfg, engine=PidEngine(pid_file), on_step=kill_the_rollouter)
    reported_after = time.monotonic() - killed_at[0]
    assert reported_after < 2.0, f"the dead rollouter was reported after {reported_after:.1f}s"
    assert "FullyAsyncRollouter" in str(info.value) and info.value.producer_error
    assert "not paused" not in str(info.value)


# -- a loss that turns NaN --------------------------------------------------------------------
class DivergingTrainer(FullyAsyncTrainer):
    """A real trainer whose forward pass turns NaN at update ``nan_at``: the loss is NaN, the
    gradient clip scales by a NaN norm, and AdamW writes NaN into every parameter."""

    nan_at = 3

    def train_step(self, groups):
        if self.updater.steps + 1 != self.nan_at:
            return super().train_step(groups)
        forward = self.model.forward

        def nan_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = out.logits * math.nan
            return out

        self.model.forward = nan_forward
        try:
            return super().train_step(groups)
        finally:
            del self.model.forward


def test_a_nan_loss_fails_the_run_at_its_step_before_the_rollouter_samples_from_it(local, workdir):
    # The real transformers engine in the rollouter: NaN weights would crash its sampling
    # (torch.multinomial), far from the cause. Step 3 is not a publishing step (every 2): the
    # non-finite loss itself makes the loop check the weights at once.
    cfg = config(workdir, steps=6, trigger=2)
    trainer = DivergingTrainer(cfg)
    first = next(iter(trainer.get_weights()))
    with pytest.raises(NonFiniteWeightsError, match=rf"^step 3: .*{first}") as info:
        run(cfg, trainer=trainer)
    assert (info.value.step, info.value.parameter) == (3, first)
    assert "loss" in str(info.value) and "actor_rollout_ref.actor.optim.lr" in str(info.value)


# -- checkpoint writers killed mid-save -------------------------------------------------------
# A checkpoint writer in its own process, stopped in torch.save: "killed" SIGKILLs itself there
# (as the OOM killer would), "held" waits for a line on stdin, "killed_swapping" dies between
# moving the step's old checkpoint aside and renaming the new one into place.
WRITER = """
import os, signal, sys
import torch
from miniray.rl import checkpoint

path, mode = sys.argv[1], sys.argv[2]
real_save, real_rename = torch.save, os.rename

def save(obj, f, *args, **kwargs):
    real_save({"half": torch.zeros(3)}, f)
    if mode == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "held":
        print("writing", flush=True)
        sys.stdin.readline()
    real_save(obj, f, *args, **kwargs)

def rename(src, dst):
    real_rename(src, dst)
    if mode == "killed_swapping" and str(dst).endswith("previous"):
        os.kill(os.getpid(), signal.SIGKILL)

torch.save, os.rename = save, rename
checkpoint.write(path, {"extra": {"step": 0}, "writer": mode}, {"w": torch.ones(2)})
"""


def start_writer(path, mode):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_the_next_save_removes_a_killed_saves_directory_but_not_a_save_in_progress(
    workdir, tmp_path
):
    cfg = as_rl_config(config(workdir, out=tmp_path))
    trainer = FullyAsyncTrainer(cfg)
    ckpt_dir = checkpoint.checkpoint_dir(cfg)
    checkpoint.save_step(trainer, cfg, 1, {"step": 1, "data_position": {}})
    killed = start_writer(ckpt_dir / "global_step_2", "killed")
    held = start_writer(ckpt_dir / "global_step_3", "held")
    try:
        assert killed.wait(60) == -signal.SIGKILL
        assert held.stdout.readline() == "writing\n"
        assert [n.split(".")[0] for n in leftovers(ckpt_dir)] == ["global_step_2", "global_step_3"]
        checkpoint.save_step(trainer, cfg, 4, {"step": 4, "data_position": {}})
        # The killed writer's directory is gone; the one still writing keeps its own.
        assert [n.split(".")[0] for n in leftovers(ckpt_dir)] == ["global_step_3"]
        held.stdin.write("go on\n")
        held.stdin.flush()
        assert held.wait(60) == 0
    finally:
        for proc in (killed, held):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert leftovers(ckpt_dir) == []
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)] == [1, 3, 4]


class EchoEngine:
    def generate(self, prompts, **kwargs):
        return echo_generations(prompts)

    def load_weights(self, state_dict, *, take=False):
        pass


def test_a_resume_restores_a_checkpoint_a_killed_save_had_moved_aside(workdir, tmp_path):
    cfg = as_rl_config(config(workdir, steps=4, out=tmp_path, mode="sync"))
    trainer = FullyAsyncTrainer(cfg)
    ckpt_dir = checkpoint.checkpoint_dir(cfg)
    trained = TrainedPositions()
    for position in range(4):
        trained.add(position)
    checkpoint.save_step(trainer, cfg, 2, {"step": 2, "data_position": trained.to_dict()})
    # Killed while replacing global_step_2: the old one is aside, the new one not yet in place.
    writer = start_writer(ckpt_dir / "global_step_2", "killed_swapping")
    assert writer.wait(60) == -signal.SIGKILL
    assert not (ckpt_dir / "global_step_2").exists() and len(leftovers(ckpt_dir)) == 2
    miniray.init(backend="inline")
    try:
        result = run(cfg, engine=EchoEngine())  # trainer.resume_mode=auto
    finally:
        miniray.shutdown()
    assert result.resumed_from == str(ckpt_dir / "global_step_2")
    assert [m["step"] for m in result.history] == [3, 4]
    assert leftovers(ckpt_dir) == []
