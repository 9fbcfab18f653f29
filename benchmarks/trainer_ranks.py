"""One CPU trainer rank against two (gloo) on the demo workload, async mode, same seed.

    python benchmarks/trainer_ranks.py [--steps 300] [--ranks 2] [--seed 0] [--strategy ddp]

Both runs go through ``rl.loop.run`` with the demo's config (``rl.demo.demo_config``); only
``trainer.n_gpus_per_node`` differs (0: one CPU rank, N: N CPU ranks in one gloo group, each
training its share of every batch). On a 2-core machine two ranks share the cores with the
rollouter, so no speedup is expected here: the run records what a user would see, samples/s
and the held-out reward after the last step (greedy, 200 problems).

Last line: {"one_rank": {"samples_per_s", "final_reward", "wall_s"}, "ranks": {...},
"world_size", "samples_per_s_ratio"}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch

import miniray
from miniray.rl.demo import TASK, demo_config, prepare
from miniray.rl.loop import run


def one_run(root: pathlib.Path, *, steps: int, ranks: int, strategy: str, seed: int) -> dict:
    cfg = demo_config(root, steps=steps, mode="async", lr=5e-4)
    cfg["data"]["seed"] = seed
    cfg["trainer"]["n_gpus_per_node"] = ranks
    cfg["actor_rollout_ref"]["actor"]["strategy"] = strategy
    cfg["trainer"]["test_freq"] = steps  # the held-out reward after the last step
    miniray.init(num_workers=1)
    try:
        result = run(cfg, eval_rows=TASK.rows(200, split="test"))
    finally:
        miniray.shutdown()
    s = result.summary
    return {
        "samples_per_s": s["samples_per_s"],
        "final_reward": s["final_reward"],
        "wall_s": s["wall_s"],
        "world_size": s["trainer_world_size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = prepare(pathlib.Path(tmp), pretrain_steps=25, seed=args.seed)
        one = one_run(root, steps=args.steps, ranks=0, strategy=args.strategy, seed=args.seed)
        many = one_run(
            root, steps=args.steps, ranks=args.ranks, strategy=args.strategy, seed=args.seed
        )
    print(f"{'':<24}{'samples/s':>12}{'final reward':>14}{'wall s':>10}")
    for name, r in (("1 rank", one), (f"{args.ranks} ranks ({args.strategy})", many)):
        print(
            f"{name:<24}{r['samples_per_s']:>12.1f}{r['final_reward']:>14.3f}{r['wall_s']:>10.1f}"
        )
    print(
        json.dumps(
            {
                "one_rank": one,
                "ranks": many,
                "world_size": many["world_size"],
                "strategy": args.strategy,
                "samples_per_s_ratio": round(many["samples_per_s"] / one["samples_per_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
