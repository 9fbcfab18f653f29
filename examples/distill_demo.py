"""On-policy distillation on this CPU: a small teacher teaches a smaller student arithmetic.

    python examples/distill_demo.py [--steps N] [--scheduler one_step_off] [--loss reverse_kl]
                                    [--name NAME] [--quick]

1. pre-trains a tiny Qwen2-style teacher (~100k parameters) on ``a+b=`` problems until it is
   good at them, and a 10x smaller student only briefly (it knows little more than the format);
2. writes train/test prompts as parquet;
3. runs ``miniray.rl.distill`` with ``actor_rollout_ref.teacher.launch=true``: a teacher server
   process scores the student's own generations (one rollout worker actor generates them) and
   the student trains on the reverse KL to the teacher, one step off;
4. writes ``runs/<name>/report.md`` with ``distill.png`` (the student's reverse KL to the
   teacher and its accuracy against the teacher's), ``metrics.jsonl``, ``summary.json`` and
   ``train.log`` (the run's log: ``grep "weight sync" train.log`` shows seed 003's lines), and
   prints the summary as its last line.

``--quick`` is the smoke-test size (seconds of training, used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Any

import torch

from miniray.rl.distill.loop import DistillResult, run_distillation
from miniray.rl.loop import evaluate_greedy
from miniray.rl.models import char_tokenizer, pretrain, save, tiny_qwen2
from miniray.rl.rewards import RewardScorer, pair_reward
from miniray.rl.tasks import ArithmeticTask, exact_match_reward, load_prompts, write_prompts

TASK = ArithmeticTask(max_operand=9)
STUDENT_SIZE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def prepare(root: pathlib.Path, *, teacher_steps: int, student_steps: int, seed: int) -> float:
    """Teacher, student and data under ``root``; returns the teacher's held-out accuracy."""
    tokenizer = char_tokenizer(TASK.alphabet)
    examples = [(r["prompt"], r["ground_truth"]) for r in TASK.rows(4000)]
    teacher = tiny_qwen2(tokenizer, seed=seed)
    pretrain(teacher, tokenizer, examples, steps=teacher_steps, batch_size=64, lr=3e-3, seed=seed)
    save(teacher, tokenizer, root / "teacher")
    student = tiny_qwen2(tokenizer, seed=seed + 1, **STUDENT_SIZE)
    if student_steps:
        pretrain(student, tokenizer, examples, steps=student_steps, batch_size=64, lr=3e-3)
    save(student, tokenizer, root / "student")
    write_prompts(TASK.rows(4000), root / "train.parquet")
    write_prompts(TASK.rows(100, split="test"), root / "test.parquet")
    rows = load_prompts(root / "test.parquet")
    scorer = RewardScorer(pair_reward(exact_match_reward))
    try:
        return evaluate_greedy(teacher, tokenizer, rows, scorer, max_new_tokens=4)
    finally:
        scorer.close()


def demo_config(root: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    batch = 8 if args.quick else 32
    return {
        "data": {
            "train_files": [str(root / "train.parquet")],
            "train_batch_size": batch,
            "max_prompt_length": 16,
            "max_response_length": 4,
        },
        "actor_rollout_ref": {
            "model": {"path": str(root / "student")},
            "actor": {"optim": {"lr": args.lr}},
            "rollout": {"temperature": 1.0},
            "teacher": {
                "launch": True,
                "model_path": str(root / "teacher"),
                "server_port": 0,  # any free port: the demo must not collide with a real server
                "topk": 0,  # the whole (17-token) vocabulary: the loss is exact
                "request_timeout": 120,
            },
            "nccl_timeout": 120,
        },
        "distill": {"loss": args.loss, "beta": 0.5, "lmbda": 1.0},
        "trainer": {
            "scheduler": args.scheduler,
            "total_epochs": 1 + args.steps * batch // 4000,
            "total_training_steps": args.steps,
            "test_freq": max(1, args.steps // 10),
            "generation_timeout": 300,
            "seed": args.seed,
        },
        "rollout": {"n_gpus_per_node": 1},
    }


def plot(result: DistillResult, teacher_accuracy: float, out: pathlib.Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in result.evals]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, [e["reverse_kl"] for e in result.evals], "o-", label="held-out (greedy)")
    left.plot(
        [m["step"] for m in result.history],
        [m["loss"] for m in result.history],
        alpha=0.3,
        label="training loss",
    )
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("KL(student || teacher) per token")
    left.legend()
    right.plot(steps, [e["accuracy"] for e in result.evals], "o-", label="student")
    right.axhline(teacher_accuracy, color="k", linestyle="--", label="teacher")
    right.set_ylim(0, 1.05)
    right.set_xlabel("step")
    right.set_ylabel("held-out accuracy (greedy)")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "distill.png", dpi=100)
    plt.close(fig)
    return "distill.png"


def write_report(
    result: DistillResult, teacher_accuracy: float, out: pathlib.Path, command: str
) -> pathlib.Path:
    image = plot(result, teacher_accuracy, out)
    s = result.summary
    lines = [
        "# On-policy distillation demo",
        "",
        f"Command: `{command}`",
        "",
        f"Student reverse KL to the teacher (per token, held-out, greedy): "
        f"{s['initial_reverse_kl']:.3f} -> {s['final_reverse_kl']:.3f}; accuracy "
        f"{s['initial_accuracy']:.2f} -> {s['final_accuracy']:.2f} (teacher "
        f"{teacher_accuracy:.2f}) in {s['steps']} steps, {s['train_loop_s']:.0f} s of training "
        f"({s['scheduler']}, loss {s['loss']}).",
        "",
        f"![{image}]({image})",
        "",
        "| step | reverse KL | accuracy |",
        "|---|---|---|",
        *[f"| {e['step']} | {e['reverse_kl']:.4f} | {e['accuracy']:.2f} |" for e in result.evals],
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in s.items()],
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="on-policy distillation on this CPU")
    parser.add_argument("--steps", type=int, default=None, help="default 400 (--quick: 6)")
    parser.add_argument(
        "--scheduler", choices=["serial", "one_step_off", "two_step_off"], default="one_step_off"
    )
    parser.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd"], default="reverse_kl")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke-test size")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 6 if args.quick else 400
    torch.set_num_threads(1)
    name = args.name or f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
    out = pathlib.Path("runs") / name
    out.mkdir(parents=True, exist_ok=True)
    log = logging.FileHandler(out / "train.log", mode="w")
    log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    package = logging.getLogger("miniray.rl.distill")
    package.addHandler(log)
    package.setLevel(logging.INFO)
    print(f"pre-training a teacher and a student in {out} ...", file=sys.stderr)
    teacher_accuracy = prepare(
        out,
        teacher_steps=40 if args.quick else 300,
        student_steps=0 if args.quick else 30,
        seed=args.seed,
    )
    print(f"teacher accuracy {teacher_accuracy:.2f}; distilling ...", file=sys.stderr)
    eval_rows = load_prompts(out / "test.parquet")[: 16 if args.quick else 100]

    def on_step(record: Any, metrics: dict[str, Any]) -> None:
        if "eval/accuracy" in metrics:
            print(
                f"step {metrics['step']}: reverse KL {metrics['eval/reverse_kl']:.4f}, "
                f"accuracy {metrics['eval/accuracy']:.2f}",
                file=sys.stderr,
            )

    try:
        result = run_distillation(
            demo_config(out, args), eval_rows=eval_rows, log_dir=out, on_step=on_step
        )
    finally:
        package.removeHandler(log)
        log.close()
    result.summary["teacher_accuracy"] = teacher_accuracy
    command = "python examples/distill_demo.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = write_report(result, teacher_accuracy, out, command.strip())
    (out / "summary.json").write_text(json.dumps(result.summary, indent=1) + "\n")
    print(f"report: {report}", file=sys.stderr)
    print(json.dumps(result.summary), flush=True)
    return result.summary


if __name__ == "__main__":
    main()
