"""The driver of an RL run: fully asynchronous, or the synchronous baseline on the same resources.

    async:  rollouter actor --groups(v_start)--> queue actor --oldest first--> trainer (driver)
               ^                                                                 |
               +---- synchronizer: pause -> load weights(v+1) -> resume <-- every k steps

    sync:   trainer asks the rollouter for a batch at the current version, waits, trains.

Every wait has a deadline (``async_training.generation_timeout`` for a batch); a crashed
rollouter closes the queue with its traceback, which surfaces here as ``ProducerCrashedError``
instead of a clean end.

Checkpoints (``trainer.save_freq``) hold the trainer's state plus the step and the data
position (``data_position.TrainedPositions``: which prompts were trained). A resumed run
(``trainer.resume_mode``) continues the step and version numbering, hands the checkpoint's
weights and version to the rollouter and queue, and the rollouter issues exactly the prompts
not trained before the checkpoint: groups in flight or queued at the crash are regenerated.
"""

from __future__ import annotations

import json
import logging
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import miniray
from miniray.rl import checkpoint
from miniray.rl.data_position import TrainedPositions
from miniray.rl.param_sync import UnifiedParameterSynchronizer
from miniray.rl.queue import MessageQueue
from miniray.rl.rollouter import FullyAsyncRollouter, RewardFn, as_rl_config
from miniray.rl.trainer import FullyAsyncTrainer

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, wall_s, reward)
    ages: list[int] = field(default_factory=list)
    queue_stats: dict[str, Any] = field(default_factory=dict)
    rollouter_stats: dict[str, Any] = field(default_factory=dict)
    # Prompt positions of the groups trained at each step of this run (resumed runs: from the
    # first step after the checkpoint).
    trained_positions: list[list[int]] = field(default_factory=list)
    resumed_from: str | None = None


def evaluate_greedy(
    model: Any, tokenizer: Any, rows: Sequence[dict], reward_fn: RewardFn, *, max_new_tokens: int
) -> float:
    """Mean reward of greedy answers on held-out rows."""
    from miniray.rl.engines import HFGenerationEngine

    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    prompts = [[tokenizer.bos_token_id, *tokenizer(r["prompt"])["input_ids"]] for r in rows]
    gens = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=0)
    rewards = [
        reward_fn(
            tokenizer.decode(g.response_token_ids, skip_special_tokens=True), str(r["ground_truth"])
        )
        for g, r in zip(gens, rows)
    ]
    return sum(rewards) / max(1, len(rewards))


def run(
    config: Any,
    *,
    eval_rows: Sequence[dict] = (),
    eval_every: int = 10,
    reward_fn: RewardFn | None = None,
    log_dir: str | pathlib.Path | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    engine: Any = None,
    trainer: Any = None,
) -> RunResult:
    """Train for ``trainer.total_training_steps`` steps; returns the summary and the curves.

    ``engine`` (shipped to the rollouter) and ``trainer`` replace the real ones, e.g. with
    fakes of known timing in benchmarks (their interfaces: ``engines.base.GenerationEngine``,
    and ``train_step``/``get_weights``/``set_version`` of ``FullyAsyncTrainer``).
    """
    from miniray.rl.tasks import exact_match_reward

    cfg = as_rl_config(config)
    reward_fn = reward_fn or exact_match_reward
    mode = cfg.async_training.mode
    batch_groups = cfg.data.train_batch_size
    trigger = cfg.trainer.trigger_parameter_sync_step
    timeout = cfg.async_training.generation_timeout
    started_runtime = not miniray.is_initialized()
    if started_runtime:
        miniray.init(num_workers=1)
    log_file = None
    board = None
    if log_dir is not None:
        log_dir = pathlib.Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = (log_dir / "metrics.jsonl").open("w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            board = SummaryWriter(str(log_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional: JSONL always works
            board = None
    queue = MessageQueue.remote(cfg)
    rollouter = FullyAsyncRollouter.remote(cfg, queue, reward_fn=reward_fn, engine=engine)
    trainer = trainer if trainer is not None else FullyAsyncTrainer(cfg)
    # Async mode publishes a snapshot of the weights in the background (the next step runs
    # while they travel); the synchronizer reads them from here.
    published = _Snapshot(cfg.async_training.weight_extrapolation)
    sync = UnifiedParameterSynchronizer(
        cfg, trainer_actor=published if mode == "async" else trainer, rollouter_actor=rollouter
    )
    publisher = _Publisher(sync, published, timeout=2 * cfg.async_training.sync_timeout + 30)
    result = RunResult(summary={})
    max_new = cfg.data.max_response_length

    def evaluate() -> float:
        return (
            evaluate_greedy(
                trainer.model, trainer.tokenizer, eval_rows, reward_fn, max_new_tokens=max_new
            )
            if eval_rows
            else float("nan")
        )

    save_freq = cfg.trainer.save_freq
    total_steps = cfg.trainer.total_training_steps
    run_start = time.time()
    sync_ms: list[float] = []
    wait_s = 0.0
    version_ref: miniray.ObjectRef | None = None  # the queue's answer to the last version bump
    try:
        version, start_step, trained, resumed = _resume(cfg, trainer, rollouter, queue, timeout)
        sync.restore_version(version)
        result.resumed_from = None if resumed is None else str(resumed)
        run_start = time.time()
        result.evals.append((start_step, 0.0, evaluate()))
        if mode == "async":
            miniray.get(rollouter.start.remote(), timeout=timeout)
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.time()
            if mode == "async":
                groups = miniray.get(
                    queue.get_batch.remote(batch_groups, version, timeout=timeout),
                    timeout=timeout + 30,
                )
            else:
                groups = miniray.get(
                    rollouter.generate_batch.remote(batch_groups, version), timeout=timeout
                )
            waited = time.time() - t0
            wait_s += waited
            # Answers travel through the driver, which is busy training: ask now, read after.
            size_ref = queue.get_queue_size.remote()
            if version_ref is not None:  # the queue took the last version bump (or raises)
                miniray.get(version_ref, timeout=timeout)
                version_ref = None
            metrics: dict[str, Any] = dict(trainer.train_step(groups))
            positions = [g[0].metadata["prompt_position"] for g in groups]
            for position in positions:
                trained.add(position)
            result.trained_positions.append(positions)
            result.ages.extend(version - g[0].v_start for g in groups)
            if step % trigger == 0:
                t1 = time.time()
                if mode == "async":
                    publisher.wait()  # the previous version is in place: versions stay in order
                    published.take(trainer.get_weights())  # before the next step changes them
                    publisher.start(version + 1)
                else:
                    weights = miniray.put(trainer.get_weights())
                    miniray.get(
                        rollouter.load_weights.remote(weights, version + 1), timeout=timeout
                    )
                version += 1
                trainer.set_version(version)
                # Not waited for: the queue's version only moves forward (the next get_batch
                # passes it too), so the order of the two calls is moot; read at the next step.
                version_ref = queue.update_param_version.remote(version)
                sync_ms.append((time.time() - t1) * 1e3)
            if save_freq >= 0 and (
                step == total_steps or (save_freq > 0 and step % save_freq == 0)
            ):
                extra = {"step": step, "data_position": trained.to_dict()}
                checkpoint.save_step(trainer, cfg, step, extra)
            metrics.update(
                step=step,
                version=version,
                wall_s=time.time() - run_start,
                trainer_wait_s=waited,
                queue_size=miniray.get(size_ref, timeout=timeout),
                queue_capacity=cfg.async_training.max_queue_size,
            )
            if eval_rows and (step % eval_every == 0 or step == total_steps):
                reward = evaluate()
                result.evals.append((step, time.time() - run_start, reward))
                metrics["eval_reward"] = reward
            result.history.append(metrics)
            if log_file is not None:
                log_file.write(json.dumps(metrics) + "\n")
                log_file.flush()
            if board is not None:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and key != "step":
                        board.add_scalar(key, value, step)
            if on_step is not None:
                on_step(step, metrics)
        publisher.wait()  # a failed last sync fails the run
        if version_ref is not None:
            miniray.get(version_ref, timeout=timeout)
    finally:
        publisher.close()
        try:
            miniray.get(rollouter.stop.remote(), timeout=timeout)
            result.queue_stats = miniray.get(queue.get_statistics.remote(), timeout=timeout)
            rollouter_stats = miniray.get(rollouter.get_statistics.remote(), timeout=timeout)
        except Exception:
            rollouter_stats = {}
        result.rollouter_stats = rollouter_stats
        if log_file is not None:
            log_file.close()
        if board is not None:
            board.close()
        if started_runtime:
            miniray.shutdown()
    wall = time.time() - run_start
    samples = sum(m["samples"] for m in result.history)
    sync_stats = sync.get_statistics()
    sync_phase_ms = {
        key[: -len("_s_p50")] + ("_p50" if key.endswith("p50") else "_p95"): round(value * 1e3, 2)
        for key, value in sync_stats.items()
        if (key.endswith("_s_p50") or key.endswith("_s_p95")) and value is not None
    }
    result.summary = {
        "initial_reward": result.evals[0][2],
        "final_reward": result.evals[-1][2],
        "wall_s": round(wall, 2),
        "samples_per_s": round(samples / wall, 2),
        "steps": len(result.history),
        "mean_age": round(statistics.mean(result.ages), 3) if result.ages else 0.0,
        "max_age": max(result.ages) if result.ages else 0,
        "rejected_stale": int(rollouter_stats.get("groups_rejected_stale", 0)),
        # The sync's own latency; in async mode the trainer waits only for a snapshot of
        # its weights (``sync_blocking_ms_p50``), the rest overlaps its next step.
        "sync_ms_p50": sync_phase_ms.get("total_p50")
        or (round(statistics.median(sync_ms), 2) if sync_ms else 0.0),
        "sync_blocking_ms_p50": round(statistics.median(sync_ms), 2) if sync_ms else 0.0,
        "mode": mode,
        "sync_phase_ms": sync_phase_ms,
        "trainer_idle_ratio": round(wait_s / wall, 3),
        "rollouter_idle_ratio": round(rollouter_stats.get("idle_ratio", 0.0), 3),
    }
    return result


def _resume(
    cfg: Any, trainer: Any, rollouter: Any, queue: Any, timeout: float
) -> tuple[int, int, TrainedPositions, Path | None]:
    """(version, step, trained positions, checkpoint) to start from, restored from the
    checkpoint ``trainer.resume_mode`` picks (none: a fresh start).

    Before the rollouter starts: it gets the checkpoint's weights and version (its own engine
    was built from the initial model) and the data position; the queue gets the version, so
    ages are measured against the resumed trainer.
    """
    path = checkpoint.resume_path(cfg)
    if path is None:
        return 0, 0, TrainedPositions(), None
    extra = trainer.load_checkpoint(path)
    step, version = int(extra["step"]), int(trainer.version)
    trained = TrainedPositions.from_dict(extra["data_position"])
    if step > cfg.trainer.total_training_steps:
        raise ValueError(
            f"trainer.total_training_steps={cfg.trainer.total_training_steps} is invalid: the "
            f"checkpoint {str(path)!r} is already at step {step}"
        )
    miniray.get(rollouter.restore_data_position.remote(trained.to_dict()), timeout=timeout)
    weights = miniray.put(trainer.get_weights())
    miniray.get(rollouter.load_weights.remote(weights, version), timeout=timeout)
    miniray.get(queue.update_param_version.remote(version), timeout=timeout)
    return version, step, trained, path


def extrapolate(
    weights: dict[str, torch.Tensor],
    earlier: dict[str, torch.Tensor] | None,
    factor: float,
) -> dict[str, torch.Tensor]:
    """``weights + factor * (weights - earlier)`` for floating-point entries (others as they
    are). Adam's momentum makes consecutive updates point much the same way, so one step
    further along the last one is closer to the next weights than the current ones are
    (SpecTrain's weight prediction for pipeline staleness). Entries that share a tensor
    (tied embeddings) still share one in the result."""
    if not factor or earlier is None:
        return weights
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, value in weights.items():
        if id(value) in done:
            out[name] = done[id(value)]
            continue
        if value.is_floating_point():
            out[name] = torch.lerp(earlier[name], value, 1.0 + factor)
        else:
            out[name] = value
        done[id(value)] = out[name]
    return out


class _Snapshot:
    """The weights the synchronizer publishes: a copy taken after a step, so the trainer can
    take its next step while they travel to the rollouter. With ``extrapolation`` c > 0 it
    publishes ``theta + c * (theta - theta_before)`` (``extrapolate``), computed while
    staging, in the sync's thread rather than on the trainer's path."""

    def __init__(self, extrapolation: float = 0.0) -> None:
        self.weights: Any = None
        self.extrapolation = extrapolation
        # The last two snapshots as trained; kept only when extrapolating.
        self._trained: dict[str, torch.Tensor] | None = None
        self._before: dict[str, torch.Tensor] | None = None

    def take(self, weights: dict[str, torch.Tensor]) -> None:
        """A new snapshot; ``weights`` must be a copy (the next step changes the model)."""
        if self.extrapolation:
            self._before, self._trained = self._trained, weights
        self.weights = weights

    def stage(self) -> None:
        """Put the weights in the object store before the sync pauses the rollouter: then
        its pause lasts for the load alone, not for serializing the weights as well."""
        if self.weights is not None and not isinstance(self.weights, miniray.ObjectRef):
            self.weights = miniray.put(extrapolate(self.weights, self._before, self.extrapolation))

    def get_weights(self) -> Any:
        if self.weights is None:
            raise RuntimeError("no weights to publish yet: a snapshot is taken after a step")
        return self.weights


class _Publisher:
    """Runs one weight sync at a time in a background thread.

    ``start(v)`` returns at once; ``wait()`` blocks until the running sync is done and raises
    its error (a sync that failed after its retries stops the run, as when it ran inline).
    The trainer's version moves on at ``start``: samples the rollouter makes until the new
    weights are loaded are one version older, which the staleness bound already allows.
    """

    def __init__(self, sync: UnifiedParameterSynchronizer, snapshot: _Snapshot, *, timeout: float):
        self.sync = sync
        self.snapshot = snapshot
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        self._running: Future[bool] | None = None

    def start(self, version: int) -> None:
        if self._running is not None:
            raise RuntimeError("a weight sync is still running: wait() for it first")
        self._running = self._executor.submit(self._publish, version)

    def _publish(self, version: int) -> bool:
        self.snapshot.stage()
        return self.sync.sync_to_rollouter(version)

    def wait(self) -> None:
        running, self._running = self._running, None
        if running is None:
            return
        try:
            running.result(timeout=self.timeout)
        except FutureTimeoutError:
            raise TimeoutError(
                f"the weight sync did not finish within {self.timeout:g}s; look for a hung "
                "rollouter (pause_rollout/load_weights) or raise async_training.sync_timeout"
            ) from None

    def close(self) -> None:
        """Let a running sync finish (it resumes the rollouter in any case), then stop."""
        if self._running is not None:
            try:
                self._running.result(timeout=self.timeout)
            except Exception as exc:  # the run is ending because of another error: keep that
                logger.warning("the weight sync running at shutdown failed too: %s", exc)
            self._running = None
        self._executor.shutdown(wait=False)
