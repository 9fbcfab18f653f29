"""Parameter sweeps of fully asynchronous RL, written up as a report (run by run_benchmark.sh).

    python benchmarks/rl_sweep.py --out DIR [--size tiny|quick|full]

Sweeps, one factor at a time around a baseline (async, k=1, queue 64, balanced speeds):

* staleness_threshold k in {0, 1, 3};
* max_queue_size: small (one batch) and large (64);
* generation interval: the fake engine's median group time at 0.5x, 1x, 2x the balanced one;
* mode: the synchronous baseline against async at the baseline point (the speedup);
* CPU split: torch threads of trainer:rollouter on the real tiny model (transformers);
* pause/resume: latency of ``pause_rollout``/``resume_rollout`` called while generating, with
  the fake engine and with the tiny model.

Everything but the CPU split and the second pause/resume row uses the fake ``LongTailEngine``
(log-normal group times) and ``FixedTimeTrainer`` of ``async_vs_sync.py``, so the numbers show
the scheduling, not model noise; those runs use the inline backend by default (no process
start-up per run). The CPU split and pause/resume run on the local backend: real processes. Writes DIR/performance_report.md (tables, PNG plots),
DIR/summary.txt and DIR/logs/<run>.log (per-step metrics as JSON lines, then the summary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import time
from typing import Any

import torch

import miniray
from miniray.rl.engines import HFGenerationEngine
from miniray.rl.loop import RunResult, run
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.queue import MessageQueue
from miniray.rl.rollouter import FullyAsyncRollouter
from miniray.rl.tasks import ArithmeticTask, write_prompts

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from async_vs_sync import FixedTimeTrainer, LongTailEngine, span

TASK = ArithmeticTask(max_operand=9)
BATCH, N = 4, 4  # groups per step, responses per group
GROUP_MEDIAN_S = 0.03


def _mean_group_factor(draws: int = 20_000) -> float:
    """E[group time] / median for LongTailEngine: the max of N log-normal(0, 1) draws, capped
    at 20 x median as it caps them (seeded Monte Carlo: the same number every run)."""
    rng = random.Random(0)
    total = sum(min(max(rng.lognormvariate(0, 1) for _ in range(N)), 20.0) for _ in range(draws))
    return total / draws


# Balanced: the trainer's step takes as long as generating one batch of B groups, on average.
STEP_S = BATCH * GROUP_MEDIAN_S * _mean_group_factor()

SIZES = {
    # steps per fake run, steps per real run, pause/resume trials, CPU splits
    "tiny": {"steps": 3, "real_steps": 2, "trials": 3, "splits": [(1, 1)]},
    "quick": {"steps": 12, "real_steps": 6, "trials": 15, "splits": [(1, 1), (1, 2)]},
    "full": {"steps": 40, "real_steps": 20, "trials": 50, "splits": [(1, 1), (2, 1), (1, 2)]},
}


class ThreadedHFEngine:
    """The transformers engine, built inside the rollouter's process with its own torch
    thread count (an engine built here and shipped would keep this process's setting)."""

    def __init__(self, model_path: str, threads: int):
        self.model_path = model_path
        self.threads = threads
        self._engine: HFGenerationEngine | None = None

    def _get(self) -> HFGenerationEngine:
        if self._engine is None:
            self._engine = HFGenerationEngine(model_path=self.model_path, num_threads=self.threads)
        return self._engine

    def generate(self, prompts, **kwargs):
        return self._get().generate(prompts, **kwargs)

    def load_weights(self, state_dict, *, take=False):
        self._get().load_weights(state_dict)

    def state_dict(self):
        return self._get().state_dict()


def make_workload(root: pathlib.Path) -> pathlib.Path:
    """An untrained tiny model and prompts: throughput does not need a trained policy."""
    tokenizer = char_tokenizer(TASK.alphabet)
    save(tiny_qwen2(tokenizer, seed=0), tokenizer, root / "model")
    write_prompts(TASK.rows(500), root / "train.parquet")
    return root


def config(
    root: pathlib.Path, *, steps: int, mode="async", k=1, queue=64, fake=False
) -> dict[str, Any]:
    """The fake engine's responses are long (its tail must not be cut) and it samples one
    group per call, which its balance (``STEP_S``) assumes; the tiny model answers in 4."""
    return {
        "data": {
            "train_files": [str(root / "train.parquet")],
            "train_batch_size": BATCH,
            "max_prompt_length": 16,
            "max_response_length": 4096 if fake else 4,
        },
        "actor_rollout_ref": {
            "model": {"path": str(root / "model")},
            "actor": {"optim": {"lr": 1e-4}},
            "rollout": {"n": N},
        },
        "async_training": {
            "mode": mode,
            "staleness_threshold": k,
            "max_queue_size": queue,
            "max_concurrent_rollouts": N if fake else 16,
            "generation_timeout": 300,
        },
        "trainer": {"total_training_steps": steps, "resume_mode": "disable"},
    }


def one_run(
    name: str, cfg: dict, logs: pathlib.Path, *, backend: str, engine=None, trainer=None
) -> dict:
    """One run on a fresh runtime; its per-step metrics and summary go to logs/<name>.log."""
    print(f"[rl_sweep] {name} ...", flush=True)
    started = time.time()
    miniray.init(backend=backend, num_workers=1)
    try:
        result: RunResult = run(cfg, engine=engine, trainer=trainer)
    finally:
        miniray.shutdown()
    print(f"[rl_sweep] {name}: {time.time() - started:.1f} s", flush=True)
    with (logs / f"{name}.log").open("w") as f:
        for metrics in result.history:
            f.write(json.dumps(metrics) + "\n")
        f.write(json.dumps({"summary": result.summary, "queue": result.queue_stats}) + "\n")
    s, q = result.summary, result.queue_stats
    steps_span = span(result) if len(result.history) > 1 else s["wall_s"]
    samples = sum(m["samples"] for m in result.history[1:]) or BATCH * N
    return {
        "run": name,
        "samples_per_s": samples / max(steps_span, 1e-9),
        "steps_per_s": max(1, len(result.history) - 1) / max(steps_span, 1e-9),
        "mean_age": s["mean_age"],
        "max_age": s["max_age"],
        "rejected_stale": s["rejected_stale"] + int(q.get("evicted_stale", 0)),
        "queue_util": float(q.get("utilization_time_avg", 0.0)),
        "queue_full": float(q.get("time_full_fraction", 0.0)),
        "trainer_idle": s["trainer_idle_ratio"],
        "rollouter_idle": s["rollouter_idle_ratio"],
        "sync_ms_p50": s["sync_ms_p50"],
    }


def sweeps(
    root: pathlib.Path, logs: pathlib.Path, size: dict, fake_backend: str
) -> dict[str, list[dict]]:
    steps = size["steps"]
    cache: dict[tuple, dict] = {}

    def fake(mode="async", k=1, queue=64, median=GROUP_MEDIAN_S) -> dict:
        key = (mode, k, queue, median)
        if key not in cache:
            name = f"fake_{mode}_k{k}_q{queue}_gen{int(median * 1000)}ms"
            cache[key] = one_run(
                name,
                config(root, steps=steps, mode=mode, k=k, queue=queue, fake=True),
                logs,
                backend=fake_backend,
                engine=LongTailEngine(median, seed=0),
                trainer=FixedTimeTrainer(STEP_S),
            )
        return dict(cache[key])

    out: dict[str, list[dict]] = {}
    out["staleness_threshold"] = [{"point": k, **fake(k=k)} for k in (0, 1, 3)]
    out["max_queue_size"] = [{"point": q, **fake(queue=q)} for q in (BATCH, 64)]
    out["generation_interval"] = [
        {
            "point": f"{f}x ({GROUP_MEDIAN_S * f * 1000:.0f} ms median)",
            **fake(median=GROUP_MEDIAN_S * f),
        }
        for f in (0.5, 1, 2)
    ]
    out["mode"] = [{"point": m, **fake(mode=m)} for m in ("sync", "async")]
    split_rows = []
    for trainer_threads, rollouter_threads in size["splits"]:
        name = f"real_split_t{trainer_threads}_r{rollouter_threads}"
        before = torch.get_num_threads()
        torch.set_num_threads(trainer_threads)  # the trainer runs in this (driver) process
        try:
            row = one_run(
                name,
                config(root, steps=size["real_steps"]),
                logs,
                backend="local",
                engine=ThreadedHFEngine(str(root / "model"), rollouter_threads),
            )
        finally:
            torch.set_num_threads(before)
        split_rows.append(
            {"point": f"trainer {trainer_threads} : rollouter {rollouter_threads}", **row}
        )
    out["cpu_split"] = split_rows
    return out


def pause_resume(root: pathlib.Path, logs: pathlib.Path, trials: int) -> list[dict]:
    """pause_rollout / resume_rollout latency (ms) at random moments while generating."""
    rows = []
    engines = [
        ("fake long-tail engine (30 ms groups)", LongTailEngine(GROUP_MEDIAN_S, seed=1)),
        ("tiny model (transformers, 1 thread)", ThreadedHFEngine(str(root / "model"), 1)),
    ]
    rng = random.Random(0)
    for label, engine in engines:
        # A large k and queue: the rollouter never idles on admission, so every pause lands on
        # a generation in flight (or between two).
        cfg = config(root, steps=1, k=10_000, queue=100_000, fake=label.startswith("fake"))
        print(f"[rl_sweep] pause/resume with {label} ...", flush=True)
        miniray.init(backend="local", num_workers=1)  # real actor calls: real latency
        try:
            queue = MessageQueue.remote(cfg)
            rollouter = FullyAsyncRollouter.remote(cfg, queue, engine=engine)
            miniray.get(rollouter.start.remote(), timeout=120)
            # Wait for a first finished group: the model loads lazily inside the first
            # generation, and a pause during that load would measure the load.
            deadline = time.monotonic() + 120
            while (
                miniray.get(rollouter.get_statistics.remote(), timeout=60)["groups_generated"] < 1
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError("pause_resume: no group generated within 120 s")
                time.sleep(0.05)
            pauses, resumes = [], []
            for _ in range(trials):
                time.sleep(rng.uniform(0.02, 0.1))
                t0 = time.perf_counter()
                assert miniray.get(rollouter.pause_rollout.remote(), timeout=60) is True
                t1 = time.perf_counter()
                assert miniray.get(rollouter.resume_rollout.remote(), timeout=60) is True
                t2 = time.perf_counter()
                pauses.append((t1 - t0) * 1e3)
                resumes.append((t2 - t1) * 1e3)
            stats = miniray.get(rollouter.get_statistics.remote(), timeout=60)
            miniray.get(rollouter.stop.remote(), timeout=60)
        finally:
            miniray.shutdown()
        name = "pause_resume_" + label.split()[0]
        with (logs / f"{name}.log").open("w") as f:
            f.write(json.dumps({"pause_ms": pauses, "resume_ms": resumes, "stats": stats}) + "\n")
        rows.append(
            {
                "point": label,
                "pause_ms": pauses,
                "resume_ms": resumes,
                "aborted": int(stats["groups_aborted"]),
                "trials": trials,
            }
        )
    return rows


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def plots(results: dict[str, list[dict]], pauses: list[dict], out: pathlib.Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {}
    for sweep, rows in results.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        labels = [str(r["point"]) for r in rows]
        ax.bar(labels, [r["samples_per_s"] for r in rows], color="tab:blue")
        ax.set_ylabel("samples/s (trained)")
        ax.set_title(sweep)
        ax2 = ax.twinx()
        ax2.plot(labels, [r["mean_age"] for r in rows], "o-", color="tab:red")
        ax2.set_ylabel("mean age (versions)", color="tab:red")
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        names[sweep] = f"{sweep}.png"
        fig.savefig(out / names[sweep], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.boxplot(
        [r["pause_ms"] for r in pauses] + [r["resume_ms"] for r in pauses],
        tick_labels=[f"pause\n{r['point'].split()[0]}" for r in pauses]
        + [f"resume\n{r['point'].split()[0]}" for r in pauses],
    )
    ax.set_ylabel("latency (ms)")
    ax.set_title("pause_rollout / resume_rollout while generating")
    fig.tight_layout()
    names["pause_resume"] = "pause_resume.png"
    fig.savefig(out / names["pause_resume"], dpi=100)
    plt.close(fig)
    return names


COLUMNS = [
    ("samples_per_s", "samples/s", "{:.1f}"),
    ("steps_per_s", "steps/s", "{:.2f}"),
    ("mean_age", "mean age", "{:.2f}"),
    ("max_age", "max age", "{}"),
    ("rejected_stale", "stale dropped", "{}"),
    ("queue_util", "queue util", "{:.0%}"),
    ("queue_full", "time full", "{:.0%}"),
    ("trainer_idle", "trainer idle", "{:.0%}"),
    ("rollouter_idle", "rollouter idle", "{:.0%}"),
    ("sync_ms_p50", "sync p50 ms", "{:.1f}"),
]


def report(
    results, pauses, pngs, out: pathlib.Path, size_name: str, wall: float, fake_backend: str
) -> str:
    lines = [
        "# Fully asynchronous RL: parameter sweeps",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; size `{size_name}`; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; {wall:.0f} s in all.",
        "",
        f"Fake runs: `LongTailEngine` (group time log-normal, median {GROUP_MEDIAN_S * 1000:.0f}"
        f" ms, sigma 1, {N} responses per group) and `FixedTimeTrainer` ({STEP_S * 1000:.0f} ms"
        f" per step, {BATCH} groups per step): balanced at 1x; `{fake_backend}` backend. "
        "Real runs (CPU split, second pause/resume row): an untrained tiny Qwen2 "
        "(transformers) on the arithmetic prompts, `local` backend (one process per actor). Rates are over steps 2..N (start-up "
        "excluded); ages are in versions (one version per step). Logs: `logs/`.",
        "",
    ]
    for sweep, rows in results.items():
        lines += [f"## {sweep}", "", "| point | " + " | ".join(c[1] for c in COLUMNS) + " |"]
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for r in rows:
            cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
            lines.append(f"| {r['point']} | " + " | ".join(cells) + " |")
        lines += ["", f"![{sweep}]({pngs[sweep]})", ""]
    lines += [
        "## pause/resume while generating",
        "",
        "| engine | pause p50 ms | pause p95 ms | pause max ms | resume p50 ms | "
        "groups aborted by a pause |",
        "|---|---|---|---|---|---|",
    ]
    for r in pauses:
        lines.append(
            f"| {r['point']} | {pct(r['pause_ms'], 50):.1f} | {pct(r['pause_ms'], 95):.1f} | "
            f"{max(r['pause_ms']):.1f} | {pct(r['resume_ms'], 50):.1f} | "
            f"{r['aborted']} of {r['trials']} |"
        )
    lines += ["", f"![pause/resume]({pngs['pause_resume']})", ""]
    mode = {r["point"]: r for r in results["mode"]}
    speedup = mode["async"]["samples_per_s"] / max(mode["sync"]["samples_per_s"], 1e-9)
    lines += [
        "## Reading it",
        "",
        f"- async over sync at the balanced point: {speedup:.2f}x samples/s.",
        "- k=0 is strictly on-policy: the rollouter may not run ahead, so overlap (and speed) "
        "is lost; larger k buys overlap at the price of older samples.",
        "- a queue of one batch blocks the rollouter as soon as a batch is waiting.",
        "- the CPU split is measured on a shared machine; treat it as indicative only.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "performance_report.md").write_text(text)
    return text


def summary(results, pauses, out: pathlib.Path) -> None:
    lines = []
    for sweep, rows in results.items():
        for r in rows:
            lines.append(
                f"{sweep:<20} {r['point']!s:<34} samples/s={r['samples_per_s']:.1f} "
                f"mean_age={r['mean_age']:.2f} max_age={r['max_age']} "
                f"queue_util={r['queue_util']:.2f} trainer_idle={r['trainer_idle']:.2f}"
            )
    for r in pauses:
        lines.append(
            f"{'pause_resume':<20} {r['point']:<34} pause_p50_ms={pct(r['pause_ms'], 50):.1f} "
            f"pause_max_ms={max(r['pause_ms']):.1f} resume_p50_ms={pct(r['resume_ms'], 50):.1f}"
        )
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument(
        "--fake-backend",
        choices=["inline", "local"],
        default="inline",
        help="runtime of the fake-engine runs: inline (one process, starts in milliseconds; "
        "they measure scheduling, not processes) or local (an actor process per role)",
    )
    args = parser.parse_args()
    size = SIZES[args.size]
    out: pathlib.Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_workload(pathlib.Path(tmp))
        results = sweeps(root, logs, size, args.fake_backend)
        pauses = pause_resume(root, logs, size["trials"])
    pngs = plots(results, pauses, out)
    report(results, pauses, pngs, out, args.size, time.time() - start, args.fake_backend)
    summary(results, pauses, out)
    print((out / "summary.txt").read_text(), end="")
    print(f"[rl_sweep] wrote {out}/performance_report.md, summary.txt, logs/")


if __name__ == "__main__":
    main()
