"""Fully async RL against the synchronous baseline on the same workload and resources.

    python benchmarks/async_vs_sync.py [--steps 900] [--seeds 3] [--sim-steps 30] [KEY=VALUE ...]

Two measurements, each run once in async mode and once in sync mode:

* real: the demo workload (tiny Qwen2 on arithmetic, GRPO). ``speedup`` is the sync run's time
  for its training steps over the async run's; ``ideal`` is (T_gen + T_train) / max(T_gen,
  T_train) with both measured in the sync run, where they do not overlap. Both runs evaluate
  on held-out problems every ``--eval-every`` steps; evaluations are taken out of every time
  (the rollouter may run ahead during one, within its staleness bound).
  ``time_to_reward_speedup`` compares the training time each run took until its held-out reward
  (a moving average of 3 evaluations) first reached 90% of the best that both runs reached;
  ``time_to_reward_speedup_pooled`` does the same on the seeds' mean curves (less noisy), and
  the table also shows it for 50% and 70% of that best. The default length is the demo's (900
  steps): shorter runs stop while the reward is still near where it started, and a threshold
  near there is mostly evaluation noise.
* sim: a fake engine whose response lengths follow a long-tailed (log-normal) distribution
  (interrupted responses continue after a weight sync: partial rollouts) and a fake trainer
  whose step takes what generating a batch takes on average, so the overlap is measured
  without model noise; staleness threshold 2.

The last line is JSON: {"speedup", "ideal", "sim_speedup", "sim_ideal", "reward_async",
"reward_sync", "time_to_reward_speedup", "time_to_reward_speedup_pooled", "per_seed_speedup",
"per_seed_time_to_reward_speedup"}; the real-workload numbers are medians over ``--seeds`` runs
(rewards: means).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import tempfile
import time

import torch

import miniray
from miniray.config import apply_overrides
from miniray.rl.demo import TASK, demo_config, prepare
from miniray.rl.engines.base import Generation
from miniray.rl.loop import RunResult, run


class LongTailEngine:
    """Decodes like a batched engine whose response lengths are long-tailed (log-normal).

    Every unfinished response of a call gets one token per ``token_s``, so a call lasts as long
    as its longest response; a response's decoding time is ``median_s`` x log-normal(0,
    ``sigma``), capped at 20 x median. An interrupted response keeps its tokens, and when the
    rollouter sends it back (prompt + partial response, a partial rollout) it continues
    with the time it had left: the engine remembers that by the token sequence (responses
    with equal sequences are interchangeable, so which one gets which remainder is moot).
    """

    TOKENS = range(4, 14)  # ordinary characters of the demo's tokenizer

    def __init__(self, median_s: float, sigma: float = 1.0, seed: int = 0, token_s: float = 0.002):
        self.median_s = median_s
        self.sigma = sigma
        self.token_s = token_s
        self.rng = random.Random(seed)
        self.left: dict[tuple[int, ...], list[int]] = {}  # partial sequence -> tokens to go

    def _tokens_to_go(self, sequence: list[int]) -> int:
        waiting = self.left.get(tuple(sequence))
        if waiting:
            return waiting.pop()
        seconds = min(self.median_s * self.rng.lognormvariate(0, self.sigma), 20 * self.median_s)
        return max(1, round(seconds / self.token_s))

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        to_go = [self._tokens_to_go(p) for p in prompts]
        made: list[list[int]] = [[] for _ in prompts]
        started = time.monotonic()
        steps = 0
        while True:
            active = [i for i, n in enumerate(to_go) if len(made[i]) < min(n, max_new_tokens)]
            if not active or (should_stop is not None and should_stop()):
                break
            steps += 1
            time.sleep(max(0.0, started + steps * self.token_s - time.monotonic()))
            for i in active:
                made[i].append(self.rng.choice(self.TOKENS))
        out = []
        for prompt, tokens, n in zip(prompts, made, to_go):
            if len(tokens) >= n:
                reason = "stop"
            elif len(tokens) >= max_new_tokens:
                reason = "length"
            else:
                reason = "aborted"
                self.left.setdefault(tuple(prompt) + tuple(tokens), []).append(n - len(tokens))
            out.append(
                Generation(
                    prompt_token_ids=list(prompt),
                    response_token_ids=tokens,
                    response_logprobs=[-1.0] * len(tokens),
                    finish_reason=reason,
                )
            )
        return out

    def load_weights(self, state_dict, *, take=False):
        pass

    def state_dict(self):
        return {}


def expected_call_s(median_s: float, responses: int, sigma: float = 1.0) -> float:
    """E[time of one LongTailEngine call]: its longest of ``responses`` log-normal responses,
    capped as the engine caps them (seeded Monte Carlo: the same number every run)."""
    rng = random.Random(0)
    draws = 20_000
    total = sum(
        min(max(rng.lognormvariate(0, sigma) for _ in range(responses)), 20.0) for _ in range(draws)
    )
    return median_s * total / draws


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


def active_walls(result: RunResult) -> list[float]:
    """Each step's wall time with the held-out evaluations before it taken out (an evaluation
    runs in the driver right after its step is recorded, and is not training)."""
    eval_end = {step: wall for step, wall, _ in result.evals[1:]}
    walls, eval_s = [], 0.0
    for m in result.history:
        walls.append(m["wall_s"] - eval_s)
        if m["step"] in eval_end:
            eval_s += eval_end[m["step"]] - m["wall_s"]
    return walls


def step_walls(result: RunResult) -> dict[int, float]:
    """Step -> its ``active_walls`` time."""
    return dict(zip((m["step"] for m in result.history), active_walls(result)))


def span(result: RunResult) -> float:
    """Seconds from the end of step 1 to the end of the last step (start-up and evaluations
    excluded)."""
    walls = active_walls(result)
    return walls[-1] - walls[0]


def sync_parts(result: RunResult) -> tuple[float, float]:
    """(T_gen, T_train) of a sync run, steps 2..N, from its per-step waits and durations."""
    walls = active_walls(result)
    gen = train = 0.0
    for prev, cur, m in zip(walls, walls[1:], result.history[1:]):
        gen += m["trainer_wait_s"]
        train += (cur - prev) - m["trainer_wait_s"]
    return gen, train


def smoothed_evals(result: RunResult, window: int = 3) -> list[tuple[int, float]]:
    """(step, held-out reward averaged over this and the ``window - 1`` previous evaluations):
    one greedy evaluation on 200 problems moves by about 0.05 between neighbours."""
    scores = [(step, score) for step, _, score in result.evals[1:]]
    return [
        (step, statistics.mean(score for _, score in scores[max(0, i - window + 1) : i + 1]))
        for i, (step, _) in enumerate(scores)
    ]


def training_time_to(result: RunResult, reward: float) -> float:
    """Seconds of training (from the start, evaluations left out) until the smoothed held-out
    reward first reached ``reward``."""
    walls = step_walls(result)
    return next(walls[step] for step, score in smoothed_evals(result) if score >= reward)


def pooled_time_to_reward(
    runs: list[dict[str, RunResult]], fraction: float = 0.9
) -> tuple[float, dict[str, float]]:
    """Time-to-reward speedup on the seeds' mean curves: the held-out reward at each
    evaluation averaged over seeds (then smoothed as per seed), against the mean training time
    to that step, until ``fraction`` of the best reward both mean curves reached. Averaging N
    seeds divides the evaluation noise by about sqrt(N), which the per-seed crossing times
    suffer in full. Returns (speedup, {mode: seconds to the target})."""
    seconds = {}
    curves = {}
    for mode in ("sync", "async"):
        per_run = []
        for run_ in runs:
            walls = step_walls(run_[mode])
            per_run.append(
                {step: (walls[step], score) for step, score in smoothed_evals(run_[mode])}
            )
        steps = sorted(set.intersection(*(set(r) for r in per_run)))
        curves[mode] = [
            (
                statistics.mean(r[step][0] for r in per_run),
                statistics.mean(r[step][1] for r in per_run),
            )
            for step in steps
        ]
    target = fraction * min(max(score for _, score in curves[m]) for m in curves)
    for mode, curve in curves.items():
        seconds[mode] = next(wall for wall, score in curve if score >= target)
    return seconds["sync"] / seconds["async"], seconds


def write_curves(runs: list[dict[str, RunResult]], path: pathlib.Path) -> None:
    """Per seed and mode: (step, training seconds, held-out reward) at every evaluation."""
    curves = []
    for run_ in runs:
        per_mode = {}
        for mode, result in run_.items():
            walls = step_walls(result)
            per_mode[mode] = [(step, walls[step], score) for step, _, score in result.evals[1:]]
        curves.append(per_mode)
    path.write_text(json.dumps(curves) + "\n")


def measure(
    cfg: dict, steps: int, *, eval_rows=(), eval_every=-1, make_engine=None, make_trainer=None
):
    """One run per mode on a fresh runtime; fakes are built anew for each run."""
    out = {}
    for mode in ("sync", "async"):
        cfg["async_training"]["mode"] = mode
        cfg["trainer"]["total_training_steps"] = steps
        cfg["trainer"]["test_freq"] = eval_every
        miniray.init(num_workers=1)
        try:
            out[mode] = run(
                cfg,
                eval_rows=eval_rows,
                engine=make_engine() if make_engine else None,
                trainer=make_trainer() if make_trainer else None,
            )
        finally:
            miniray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900, help="training steps (the demo's)")
    parser.add_argument("--sim-steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=20, help="held-out evaluation cadence")
    parser.add_argument("--seeds", type=int, default=3, help="real-workload runs (medians)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one on")
    parser.add_argument(
        "--staleness", type=int, default=None, help="staleness_threshold (default: the demo's)"
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate (the demo's)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=25, help="supervised steps before RL (the demo's)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for both modes, e.g. actor_rollout_ref.actor.optim.warmup_style=cosine",
    )
    parser.add_argument(
        "--curves", type=pathlib.Path, default=None, help="write each run's held-out curve here"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        eval_rows = TASK.rows(200, split="test")
        per_seed = []
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            # One seed's held-out reward moves by ~0.05-0.1 between evaluations: the time to
            # a reward is only worth reading as a median over seeds.
            root = prepare(
                pathlib.Path(tmp) / f"seed{seed}", pretrain_steps=args.pretrain_steps, seed=seed
            )
            cfg = demo_config(root, steps=args.steps, mode="async", lr=args.lr)
            cfg["data"]["seed"] = seed
            cfg = apply_overrides(cfg, args.overrides)
            if args.staleness is not None:
                cfg["async_training"]["staleness_threshold"] = args.staleness
            real = measure(cfg, args.steps, eval_rows=eval_rows, eval_every=args.eval_every)
            runs.append(real)
            gen, train = sync_parts(real["sync"])
            # Time to the same reward: 90% of the best smoothed reward both runs reached.
            target = 0.9 * min(
                max(r for _, r in smoothed_evals(real[m])) for m in ("sync", "async")
            )
            to_target = {m: training_time_to(real[m], target) for m in ("sync", "async")}
            per_seed.append(
                {
                    "seed": seed,
                    "speedup": span(real["sync"]) / span(real["async"]),
                    "ideal": (gen + train) / max(gen, train),
                    "gen_s": gen,
                    "train_s": train,
                    "target": target,
                    "to_target": to_target,
                    "reward_speedup": to_target["sync"] / to_target["async"],
                    "final": {m: real[m].summary["final_reward"] for m in ("sync", "async")},
                }
            )
            print(
                f"seed {seed}: speedup {per_seed[-1]['speedup']:.2f} / ideal "
                f"{per_seed[-1]['ideal']:.2f}; time to reward {target:.3f}: sync "
                f"{to_target['sync']:.1f} s, async {to_target['async']:.1f} s "
                f"({per_seed[-1]['reward_speedup']:.2f}x)",
                flush=True,
            )
        speedup = statistics.median(r["speedup"] for r in per_seed)
        ideal = statistics.median(r["ideal"] for r in per_seed)
        reward_speedup = statistics.median(r["reward_speedup"] for r in per_seed)
        pooled_speedup, pooled_seconds = pooled_time_to_reward(runs)
        pooled_lower = {f: pooled_time_to_reward(runs, f)[0] for f in (0.5, 0.7)}
        if args.curves is not None:
            write_curves(runs, args.curves)

        root = pathlib.Path(tmp) / f"seed{args.first_seed}"
        sim_cfg = demo_config(root, steps=args.sim_steps, mode="async", lr=5e-4)
        sim_cfg["data"]["train_batch_size"] = 4
        sim_cfg["data"]["max_response_length"] = 4096  # the tail is the point: do not cut it
        # Two versions of slack absorb the tail's variance (k=1 idles the rollouter whenever
        # a short batch finishes early; rl_sweep.py shows the whole curve over k).
        sim_cfg["async_training"]["staleness_threshold"] = 2
        median_s = 0.05
        sim_cfg["async_training"]["max_concurrent_rollouts"] = 16  # 2 groups of 8 per call
        calls = 2  # per step of 4 groups
        # Balanced: a training step takes what generating its batch takes on average.
        step_s = calls * expected_call_s(median_s, responses=16)
        sim = measure(
            sim_cfg,
            args.sim_steps,
            make_engine=lambda: LongTailEngine(median_s),
            make_trainer=lambda: FixedTimeTrainer(step_s),
        )
        sim_gen, sim_train = sync_parts(sim["sync"])
        sim_ideal = (sim_gen + sim_train) / max(sim_gen, sim_train)
        sim_speedup = span(sim["sync"]) / span(sim["async"])

    rows = [
        ("real: seeds", str(args.seeds)),
        ("real: speedup / ideal (median)", f"{speedup:.2f} / {ideal:.2f}"),
        (
            f"real: T_gen / T_train in sync, seed {args.first_seed} (s)",
            f"{per_seed[0]['gen_s']:.1f} / {per_seed[0]['train_s']:.1f}",
        ),
        (
            "real: final reward sync / async (mean)",
            f"{statistics.mean(r['final']['sync'] for r in per_seed):.3f} / "
            f"{statistics.mean(r['final']['async'] for r in per_seed):.3f}",
        ),
        ("real: time-to-reward speedup (median)", f"{reward_speedup:.2f}"),
        (
            "real: time to reward, seeds' mean curve",
            f"{pooled_speedup:.2f} (sync {pooled_seconds['sync']:.1f} s, "
            f"async {pooled_seconds['async']:.1f} s)",
        ),
        (
            "real: same, to 50% / 70% of the best",
            f"{pooled_lower[0.5]:.2f} / {pooled_lower[0.7]:.2f}",
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
                "reward_async": round(statistics.mean(r["final"]["async"] for r in per_seed), 3),
                "reward_sync": round(statistics.mean(r["final"]["sync"] for r in per_seed), 3),
                "time_to_reward_speedup": round(reward_speedup, 3),
                "time_to_reward_speedup_pooled": round(pooled_speedup, 3),
                "per_seed_speedup": [round(r["speedup"], 3) for r in per_seed],
                "per_seed_time_to_reward_speedup": [
                    round(r["reward_speedup"], 3) for r in per_seed
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
