"""``measure_schedules``: wall time of the same distillation under ``serial`` and ``one_step_off``.

The workload is real: a student (tiny Qwen2 shape, random weights) generates with one rollout
worker actor, a teacher server process (twice the student's width) scores, the driver trains;
only the scheduler differs between the two runs. Timed is the training loop (``train_loop_s``:
first generation to last step), not process start-up. The weights are random, so responses run
to ``max_response_length`` (no EOS yet) and generation costs what a long response costs:
``one_step_off`` hides it behind training when the machine has a core for each.

    from miniray.rl.distill.measure import measure_schedules
    measure_schedules(steps=10)  # {"one_step_off_s": ..., "serial_s": ..., "speedup": ...}
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

__all__ = ["measure_schedules"]


def measure_schedules(
    *,
    steps: int = 10,
    batch_size: int = 16,
    max_response_length: int = 24,
    workdir: str | pathlib.Path | None = None,
    schedulers: tuple[str, ...] = ("serial", "one_step_off"),
) -> dict[str, Any]:
    """``{"<scheduler>_s": seconds, ..., "speedup": serial_s / one_step_off_s, ...}``."""
    if steps < 2:
        raise ValueError(f"steps={steps} is invalid: must be >= 2 (one_step_off needs a pipeline)")
    with tempfile.TemporaryDirectory(prefix="miniray-distill-measure-") as tmp:
        root = pathlib.Path(workdir or tmp)
        _prepare(root)
        result: dict[str, Any] = {
            "steps": steps,
            "batch_size": batch_size,
            "max_response_length": max_response_length,
        }
        for scheduler in schedulers:
            summary = _run(root, scheduler, steps, batch_size, max_response_length)
            result[f"{scheduler}_s"] = summary["train_loop_s"]
            result[f"{scheduler}_timing"] = {
                k: v for k, v in summary.items() if k.endswith("_s_mean")
            }
    if "serial_s" in result and result.get("one_step_off_s"):
        result["speedup"] = round(result["serial_s"] / result["one_step_off_s"], 3)
    return result


def _prepare(root: pathlib.Path) -> None:
    from miniray.rl.models import char_tokenizer, save, tiny_qwen2
    from miniray.rl.tasks import ArithmeticTask, write_prompts

    task = ArithmeticTask(max_operand=99)
    tokenizer = char_tokenizer(task.alphabet)
    long_context = {"max_position_embeddings": 128}
    save(tiny_qwen2(tokenizer, seed=0, **long_context), tokenizer, root / "student")
    teacher = tiny_qwen2(tokenizer, seed=1, hidden_size=128, intermediate_size=384, **long_context)
    save(teacher, tokenizer, root / "teacher")
    write_prompts(task.rows(2000), root / "train.parquet")


def _run(
    root: pathlib.Path, scheduler: str, steps: int, batch_size: int, max_response_length: int
) -> dict[str, Any]:
    from miniray.rl.distill.loop import run_distillation

    config = {
        "data": {
            "train_files": [str(root / "train.parquet")],
            "train_batch_size": batch_size,
            "max_prompt_length": 16,
            "max_response_length": max_response_length,
        },
        "actor_rollout_ref": {
            "model": {"path": str(root / "student")},
            "actor": {"optim": {"lr": 1e-3}},
            "teacher": {
                "launch": True,
                "model_path": str(root / "teacher"),
                "server_port": 0,
                "topk": 0,
                "request_timeout": 120,
                # One core each for the teacher and the rollout worker: more teacher threads
                # would only fight the generation that one_step_off overlaps with it.
                "num_threads": 1,
            },
            "nccl_timeout": 120,
        },
        "distill": {"loss": "reverse_kl"},
        "trainer": {
            "scheduler": scheduler,
            "total_training_steps": steps,
            "generation_timeout": 300,
        },
        "rollout": {"n_gpus_per_node": 1},
    }
    return run_distillation(config, eval_rows=[]).summary
