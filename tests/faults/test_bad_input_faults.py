"""Bad input where users type it: the RL command line and a driver script, each a fresh process.

The unit tests check the rules (``tests/rl/test_rl_config.py``, ``tests/rl/test_rl_run_guards.py``,
the timeout block of ``tests/runtime/test_conformance.py``); these run them the way a user hits
them (issue 21, items 7, 8, 9 and 12): ``python -m miniray.rl.main`` with the words a user pastes,
and a script that gives ``get``/``wait`` the timeouts people write. A refusal must end the process
with an error naming the key (or argument) and the rule, before any work starts; what is allowed
must run to the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.tasks import ArithmeticTask, write_prompts

pytestmark = pytest.mark.slow

TASK = ArithmeticTask(max_operand=9)


def run_python(args, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    tokenizer = char_tokenizer(TASK.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    rows = [{"question": r["prompt"], "solution": r["ground_truth"]} for r in TASK.rows(30)]
    # Two prompts far over data.max_prompt_length=8: skipped, never cut to a shorter problem.
    rows += [
        {"question": "1+2+3+4+5=", "solution": "15"},
        {"question": "11+22+33=", "solution": "66"},
    ]
    write_prompts(rows, root / "questions.parquet")
    return root


def words(workdir, *extra):
    return [
        "-m",
        "miniray.rl.main",
        "--config-name=e2e_minimal",
        f"data.train_files={workdir / 'questions.parquet'}",
        "data.prompt_key=question",
        "data.answer_key=solution",
        "data.max_prompt_length=8",
        f"actor_rollout_ref.model.path={workdir / 'model'}",
        "data.train_batch_size=2",
        "data.max_response_length=2",
        "actor_rollout_ref.rollout.n=2",
        "async_training.max_queue_size=8",
        "trainer.total_training_steps=2",
        f"trainer.default_local_dir={workdir / 'run'}",
        *extra,
    ]


@pytest.mark.parametrize(
    ("word", "named"),
    [
        ("actor_rollout_ref.actor.optim.lr=inf", "actor_rollout_ref.actor.optim.lr"),
        ("async_training.weight_extrapolation=inf", "async_training.weight_extrapolation"),
        ("async_training.generation_timeout=nan", "async_training.generation_timeout"),
        ("actor_rollout_ref.actor.optim.lr=nan", "actor_rollout_ref.actor.optim.lr"),
    ],
)
def test_the_command_line_refuses_a_non_finite_value_by_its_key(workdir, word, named):
    done = run_python(words(workdir, word))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert named in last and ("finite" in last or "NaN" in last), done.stderr[-2000:]
    assert not (workdir / "run" / "metrics.jsonl").exists(), "a refused run must not start"


def test_the_command_line_runs_with_no_deadline_a_named_column_and_long_prompts(workdir):
    done = run_python(words(workdir, "async_training.generation_timeout=inf"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert summary["prompts_skipped_too_long"] == 2


DRIVER = textwrap.dedent(
    """
    import math, miniray

    miniray.init(backend="local", num_workers=1)

    @miniray.remote
    def double(x):
        return 2 * x

    @miniray.remote
    def waits_inside(ref_list):
        return miniray.get(ref_list[0], timeout=float("inf")) + 1

    ref = double.remote(21)
    assert miniray.get(ref, timeout=float("inf")) == 42
    assert miniray.get(ref, timeout=1e10) == 42
    ready, _ = miniray.wait([ref], timeout=float("inf"))
    assert ready == [ref]
    assert miniray.get(waits_inside.remote([double.remote(1)]), timeout=1e30) == 3
    for bad in (math.nan, -1.0):
        try:
            miniray.get(ref, timeout=bad)
        except ValueError as e:
            assert "timeout" in str(e), e
        else:
            raise AssertionError(f"timeout={bad} was accepted")
    miniray.shutdown()
    print("ok")
    """
)


def test_a_driver_script_waits_forever_on_inf_and_is_told_off_for_nan(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = run_python([str(script)], timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
