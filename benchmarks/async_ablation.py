"""Variants of the demo workload side by side: held-out reward per step, seed by seed.

    python benchmarks/async_ablation.py --seeds 8 \
        --variant "plain async_training.weight_extrapolation=0" --variant extrapolate

Each ``--variant`` is a name and config overrides (``KEY=VALUE``, space separated) on top of the
demo's async config; ``async_training.mode=sync`` gives the baseline. For every seed each
variant runs once, one after the other, so a slower spell of the machine hits them all alike.
What is compared is learning per step, not speed: the final held-out reward (greedy, 200
problems), its mean over each third of the run, and the mean KL between the policy that
sampled and the one trained (``behaviour_approx_kl``: how stale the samples are in effect).
One seed's held-out reward moves by 0.05-0.1 between evaluations and a few seeds never learn in
some runs, so read means over 8 or more seeds.

The last line is JSON: per variant ``final`` (mean over seeds), ``thirds`` (three means),
``behaviour_kl``, ``steps_per_s`` (median; evaluations taken out) and ``per_seed_final``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import statistics
import tempfile

import torch
from async_vs_sync import span

import miniray
from miniray.config import apply_overrides
from miniray.rl.demo import TASK, demo_config, prepare
from miniray.rl.loop import RunResult, run


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, *overrides = shlex.split(text)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--variant {text!r}: {bad} are not KEY=VALUE overrides")
    return name, overrides


def mean_or_none(values: list[float]) -> float | None:
    """The mean, or None (JSON null) when there is nothing to average."""
    return statistics.mean(values) if values else None


def thirds(result: RunResult, steps: int) -> list[float | None]:
    """Mean held-out reward over steps (0, steps/3], (steps/3, 2 steps/3], (2 steps/3, steps];
    None for a third without an evaluation (runs shorter than 3 x ``--eval-every``)."""
    out = []
    for part in range(3):
        low, high = part * steps / 3, (part + 1) * steps / 3
        out.append(mean_or_none([score for step, _, score in result.evals if low < step <= high]))
    return out


def show(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def steps_per_s(result: RunResult) -> float:
    """Training steps per second, start-up and held-out evaluations taken out."""
    return (len(result.history) - 1) / span(result)


def behaviour_kl(result: RunResult) -> float | None:
    return mean_or_none(
        [m["behaviour_approx_kl"] for m in result.history if "behaviour_approx_kl" in m]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900, help="training steps (the demo's)")
    parser.add_argument("--eval-every", type=int, default=20, help="held-out evaluation cadence")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate (the demo's)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=25, help="supervised steps before RL (the demo's)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help='"NAME [KEY=VALUE ...]"; give it once per variant',
    )
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    torch.set_num_threads(1)
    eval_rows = TASK.rows(200, split="test")
    results: dict[str, list[RunResult]] = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            root = prepare(
                pathlib.Path(tmp) / f"seed{seed}", pretrain_steps=args.pretrain_steps, seed=seed
            )
            for name, overrides in variants:
                cfg = demo_config(root, steps=args.steps, mode="async", lr=args.lr)
                cfg["data"]["seed"] = seed
                cfg = apply_overrides(cfg, overrides)
                miniray.init(num_workers=1)
                try:
                    cfg["trainer"]["test_freq"] = args.eval_every
                    result = run(cfg, eval_rows=eval_rows)
                finally:
                    miniray.shutdown()
                results[name].append(result)
                print(
                    f"seed {seed} {name}: final {result.evals[-1][2]:.3f}, thirds "
                    + " / ".join(show(x) for x in thirds(result, args.steps))
                    + f", behaviour KL {show(behaviour_kl(result), 4)}, "
                    f"{steps_per_s(result):.2f} steps/s",
                    flush=True,
                )
    summary = {}
    for name, runs in results.items():
        per_third = [thirds(r, args.steps) for r in runs]
        third_means = [
            mean_or_none([t[i] for t in per_third if t[i] is not None]) for i in range(3)
        ]
        kl = mean_or_none([k for k in map(behaviour_kl, runs) if k is not None])
        summary[name] = {
            "final": round(statistics.mean(r.evals[-1][2] for r in runs), 3),
            "thirds": [None if m is None else round(m, 3) for m in third_means],
            "behaviour_kl": None if kl is None else round(kl, 5),
            "steps_per_s": round(statistics.median(steps_per_s(r) for r in runs), 2),
            "per_seed_final": [round(r.evals[-1][2], 3) for r in runs],
        }
        print(
            f"{name}: final {summary[name]['final']:.3f}, thirds {summary[name]['thirds']}, "
            f"behaviour KL {summary[name]['behaviour_kl']}, "
            f"{summary[name]['steps_per_s']} steps/s (median)"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
