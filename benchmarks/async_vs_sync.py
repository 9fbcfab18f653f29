"""Fully async RL against the synchronous baseline on the same workload and resources.

    python benchmarks/async_vs_sync.py [--steps 60] [--sim-steps 30]

Two measurements, each run once in async mode and once in sync mode:

* real: the demo workload (tiny Qwen2 on arithmetic, GRPO). ``speedup`` is the sync run's time
  for its training steps over the async run's; ``ideal`` is (T_gen + T_train) / max(T_gen,
  T_train) with both measured in the sync run, where they do not overlap.
* sim: a fake engine whose group times follow a long-tailed (log-normal) distribution and a
  fake trainer with a fixed step time, so the overlap is measured without model noise.

The last line is JSON: {"speedup", "ideal", "sim_speedup", "sim_ideal", "reward_async",
"reward_sync"}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import tempfile
import time

import torch

import miniray
from miniray.rl.demo import TASK, demo_config, prepare
from miniray.rl.engines.base import Generation
from miniray.rl.loop import RunResult, run


class LongTailEngine:
    """Sleeps like a generation whose length is log-normal; answers one fixed token."""

    def __init__(self, median_s: float, sigma: float = 1.0, seed: int = 0):
        self.median_s = median_s
        self.sigma = sigma
        self.rng = random.Random(seed)

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        # A group is as slow as its slowest response (one batch): take the max of the draws.
        seconds = max(self.median_s * self.rng.lognormvariate(0, self.sigma) for _ in prompts)
        deadline = time.monotonic() + min(seconds, 20 * self.median_s)
        while time.monotonic() < deadline:
            if should_stop is not None and should_stop():
                return [_gen(p, "aborted") for p in prompts]
            time.sleep(0.002)
        return [_gen(p, "length") for p in prompts]

    def load_weights(self, state_dict):
        pass

    def state_dict(self):
        return {}


def _gen(prompt, reason):
    tokens = [] if reason == "aborted" else [5]
    return Generation(
        prompt_token_ids=list(prompt),
        response_token_ids=tokens,
        response_logprobs=[-1.0] * len(tokens),
        finish_reason=reason,
    )


class FixedTimeTrainer:
    """A trainer whose step takes ``step_s`` seconds and whose weights are tiny."""

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.version = 0

    def train_step(self, groups):
        time.sleep(self.step_s)
        samples = [s for g in groups for s in g]
        ages = [self.version - s.v_start for s in samples]
        return {
            "reward_mean": 0.0,
            "samples": float(len(samples)),
            "age_mean": sum(ages) / len(ages),
            "age_max": float(max(ages)),
        }

    def get_weights(self):
        return {"w": torch.zeros(4)}

    def set_version(self, version):
        self.version = version
        return version


def span(result: RunResult) -> float:
    """Seconds from the end of step 1 to the end of the last step (start-up excluded)."""
    walls = [m["wall_s"] for m in result.history]
    return walls[-1] - walls[0]


def sync_parts(result: RunResult) -> tuple[float, float]:
    """(T_gen, T_train) of a sync run, steps 2..N, from its per-step waits and durations."""
    walls = [m["wall_s"] for m in result.history]
    gen = train = 0.0
    for prev, cur, m in zip(walls, walls[1:], result.history[1:]):
        gen += m["trainer_wait_s"]
        train += (cur - prev) - m["trainer_wait_s"]
    return gen, train


def measure(cfg: dict, steps: int, *, eval_rows=(), make_engine=None, make_trainer=None):
    """One run per mode on a fresh runtime; fakes are built anew for each run."""
    out = {}
    for mode in ("sync", "async"):
        cfg["async_training"]["mode"] = mode
        cfg["trainer"]["total_training_steps"] = steps
        miniray.init(num_workers=1)
        try:
            out[mode] = run(
                cfg,
                eval_rows=eval_rows,
                eval_every=10**6,  # evaluate at the start and at the end only
                engine=make_engine() if make_engine else None,
                trainer=make_trainer() if make_trainer else None,
            )
        finally:
            miniray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sim-steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = prepare(pathlib.Path(tmp), pretrain_steps=25, seed=0)
        eval_rows = TASK.rows(200, split="test")
        real = measure(
            demo_config(root, steps=args.steps, mode="async", lr=5e-4),
            args.steps,
            eval_rows=eval_rows,
        )
        gen, train = sync_parts(real["sync"])
        ideal = (gen + train) / max(gen, train)
        speedup = span(real["sync"]) / span(real["async"])

        sim_cfg = demo_config(root, steps=args.sim_steps, mode="async", lr=5e-4)
        sim_cfg["data"]["train_batch_size"] = 4
        group_s = 0.05
        # Balanced: a step's expected generation time (4 groups) equals its training time.
        mean_group_s = group_s * 2.2  # E[max of 8 log-normal draws] ~ 2.2 x median (sigma 1)
        sim = measure(
            sim_cfg,
            args.sim_steps,
            make_engine=lambda: LongTailEngine(group_s),
            make_trainer=lambda: FixedTimeTrainer(4 * mean_group_s),
        )
        sim_gen, sim_train = sync_parts(sim["sync"])
        sim_ideal = (sim_gen + sim_train) / max(sim_gen, sim_train)
        sim_speedup = span(sim["sync"]) / span(sim["async"])

    rows = [
        ("real: sync span (s)", span(real["sync"])),
        ("real: async span (s)", span(real["async"])),
        ("real: T_gen / T_train in sync (s)", f"{gen:.1f} / {train:.1f}"),
        ("real: speedup / ideal", f"{speedup:.2f} / {ideal:.2f}"),
        (
            "real: final reward sync / async",
            f"{real['sync'].summary['final_reward']:.3f} / {real['async'].summary['final_reward']:.3f}",
        ),
        (
            "sim: speedup / ideal",
            f"{sim_speedup:.2f} / {sim_ideal:.2f} ({100 * sim_speedup / sim_ideal:.0f}% of ideal)",
        ),
    ]
    for label, value in rows:
        print(f"{label:<40} {value if isinstance(value, str) else f'{value:.1f}'}")
    print(
        json.dumps(
            {
                "speedup": round(speedup, 3),
                "ideal": round(ideal, 3),
                "sim_speedup": round(sim_speedup, 3),
                "sim_ideal": round(sim_ideal, 3),
                "reward_async": real["async"].summary["final_reward"],
                "reward_sync": real["sync"].summary["final_reward"],
            }
        )
    )


if __name__ == "__main__":
    main()
