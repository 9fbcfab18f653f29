"""One weight synchronization of N workers holding a 100 MB fp32 model: PS vs gloo vs memcpy.

* ``ps_sync_s``: ``miniray.get(ps.sync_from_workers.remote(workers))`` with the 'average'
  strategy: collect N x 100 MB, average, push the result back to all N workers.
* ``gloo_allreduce_s``: ``torch.distributed.all_reduce`` (SUM, then divide by N) over gloo on
  loopback in N processes; the time of the slowest rank, after a barrier.
* ``memcpy_s``: one 100 MB ``Tensor.copy_``, the floor for moving the bytes once.

Each figure is the median of ``--reps`` timed repetitions after one warm-up. The last line
printed is JSON: ``{"ps_sync_s", "gloo_allreduce_s", "memcpy_s", "workers", "mbytes", ...}``.

    python benchmarks/ps_vs_allreduce.py [--workers 4] [--mbytes 100] [--reps 5] [--backend local]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import miniray
from miniray.ps import create_parameter_server

TIMEOUT_S = 300


def model(mbytes: int, seed: int, num_tensors: int = 4) -> list[torch.Tensor]:
    """``mbytes`` MB of fp32 split over a few tensors, like the layers of a model."""
    numel = mbytes * 1_000_000 // 4 // num_tensors
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(numel, generator=g) for _ in range(num_tensors)]


@miniray.remote
class BenchWorker:
    def __init__(self, mbytes: int, seed: int):
        torch.set_num_threads(1)
        self.weights = model(mbytes, seed)

    def get_weights(self) -> list[torch.Tensor]:
        return self.weights

    def set_weights(self, weights: list[torch.Tensor]) -> None:
        # Load into the existing buffers, as a model's parameters would be.
        for mine, new in zip(self.weights, weights):
            mine.copy_(new)

    def ready(self) -> bool:
        return True


def time_ps(
    num_workers: int, mbytes: int, reps: int, backend: str | None, num_shards: int = 1
) -> tuple[float, str]:
    miniray.init(backend=backend, num_workers=num_workers)
    try:
        name = miniray.backend_name() or "?"
        ps = create_parameter_server(
            "average", sync_timeout_s=TIMEOUT_S, push_timeout_s=TIMEOUT_S, num_shards=num_shards
        )
        workers = [BenchWorker.remote(mbytes, i) for i in range(num_workers)]
        miniray.get([w.ready.remote() for w in workers], timeout=TIMEOUT_S)
        miniray.get(ps.get_stats.remote(), timeout=TIMEOUT_S)
        times = []
        for rep in range(reps + 1):
            start = time.perf_counter()
            result = miniray.get(ps.sync_from_workers.remote(workers), timeout=TIMEOUT_S)
            elapsed = time.perf_counter() - start
            assert result.applied and len(result.included) == num_workers, result
            if rep:  # the first round also allocates the server's buffers
                times.append(elapsed)
                phases = " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in result.timings.items())
                print(f"    ps round {rep}: {elapsed * 1e3:.0f} ms ({phases})")
        return statistics.median(times), name
    finally:
        miniray.shutdown()


def _gloo_rank(rank: int, world: int, port: int, mbytes: int, reps: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        tensors = model(mbytes, rank)
        times = []
        for rep in range(reps + 1):
            dist.barrier()
            start = time.perf_counter()
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)  # AVG is not portable across backends
                t.div_(world)
            elapsed = time.perf_counter() - start
            if rep:
                times.append(elapsed)
        out.put((rank, times))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_gloo(num_workers: int, mbytes: int, reps: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_gloo_rank, args=(r, num_workers, port, mbytes, reps, out))
        for r in range(num_workers)
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=TIMEOUT_S) for _ in procs)
    for p in procs:
        p.join(TIMEOUT_S)
    # A collective finishes when its slowest rank does.
    per_rep = [max(results[r][i] for r in results) for i in range(reps)]
    return statistics.median(per_rep)


def time_memcpy(mbytes: int, reps: int) -> float:
    src = torch.rand(mbytes * 1_000_000 // 4)
    dst = torch.empty_like(src)
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        dst.copy_(src)
        elapsed = time.perf_counter() - start
        if rep:
            times.append(elapsed)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--mbytes", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backend", default=None, help="miniray backend (default: local)")
    parser.add_argument("--num-shards", type=int, default=1, help="parameter-server shards")
    args = parser.parse_args()
    print(
        f"sync of {args.workers} workers x {args.mbytes} MB fp32, median of {args.reps} reps, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    memcpy_s = time_memcpy(args.mbytes, args.reps)
    print(f"  memcpy {args.mbytes} MB           {memcpy_s * 1e3:8.1f} ms")
    gloo_s = time_gloo(args.workers, args.mbytes, args.reps)
    print(f"  gloo all_reduce (avg)     {gloo_s * 1e3:8.1f} ms")
    ps_s, backend = time_ps(args.workers, args.mbytes, args.reps, args.backend, args.num_shards)
    print(f"  miniray PS sync ({backend:<6})  {ps_s * 1e3:8.1f} ms")
    print(
        json.dumps(
            {
                "ps_sync_s": round(ps_s, 4),
                "gloo_allreduce_s": round(gloo_s, 4),
                "memcpy_s": round(memcpy_s, 4),
                "workers": args.workers,
                "mbytes": args.mbytes,
                "backend": backend,
                "num_shards": args.num_shards,
            }
        )
    )


if __name__ == "__main__":
    main()
