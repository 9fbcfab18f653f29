"""One weight synchronization of N workers holding an fp32 model: PS vs gloo vs memcpy.

For each configuration (N workers x M MB; by default 4x100, the goal's, then 2x100, 8x100
and 4x1000):

* ``ps_sync_s``: ``miniray.get(ps.sync_from_workers.remote(workers))`` with the 'average'
  strategy: collect N x M MB, average, push the result back to all N workers; ``phases_ms``
  splits it as the server reports it (gather, validate, aggregate, push) and ``aggregation``
  says which path ran ('sliced' or 'gather', see docs/ps.md "Performance").
* ``gloo_allreduce_s``: ``torch.distributed.all_reduce`` (SUM, then divide by N) over gloo on
  loopback in N processes; the time of the slowest rank, after a barrier.
* ``memcpy_s``: one M MB ``Tensor.copy_``, the floor for moving the bytes once;
  ``memcpys`` is ``ps_sync_s / memcpy_s`` and ``vs_gloo`` is ``ps_sync_s / gloo_allreduce_s``.

Each figure is the median of ``--reps`` timed repetitions after warming up: one repetition
for gloo and memcpy, ``PS_WARMUP`` = 3 for the PS (printed, not counted): its first round
learns the model's layout and is reduced by the server alone, the next two create and map
the two result segments that every later round reuses in turn. Steady state is what a
training run sees, round after round. The last line
printed is JSON: the first configuration's ``ps_sync_s``, ``gloo_allreduce_s``, ``memcpy_s``,
``workers``, ``mbytes``... at the top level, and every configuration under ``"results"``.

    python benchmarks/ps_vs_allreduce.py [--configs 4x100,2x100,8x100,4x1000] [--reps 5]
        [--backend local] [--aggregation auto|sliced|gather] [--num-shards 1]
    python benchmarks/ps_vs_allreduce.py --workers 2 --mbytes 10     # one configuration
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
PS_WARMUP = 3  # rounds; see the module docstring


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
    num_workers: int,
    mbytes: int,
    reps: int,
    backend: str | None,
    num_shards: int = 1,
    aggregation: str = "auto",
) -> dict:
    """Median round time, median per phase, the path taken and the backend's name."""
    miniray.init(backend=backend, num_workers=num_workers)
    try:
        name = miniray.backend_name() or "?"
        ps = create_parameter_server(
            "average",
            sync_timeout_s=TIMEOUT_S,
            push_timeout_s=TIMEOUT_S,
            num_shards=num_shards,
            aggregation=aggregation,
        )
        workers = [BenchWorker.remote(mbytes, i) for i in range(num_workers)]
        miniray.get([w.ready.remote() for w in workers], timeout=TIMEOUT_S)
        miniray.get(ps.get_stats.remote(), timeout=TIMEOUT_S)
        times, phases, paths = [], [], set()
        for rep in range(1 - PS_WARMUP, reps + 1):
            start = time.perf_counter()
            result = miniray.get(ps.sync_from_workers.remote(workers), timeout=TIMEOUT_S)
            elapsed = time.perf_counter() - start
            assert result.applied and len(result.included) == num_workers, result
            split = " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in result.timings.items())
            label = f"round {rep}" if rep > 0 else "warm-up"
            print(f"    ps {label}: {elapsed * 1e3:.0f} ms ({result.aggregation}: {split})")
            if rep > 0:
                times.append(elapsed)
                phases.append(result.timings)
                paths.add(result.aggregation)
        del workers, ps
        return {
            "ps_sync_s": statistics.median(times),
            "phases_ms": {
                k: round(statistics.median(p[k] for p in phases) * 1e3, 1) for k in phases[0]
            },
            "aggregation": "/".join(sorted(paths)),
            "backend": name,
        }
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


DEFAULT_CONFIGS = "4x100,2x100,8x100,4x1000"


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'4x100,2x100' -> [(4, 100), (2, 100)] (workers x MB)."""
    configs = []
    for item in text.split(","):
        workers, sep, mbytes = item.strip().partition("x")
        if not sep or not workers.isdigit() or not mbytes.isdigit() or int(workers) < 1:
            raise SystemExit(
                f"--configs: {item!r} is not WORKERSxMBYTES (e.g. 4x100), workers >= 1"
            )
        configs.append((int(workers), int(mbytes)))
    return configs


def run_config(workers: int, mbytes: int, args: argparse.Namespace) -> dict:
    print(f"sync of {workers} workers x {mbytes} MB fp32, median of {args.reps} reps")
    memcpy_s = time_memcpy(mbytes, args.reps)
    print(f"  memcpy {mbytes} MB             {memcpy_s * 1e3:8.1f} ms")
    gloo_s = time_gloo(workers, mbytes, args.reps)
    print(f"  gloo all_reduce (avg)       {gloo_s * 1e3:8.1f} ms")
    ps = time_ps(workers, mbytes, args.reps, args.backend, args.num_shards, args.aggregation)
    ps_s = ps["ps_sync_s"]
    print(
        f"  miniray PS sync ({ps['backend']:<6})    {ps_s * 1e3:8.1f} ms  = "
        f"{ps_s / memcpy_s:.1f} memcpys, {ps_s / gloo_s:.2f}x gloo ({ps['aggregation']}; "
        f"phases ms {ps['phases_ms']})"
    )
    return {
        "ps_sync_s": round(ps_s, 4),
        "gloo_allreduce_s": round(gloo_s, 4),
        "memcpy_s": round(memcpy_s, 4),
        "memcpys": round(ps_s / memcpy_s, 2),
        "vs_gloo": round(ps_s / gloo_s, 3),
        "workers": workers,
        "mbytes": mbytes,
        "backend": ps["backend"],
        "aggregation": ps["aggregation"],
        "phases_ms": ps["phases_ms"],
        "num_shards": args.num_shards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None, help=f"default {DEFAULT_CONFIGS}")
    parser.add_argument("--workers", type=int, default=None, help="one configuration: workers")
    parser.add_argument("--mbytes", type=int, default=None, help="one configuration: MB")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backend", default=None, help="miniray backend (default: local)")
    parser.add_argument("--num-shards", type=int, default=1, help="parameter-server shards")
    parser.add_argument(
        "--aggregation", default="auto", choices=["auto", "sliced", "gather"], help="PS path"
    )
    args = parser.parse_args()
    if args.workers is not None or args.mbytes is not None:
        if args.configs is not None:
            raise SystemExit("give --configs or --workers/--mbytes, not both")
        configs = [(args.workers or 4, args.mbytes or 100)]
    else:
        configs = parse_configs(args.configs or DEFAULT_CONFIGS)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, configs {configs}")
    results = [run_config(workers, mbytes, args) for workers, mbytes in configs]
    print("  workers x MB   PS (s)  gloo (s)  memcpys  vs gloo  path")
    for r in results:
        print(
            f"  {r['workers']:>7} x {r['mbytes']:<5} {r['ps_sync_s']:7.3f} "
            f"{r['gloo_allreduce_s']:8.3f} {r['memcpys']:8.1f} {r['vs_gloo']:8.2f}  "
            f"{r['aggregation']}"
        )
    print(json.dumps({**results[0], "results": results}))


if __name__ == "__main__":
    main()
