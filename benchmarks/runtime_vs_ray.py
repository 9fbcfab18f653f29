"""Runtime microbenchmarks, miniray's local backend and Ray side by side in one run.

    python benchmarks/runtime_vs_ray.py            # both (Ray only if importable)
    python benchmarks/runtime_vs_ray.py --quick    # fewer repetitions

Each runtime is measured in its own fresh interpreters (one per init sample, one for the rest),
so neither inherits the other's warm caches or threads. Prints a table, then one JSON line:
{"init_s": {"miniray": x, "ray": y}, "actor_rtt_us": ..., "task_rtt_us": ...,
 "actor_calls_per_s": ..., "numpy_100mb_put_get_ms": ..., "torch_100mb_actor_echo_ms": ...,
 "rss_mib": ...}
Medians everywhere; compare the ratios, not the absolute numbers (this machine is noisy).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

METRICS = [
    ("init_s", "init (2 workers), s", "lower"),
    ("rss_mib", "RSS after init, driver + runtime processes, MiB", "lower"),
    ("actor_rtt_us", "actor call round trip, us", "lower"),
    ("task_rtt_us", "task round trip, us", "lower"),
    ("actor_calls_per_s", "async actor calls/s (1000 in flight)", "higher"),
    ("numpy_100mb_put_get_ms", "numpy 100 MB put+get, ms", "lower"),
    ("torch_100mb_actor_echo_ms", "torch 100 MB actor echo, ms", "lower"),
]


# ----------------------------------------------------------------------------- in the child
def _runtime(name):
    if name == "ray":
        import ray

        return ray, {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
    import miniray

    return miniray, {"backend": "local", "num_workers": 2}


def measure_init(name: str) -> dict:
    rt, kwargs = _runtime(name)
    start = time.perf_counter()
    rt.init(**kwargs)
    init_s = time.perf_counter() - start
    time.sleep(2.0)  # Ray starts its workers in the background: count them too
    rss = _rss_mib()
    rt.shutdown()
    return {"init_s": init_s, "rss_mib": rss}


def _rss_mib() -> float:
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def measure_rest(name: str, reps: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    rt, kwargs = _runtime(name)
    rt.init(**kwargs)

    @rt.remote
    class Echo:
        def ping(self):
            return 1

        def echo(self, value):
            return value

    @rt.remote
    def task():
        return 1

    actor = Echo.remote()
    rt.get(actor.ping.remote())
    rt.get([task.remote() for _ in range(4)])
    out: dict = {}

    def median_us(fn, n):
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6

    for _ in range(100):
        rt.get(actor.ping.remote())
    out["actor_rtt_us"] = median_us(lambda: rt.get(actor.ping.remote()), 10 * reps)
    for _ in range(50):
        rt.get(task.remote())
    out["task_rtt_us"] = median_us(lambda: rt.get(task.remote()), 5 * reps)

    rates = []
    for _ in range(max(3, reps // 20)):
        t0 = time.perf_counter()
        rt.get([actor.ping.remote() for _ in range(1000)])
        rates.append(1000 / (time.perf_counter() - t0))
    out["actor_calls_per_s"] = statistics.median(rates)

    array = np.random.default_rng(0).random(100 * 2**20 // 8)
    samples = []
    for _ in range(max(5, reps // 10)):
        t0 = time.perf_counter()
        ref = rt.put(array)
        value = rt.get(ref)
        samples.append(time.perf_counter() - t0)
        assert value.shape == array.shape
        del ref, value
    out["numpy_100mb_put_get_ms"] = statistics.median(samples) * 1e3

    tensor = torch.rand(100 * 2**20 // 4)
    rt.get(actor.echo.remote(tensor))  # the actor imports torch once
    samples = []
    for _ in range(max(5, reps // 10)):
        t0 = time.perf_counter()
        back = rt.get(actor.echo.remote(tensor))
        samples.append(time.perf_counter() - t0)
        assert back.shape == tensor.shape
        del back
    out["torch_100mb_actor_echo_ms"] = statistics.median(samples) * 1e3
    rt.shutdown()
    return out


# ----------------------------------------------------------------------------- orchestration
def run_child(name: str, what: str, reps: int) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--what", what, "--reps", str(reps)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--what", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = measure_init if args.what == "init" else measure_rest
        result = fn(args.child) if args.what == "init" else fn(args.child, args.reps)
        print(json.dumps(result))
        return

    reps = 30 if args.quick else 100
    init_samples = 3 if args.quick else 5
    runtimes = ["miniray"]
    if importlib.util.find_spec("ray") is not None:
        runtimes.append("ray")
    else:
        print("ray is not importable: measuring miniray only (pip install 'miniray[ray]')")
    results: dict[str, dict] = {}
    for name in runtimes:
        inits = [run_child(name, "init", reps) for _ in range(init_samples)]
        rest = run_child(name, "rest", reps)
        results[name] = {
            "init_s": statistics.median(i["init_s"] for i in inits),
            "rss_mib": statistics.median(i["rss_mib"] for i in inits),
            **rest,
        }

    print(f"{'metric':<42}" + "".join(f"{n:>14}" for n in runtimes) + "   miniray vs ray")
    for key, label, better in METRICS:
        row = f"{label:<42}" + "".join(f"{results[n][key]:>14.3f}" for n in runtimes)
        if "ray" in results:
            ratio = results["ray"][key] / results["miniray"][key]
            if better == "higher":
                ratio = 1 / ratio
            row += f"   {ratio:.1f}x better" if ratio >= 1 else f"   {1 / ratio:.1f}x worse"
        print(row)
    summary = {key: {n: round(results[n][key], 4) for n in runtimes} for key, _, _ in METRICS}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
