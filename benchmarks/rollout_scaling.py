"""Rollout replicas: throughput over 1..16 replicas, and one weight broadcast to them (issue 16).

    python benchmarks/rollout_scaling.py [--quick] [--replicas 1 2 4 8 16] [--steps 14]

Both measurements go through the product's own path; only the engine's compute and the
trainer's step are fakes.

* Throughput: the real loop (``loop.run``: ``FullyAsyncRollouter`` and its lanes, the queue,
  the weight publisher, a weight sync every step) with ``rollout.n_gpus_per_node=R``, i.e. R
  ``EngineReplica`` actors, each with a fake engine whose generation time is a sleep: a
  ``LongTailEngine`` (``async_vs_sync.py``), response lengths log-normal (sigma 1), a call
  lasting as long as its longest response. Partial rollouts continue on any replica (a sync
  pauses every call), so a response's length is drawn from its prompt and its first token
  rather than kept in one replica's memory: any replica continues it with the time it had
  left. The fake trainer's step is a sleep (``async_vs_sync.FixedTimeTrainer``) of 1/10 of
  what generating a batch takes on one replica (``--ratio``): the trainer becomes the
  bottleneck only past R = 10. Every replica's first call waits until all R are up, and the
  first ``--warmup`` steps are left out, so start-up is not measured. Each R runs in async
  mode and in sync mode (``async_training.mode=sync``: generate a batch over the replicas,
  then train).
  ``samples_per_s``: async; ``scaling_efficiency[R]`` = samples_per_s[R] / (R x
  samples_per_s[1]); ``trainer_bound_samples_per_s`` = samples per step / step time, the
  ceiling; ``async_vs_ideal[R]`` = (async / sync samples/s) / ideal, where ideal =
  (T_gen + T_train) / max(T_gen, T_train) from the sync run at R (as ``async_vs_sync.py``).
  Goals: samples/s at R >= 0.9 x R x samples/s at R=1 while R x samples/s at R=1 is below the
  ceiling; async >= 90% of ideal at every R.
* Broadcast: a Qwen2.5-0.5B-shaped state dict (real bf16 tensors, 0.99 GB) loaded into R =
  1, 2, 4, 8 replicas whose engines adopt the tensors (as the transformers engine does with
  ``take=True``) and read one element of each. As a run places it: ``FullyAsyncRollouter``
  in an actor, the weights put once by the driver (the publisher's put, not timed) and
  ``UnifiedParameterSynchronizer.sync_to_rollouter`` timed (pause, load, resume, as a run
  syncs: the rollouter hands the published object to every replica, ``load_weights_from``;
  R=1: the rollouter's own engine). Also the rollouter in the driver's process
  (``load_weights`` on the dict: its one put, then every replica's load). Median of
  ``--repeats`` after two warm-up broadcasts, against ``memcpy_s``: one copy of the same
  bytes between preallocated tensors (``weight_sync.memcpy_seconds``, median of 3). Goal: at
  most 2x one memcpy.

The last line is JSON: {"replicas", "samples_per_s", "scaling_efficiency", "async_vs_ideal",
"sync_samples_per_s", "trainer_bound_samples_per_s", "broadcast_replicas", "broadcast_s",
"broadcast_in_driver_s", "memcpy_s", ...}.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import pathlib
import random
import statistics
import tempfile
import time
from typing import Any

import torch
from async_vs_sync import FixedTimeTrainer, LongTailEngine, expected_call_s
from weight_sync import memcpy_seconds

import miniray
from miniray.rl.loop import RunResult, run
from miniray.rl.models import char_tokenizer, qwen25_05b_shaped, save, tiny_qwen2
from miniray.rl.param_sync import UnifiedParameterSynchronizer
from miniray.rl.rollouter import FullyAsyncRollouter, as_rl_config
from miniray.rl.tasks import ArithmeticTask, write_prompts
from miniray.rl.weight_publisher import PublishedWeights

TASK = ArithmeticTask(max_operand=9)  # prompts "a+b=": their last token is not a digit
N = 4  # responses per prompt (rollout.n)
GROUPS_PER_CALL = 2  # max_concurrent_rollouts = 8: 8 responses per engine call
# Broadcasts before the timed ones: the first starts the replicas, and the next ones still
# write into fresh shared-memory pages (a probe at R=8: 9.4, 1.3, then 0.4-0.8 s).
WARMUP_ROUNDS = 2


class ReplicaTailEngine(LongTailEngine):
    """A ``LongTailEngine`` that any replica can continue: a response's length in tokens is a
    seeded log-normal draw from (its prompt, its first token), so a partial rollout that comes
    back to another replica continues with exactly the time it had left (``LongTailEngine``
    keeps that in its own memory, which another replica's process does not share). Its first
    call waits until ``replicas`` engines have started (files in ``up_dir``)."""

    def __init__(self, median_s: float, token_s: float, seed: int, up_dir: str, replicas: int):
        super().__init__(median_s, seed=seed, token_s=token_s)
        self.up_dir = pathlib.Path(up_dir)
        self.replicas = replicas
        self.started = False
        self._plan: list[int] = []

    def _length(self, prompt: list[int], first: int) -> int:
        rng = random.Random(f"{prompt}:{first}")  # a string seed: the same in every process
        seconds = min(self.median_s * rng.lognormvariate(0, self.sigma), 20 * self.median_s)
        return max(1, round(seconds / self.token_s))

    def _tokens_to_go(self, sequence: list[int]) -> int:
        return self._plan.pop(0)

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        while not self.started:  # start-up is not what this benchmark measures
            self.started = len(list(self.up_dir.glob("up-*"))) >= self.replicas
            time.sleep(0.0 if self.started else 0.05)
        firsts, self._plan = [], []
        for sequence in prompts:
            start = len(sequence)  # the response: the digits after the prompt's "="
            while start > 0 and sequence[start - 1] in self.TOKENS:
                start -= 1
            response = sequence[start:]
            first = response[0] if response else self.rng.choice(self.TOKENS)
            firsts.append(None if response else first)
            self._plan.append(max(1, self._length(sequence[:start], first) - len(response)))
        out = super().generate(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, should_stop=should_stop
        )
        self.left.clear()  # what LongTailEngine would remember: not needed here
        for gen, first in zip(out, firsts):
            if first is not None and gen.response_token_ids:
                gen.response_token_ids[0] = first
        return out


class TailEngines:
    """``engine_factory``: replica ``i`` gets a ``ReplicaTailEngine`` (in its own process)."""

    def __init__(self, median_s: float, token_s: float, up_dir: pathlib.Path, replicas: int):
        self.median_s, self.token_s = median_s, token_s
        self.up_dir, self.replicas = str(up_dir), replicas

    def __call__(self, index: int) -> ReplicaTailEngine:
        import os

        (pathlib.Path(self.up_dir) / f"up-{index}-{os.getpid()}").touch()
        return ReplicaTailEngine(
            self.median_s, self.token_s, seed=index, up_dir=self.up_dir, replicas=self.replicas
        )


class AdoptingEngine:
    """Keeps the state dict it is given as its parameters (a real engine with ``take=True``
    adopts the tensors, no copy) and reads one element of each, so the mapping is used."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def load_weights(self, state_dict, *, take=False):
        touched = 0.0
        for tensor in state_dict.values():
            touched += float(tensor[(0,) * tensor.dim()])
        self.weights = state_dict
        return touched

    def state_dict(self):
        return self.weights

    def generate(self, prompts, **kwargs):
        raise RuntimeError("the broadcast benchmark does not generate")


class AdoptingEngines:
    def __call__(self, index: int) -> AdoptingEngine:
        return AdoptingEngine()


def base_config(root: pathlib.Path, replicas: int) -> dict[str, Any]:
    return {
        "data": {
            "train_files": [str(root / "train.parquet")],
            "train_batch_size": 32,
            "max_prompt_length": 8,
            "max_response_length": 4096,  # the tail is the point: do not cut it
        },
        "actor_rollout_ref": {"model": {"path": str(root / "model")}, "rollout": {"n": N}},
        # Fake engines sleep on the CPU: replicas are processes here, also where CUDA is.
        "rollout": {"n_gpus_per_node": replicas, "device": "cpu"},
        "async_training": {
            "staleness_threshold": 2,  # as async_vs_sync.py's sim
            "max_queue_size": 1000,
            "max_concurrent_rollouts": GROUPS_PER_CALL * N,
            "generation_timeout": 600.0,  # 16 replicas start in ~30 s on 2 cores
            "sync_timeout": 600.0,
        },
        "trainer": {"total_training_steps": 1, "trigger_parameter_sync_step": 1},
    }


def window(result: RunResult, warmup: int) -> tuple[float, float, float]:
    """(seconds, T_gen, T_train) from the end of step ``warmup`` to the end of the last step;
    T_gen is the trainer's wait for its batches (generation in sync mode), T_train the rest."""
    steps = result.history[warmup:]
    seconds = steps[-1]["wall_s"] - result.history[warmup - 1]["wall_s"]
    gen = sum(m["trainer_wait_s"] for m in steps)
    return seconds, gen, seconds - gen


def throughput(args: argparse.Namespace, root: pathlib.Path) -> dict[str, Any]:
    batch = base_config(root, 1)["data"]["train_batch_size"]
    samples_per_step = batch * N
    call_s = expected_call_s(args.median_s, responses=GROUPS_PER_CALL * N)
    gen_s = batch / GROUPS_PER_CALL * call_s  # one batch on one replica
    step_s = gen_s / args.ratio
    ceiling = samples_per_step / step_s
    print(
        f"throughput: {batch} groups x {N} responses per step, {GROUPS_PER_CALL} groups per "
        f"call; E[call] {call_s:.3f} s, E[batch on 1 replica] {gen_s:.2f} s, trainer step "
        f"{step_s:.3f} s: ceiling {ceiling:.0f} samples/s; {args.steps} steps, "
        f"{args.warmup} left out",
        flush=True,
    )
    rows = []
    for replicas in args.replicas:
        measured: dict[str, Any] = {"replicas": replicas}
        for mode in ("sync", "async"):
            up_dir = root / f"up-{replicas}-{mode}"
            up_dir.mkdir()
            cfg = base_config(root, replicas)
            cfg["async_training"]["mode"] = mode
            cfg["trainer"]["total_training_steps"] = args.steps
            started = time.time()
            miniray.init(num_workers=1)
            try:
                result = run(
                    cfg,
                    engine_factory=TailEngines(args.median_s, args.token_s, up_dir, replicas),
                    trainer=FixedTimeTrainer(step_s),
                )
            finally:
                miniray.shutdown()
            seconds, gen, train = window(result, args.warmup)
            rate = (args.steps - args.warmup) * samples_per_step / seconds
            measured[mode] = {"samples_per_s": rate, "gen_s": gen, "train_s": train}
            measured[f"{mode}_run_s"] = time.time() - started
            stats = result.rollouter_stats
            if mode == "async":
                measured["partial"] = stats["groups_partial"]
                measured["generated"] = stats["groups_generated"]
                measured["idle_throttled_s"] = stats["idle_throttled_seconds"]
                measured["per_replica_groups"] = [r["groups"] for r in stats["replicas"]]
            print(
                f"  R={replicas:>2} {mode:>5}: {rate:7.1f} samples/s (steps {args.warmup + 1}.."
                f"{args.steps}: {seconds:.1f} s, trainer waited {gen:.1f} s), run "
                f"{measured[f'{mode}_run_s']:.0f} s",
                flush=True,
            )
        sync = measured["sync"]
        measured["ideal"] = (sync["gen_s"] + sync["train_s"]) / max(sync["gen_s"], sync["train_s"])
        measured["speedup"] = measured["async"]["samples_per_s"] / sync["samples_per_s"]
        rows.append(measured)
    one = next(r for r in rows if r["replicas"] == 1)["async"]["samples_per_s"]
    for r in rows:
        r["efficiency"] = r["async"]["samples_per_s"] / (r["replicas"] * one)
        r["async_vs_ideal"] = r["speedup"] / r["ideal"]
        r["trainer_bound"] = r["replicas"] * one >= ceiling
    return {
        "rows": rows,
        "ceiling": ceiling,
        "step_s": step_s,
        "gen_s": gen_s,
        "samples_per_step": samples_per_step,
    }


def broadcast(
    args: argparse.Namespace, root: pathlib.Path
) -> tuple[list[float], list[float], float, int]:
    """Seconds per broadcast at each R (rollouter in an actor; rollouter in the driver), one
    memcpy, and the bytes."""
    tokenizer = char_tokenizer(TASK.alphabet)
    model = qwen25_05b_shaped(tokenizer, dtype=torch.bfloat16)
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    del model
    unique = {t.data_ptr(): t for t in weights.values()}.values()
    nbytes = sum(t.numel() * t.element_size() for t in unique)
    memcpy = statistics.median(memcpy_seconds(weights) for _ in range(3))
    print(
        f"broadcast: {len(weights)} tensors, {nbytes / 1e9:.2f} GB bf16; one memcpy "
        f"{memcpy * 1e3:.0f} ms (median of 3)",
        flush=True,
    )
    as_actor, in_driver = [], []
    for replicas in args.broadcast_replicas:
        cfg = as_rl_config(base_config(root, replicas))
        miniray.init(num_workers=1)
        try:
            rollouter = FullyAsyncRollouter.remote(cfg, engine_factory=AdoptingEngines())
            snapshot = PublishedWeights()  # what the loop's WeightPublisher syncs from
            sync = UnifiedParameterSynchronizer(
                cfg, trainer_actor=snapshot, rollouter_actor=rollouter
            )
            times = []
            for version in range(1, args.repeats + WARMUP_ROUNDS + 1):
                # The publisher's put (the trainer's side, its one copy): not timed.
                snapshot.take(miniray.put(weights))
                start = time.perf_counter()
                assert sync.sync_to_rollouter(version)  # pause, load, resume: the run's path
                times.append(time.perf_counter() - start)
                snapshot.take(None)
            as_actor.append(statistics.median(times[WARMUP_ROUNDS:]))
            miniray.get(rollouter.stop.remote(), timeout=60)
            del rollouter
            gc.collect()

            rollouter = FullyAsyncRollouter(cfg, engine_factory=AdoptingEngines())
            times = []
            for version in range(1, args.repeats + WARMUP_ROUNDS + 1):
                start = time.perf_counter()
                assert rollouter.pause_rollout()
                assert rollouter.load_weights(weights, version)
                assert rollouter.resume_rollout()
                times.append(time.perf_counter() - start)
            in_driver.append(statistics.median(times[WARMUP_ROUNDS:]))
            rollouter.stop()
            del rollouter
            gc.collect()
        finally:
            miniray.shutdown()
        print(
            f"  R={replicas}: rollouter actor {as_actor[-1] * 1e3:.0f} ms "
            f"({as_actor[-1] / memcpy:.2f}x memcpy); rollouter in the driver "
            f"{in_driver[-1] * 1e3:.0f} ms ({in_driver[-1] / memcpy:.2f}x)",
            flush=True,
        )
    return as_actor, in_driver, memcpy, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="about 2 minutes: R = 1, 8; 6 steps; 1 repeat"
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--median-s", type=float, default=0.03, help="median response time")
    parser.add_argument("--token-s", type=float, default=0.003, help="fake decoding step")
    parser.add_argument(
        "--ratio", type=float, default=10.0, help="generating a batch on 1 replica / train step"
    )
    parser.add_argument("--broadcast-replicas", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed broadcasts (median)")
    args = parser.parse_args()
    if args.replicas is None:
        args.replicas = [1, 8] if args.quick else [1, 2, 4, 8, 16]
    if args.steps is None:
        args.steps = 6 if args.quick else 14
    if args.broadcast_replicas is None:
        args.broadcast_replicas = [1, 8] if args.quick else [1, 2, 4, 8]
    if args.quick:
        args.repeats = 1
    if 1 not in args.replicas or args.steps <= args.warmup:
        parser.error("--replicas must include 1, and --steps must exceed --warmup")
    torch.set_num_threads(1)
    # run() says once per run that n_gpus_per_node counts CPU processes here: known.
    logging.getLogger("miniray.rl.loop").setLevel(logging.ERROR)
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="rollout_scaling_") as tmp:
        root = pathlib.Path(tmp)
        tokenizer = char_tokenizer(TASK.alphabet)
        torch.manual_seed(0)
        save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
        write_prompts(TASK.rows(1000), root / "train.parquet")
        scaling = throughput(args, root)
        as_actor, in_driver, memcpy, nbytes = broadcast(args, root)

    rows = scaling["rows"]
    ceiling = scaling["ceiling"]
    print()
    print(
        f"{'R':>3} {'async/s':>8} {'effic.':>7} {'sync/s':>7} {'gen/train (sync, s)':>20} "
        f"{'ideal':>6} {'async/sync':>10} {'vs ideal':>8}  bound"
    )
    for r in rows:
        sync = r["sync"]
        print(
            f"{r['replicas']:>3} {r['async']['samples_per_s']:8.1f} {r['efficiency']:7.2f} "
            f"{sync['samples_per_s']:7.1f} {sync['gen_s']:9.1f} / {sync['train_s']:<8.1f} "
            f"{r['ideal']:6.2f} {r['speedup']:10.2f} {r['async_vs_ideal']:8.2f}  "
            f"{'trainer' if r['trainer_bound'] else 'generation'}"
        )
    print(
        f"trainer-bound ceiling: {ceiling:.1f} samples/s ({scaling['samples_per_step']} samples "
        f"per step / {scaling['step_s']:.3f} s)"
    )
    scaling_met = all(r["efficiency"] >= 0.9 for r in rows if not r["trainer_bound"])
    ideal_met = all(r["async_vs_ideal"] >= 0.9 for r in rows)
    print(
        f"goal: >= 0.9 x R x samples/s at R=1 until the trainer bounds: "
        f"{'met' if scaling_met else 'not met'}; async >= 90% of ideal at every R: "
        f"{'met' if ideal_met else 'not met'}"
    )
    print(f"\n{'R':>3} {'broadcast (actor)':>18} {'x memcpy':>9} {'in driver':>10} {'x memcpy':>9}")
    for replicas, actor_s, driver_s in zip(args.broadcast_replicas, as_actor, in_driver):
        print(
            f"{replicas:>3} {actor_s * 1e3:15.0f} ms {actor_s / memcpy:9.2f} "
            f"{driver_s * 1e3:7.0f} ms {driver_s / memcpy:9.2f}"
        )
    broadcast_met = all(s <= 2 * memcpy for s in as_actor)
    print(
        f"one memcpy of {nbytes / 1e9:.2f} GB: {memcpy * 1e3:.0f} ms; goal (<= 2x memcpy at every "
        f"R, as a run places the rollouter): {'met' if broadcast_met else 'not met'}; "
        f"{time.time() - began:.0f} s in all"
    )
    print(
        json.dumps(
            {
                "replicas": [r["replicas"] for r in rows],
                "samples_per_s": [round(r["async"]["samples_per_s"], 2) for r in rows],
                "scaling_efficiency": [round(r["efficiency"], 3) for r in rows],
                "async_vs_ideal": [round(r["async_vs_ideal"], 3) for r in rows],
                "sync_samples_per_s": [round(r["sync"]["samples_per_s"], 2) for r in rows],
                "ideal": [round(r["ideal"], 3) for r in rows],
                "trainer_bound_samples_per_s": round(ceiling, 2),
                "broadcast_replicas": args.broadcast_replicas,
                "broadcast_s": [round(s, 4) for s in as_actor],
                "broadcast_in_driver_s": [round(s, 4) for s in in_driver],
                "memcpy_s": round(memcpy, 4),
                "bytes": nbytes,
            }
        )
    )


if __name__ == "__main__":
    main()
