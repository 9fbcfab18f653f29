"""Teacher tokens/s through the teacher server against the same model called in-process.

    python benchmarks/teacher_throughput.py [--n-server-workers 2] [--num-microbatches 4]
        [--batch-size 32] [--num-batches 3] [--rounds 2] [--hidden-size 256] [--topk 0]

One teacher (a Qwen2-style model built locally with random weights, big enough that the
forward pass dominates) is saved once; both sides score the same batches of 64-128-token
sequences, alternating batch by batch. The in-process floor calls ``TeacherModel.score`` (the
very code the workers run) with every core; the server runs ``n_server_workers`` processes
sharing the same cores, and a ``TeacherClient`` keeps ``num_microbatches`` requests in flight.
tokens/s counts input tokens.
The goal is ``server_tokens_per_s >= 0.8 * inprocess_tokens_per_s``.

Then the same distillation (tiny student, one rollout worker, a teacher server) runs under the
``serial`` and ``one_step_off`` schedules (``miniray.rl.distill.measure``); the goal is
one_step_off measurably faster.

Last line: {"server_tokens_per_s": x, "inprocess_tokens_per_s": y, "one_step_off_s": a,
"serial_s": b, "ratio": x / y, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from typing import Any

import torch

from miniray.rl.distill.measure import measure_schedules
from miniray.rl.distill.teacher_client import TeacherClient
from miniray.rl.distill.teacher_server import start_teacher_server
from miniray.rl.distill.teacher_worker import TeacherModel
from miniray.rl.models.tiny import char_tokenizer, save, tiny_qwen2


def build_teacher(path: str | pathlib.Path, *, hidden_size: int, num_layers: int) -> pathlib.Path:
    tokenizer = char_tokenizer("0123456789+-*=() ")
    model = tiny_qwen2(
        tokenizer,
        seed=0,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        num_key_value_heads=max(1, hidden_size // 128),
        max_position_embeddings=256,
    )
    return save(model, tokenizer, path)


def make_batches(
    num_batches: int, batch_size: int, vocab_size: int, *, min_len: int = 64, max_len: int = 128
) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=gen).tolist()
        batches.append(
            [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]
        )
    return batches


def _tokens(batches: list[list[list[int]]]) -> int:
    return sum(len(seq) for batch in batches for seq in batch)


def measure_server_throughput(
    model_path: str | pathlib.Path,
    batches: list[list[list[int]]],
    *,
    n_server_workers: int = 2,
    num_microbatches: int = 4,
    topk: int = 0,
    temperature: float = 1.0,
    rounds: int = 2,
    inprocess_threads: int | None = None,
    ready_timeout: float = 180.0,
) -> dict[str, Any]:
    """Tokens/s through a fresh server and a ``TeacherClient``, and of the same model called
    in this process (``TeacherModel.score``, the code the workers run) on the same batches.

    The two sides alternate batch by batch (the order flips every round), so a shared
    machine's changing load hits both alike; one warm-up batch each is excluded.
    """
    torch.set_num_threads(inprocess_threads or _cpus())
    teacher = TeacherModel.from_pretrained(str(model_path))
    inputs = [
        (torch.tensor([t for seq in batch for t in seq]), [len(s) for s in batch])
        for batch in batches
    ]

    def inprocess(i: int) -> None:
        teacher.score(*inputs[i], topk=topk, temperature=temperature)

    start = time.perf_counter()
    with start_teacher_server(
        model_path, n_server_workers=n_server_workers, ready_timeout=ready_timeout
    ) as server:
        startup_s = time.perf_counter() - start
        with TeacherClient(
            server_port=server.port, num_microbatches=num_microbatches, request_timeout=300.0
        ) as client:

            def served(i: int) -> None:
                client.score(batches[i], topk=topk, temperature=temperature)

            served(0)
            inprocess(0)
            seconds = {"server": 0.0, "inprocess": 0.0}
            for r in range(rounds):
                for i in range(len(batches)):
                    sides = [("server", served), ("inprocess", inprocess)]
                    for name, call in sides if (r + i) % 2 == 0 else sides[::-1]:
                        t = time.perf_counter()
                        call(i)
                        seconds[name] += time.perf_counter() - t
    tokens = rounds * _tokens(batches)
    return {
        "server_tokens_per_s": tokens / seconds["server"],
        "inprocess_tokens_per_s": tokens / seconds["inprocess"],
        "server_s": seconds["server"],
        "inprocess_s": seconds["inprocess"],
        "tokens": tokens,
        "server_startup_s": startup_s,
        "n_server_workers": n_server_workers,
        "num_microbatches": num_microbatches,
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as tmp:
        path = build_teacher(tmp, hidden_size=args.hidden_size, num_layers=args.num_layers)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        batches = make_batches(args.num_batches, args.batch_size, vocab)
        results: dict[str, Any] = {"batch_size": args.batch_size}
        results.update(
            measure_server_throughput(
                path,
                batches,
                n_server_workers=args.n_server_workers,
                num_microbatches=args.num_microbatches,
                topk=args.topk,
                rounds=args.rounds,
            )
        )
    if args.schedule_steps:
        # The same distillation (student, rollout worker, teacher server) under both schedules.
        schedules = measure_schedules(steps=args.schedule_steps)
        results["one_step_off_s"] = schedules["one_step_off_s"]
        results["serial_s"] = schedules["serial_s"]
        results["schedule_speedup"] = schedules["serial_s"] / schedules["one_step_off_s"]
    results["ratio"] = results["server_tokens_per_s"] / results["inprocess_tokens_per_s"]
    results["cpus"] = _cpus()
    results["load_avg_1m"] = os.getloadavg()[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-server-workers", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-batches", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--topk", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--schedule-steps",
        type=int,
        default=10,
        help="steps of the serial vs one_step_off comparison (0 skips it)",
    )
    args = parser.parse_args()
    results = run(args)
    print(f"{'':<12}{'tokens/s':>12}{'seconds':>10}")
    print(
        f"{'in-process':<12}{results['inprocess_tokens_per_s']:>12.0f}{results['inprocess_s']:>10.2f}"
    )
    print(f"{'server':<12}{results['server_tokens_per_s']:>12.0f}{results['server_s']:>10.2f}")
    print(
        f"server / in-process = {results['ratio']:.2f} (goal >= 0.80); "
        f"{results['n_server_workers']} workers, {results['num_microbatches']} microbatches, "
        f"{results['tokens']} tokens; {results['cpus']} cpus, load {results['load_avg_1m']:.1f}"
    )
    if "serial_s" in results:
        print(
            f"distillation, {args.schedule_steps} steps: serial {results['serial_s']:.2f} s, "
            f"one_step_off {results['one_step_off_s']:.2f} s "
            f"({results['schedule_speedup']:.2f}x)"
        )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
