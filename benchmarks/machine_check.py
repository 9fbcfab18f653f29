"""Is this machine quiet enough to benchmark? Two CPU-bound loops, alone and two at once.

    python benchmarks/machine_check.py

Async RL on 2 cores overlaps two processes, so its speedup depends on how much two processes
slow each other down: on a quiet 2-vCPU machine little (a few % for a matmul loop, none for a
pure-Python loop); when the host is busy, up to half. Run this before and after a benchmark.
The last line is JSON: seconds alone and two at once, per loop, and the slowdown ratios.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time


def matmul_loop(repeats: int, out: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    out.put(time.perf_counter() - start)


def python_loop(repeats: int, out: mp.Queue) -> None:
    start = time.perf_counter()
    total = 0
    for i in range(repeats):
        total += i * i
    out.put(time.perf_counter() - start)


def timed(target, repeats: int, copies: int) -> list[float]:
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=target, args=(repeats, out)) for _ in range(copies)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return sorted(out.get() for _ in procs)


def main() -> None:
    result = {}
    for name, target, repeats in (
        ("matmul", matmul_loop, 3000),
        ("python", python_loop, 10_000_000),
    ):
        alone = timed(target, repeats, 1)[0]
        both = timed(target, repeats, 2)
        result[name] = {
            "alone_s": round(alone, 3),
            "two_at_once_s": [round(t, 3) for t in both],
            "slowdown": round(both[-1] / alone, 3),
        }
        print(f"{name}: alone {alone:.2f} s, two at once {both[0]:.2f} / {both[1]:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
