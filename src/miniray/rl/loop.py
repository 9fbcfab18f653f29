"""The driver of an RL run: fully asynchronous, or the synchronous baseline on the same resources.

    async:  rollouter actor --groups(v_start)--> queue actor --oldest first--> trainer (driver)
               ^                                                                 |
               +---- synchronizer: pause -> load weights(v+1) -> resume <-- every k steps

    sync:   trainer asks the rollouter for a batch at the current version, waits, trains.

Every wait has a deadline (``async_training.generation_timeout`` for a batch; ``inf``: none,
which the runtime's ``get``/``wait`` take as it is); a crashed rollouter closes the queue with
its traceback, which surfaces here as ``ProducerCrashedError`` instead of a clean end. A rollouter whose process died cannot close
the queue: the loop keeps a call to it in flight (``_ProducerWatch``) that the runtime fails at
once, and every wait for a batch waits on that call too, so a dead rollouter is a
``ProducerCrashedError`` within moments, not a timeout blaming a paused one.

Weights that are not finite after a step (a diverged update) are never published or
checkpointed: the run fails with ``NonFiniteWeightsError`` naming the step and the parameter,
instead of the rollouter crashing later in its sampling.

Checkpoints (``trainer.save_freq``) hold the trainer's state plus the step and the data
position (``data_position.TrainedPositions``: which prompts were trained). A resumed run
(``trainer.resume_mode``) continues the step and version numbering, hands the checkpoint's
weights and version to the rollouter and queue, and the rollouter issues exactly the prompts
not trained before the checkpoint: groups in flight or queued at the crash are regenerated.
"""

from __future__ import annotations

import functools
import logging
import math
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
from miniray.errors import RayActorError
from miniray.rl import checkpoint
from miniray.rl.data_position import TrainedPositions
from miniray.rl.dynamic_sampling import REWARD_METRICS_KEY, fill_batch
from miniray.rl.errors import NonFiniteWeightsError, ParameterSyncError, ProducerCrashedError
from miniray.rl.param_sync import UnifiedParameterSynchronizer
from miniray.rl.prompts import prompt_text, prompt_token_ids
from miniray.rl.queue import MessageQueue
from miniray.rl.rewards import RewardScorer, build_scorer, requests_for
from miniray.rl.rollouter import FullyAsyncRollouter, RewardFn, as_rl_config
from miniray.rl.tracking import build_loggers, check_logger_names
from miniray.rl.trainer import FullyAsyncTrainer, non_finite_parameters

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
    # Prompt positions consumed but not trained at each step (dynamic sampling's drops).
    dropped_positions: list[list[int]] = field(default_factory=list)
    resumed_from: str | None = None


def evaluate_greedy(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    scorer: RewardScorer,
    *,
    max_new_tokens: int,
    prompt_key: str = "prompt",
) -> float:
    """Mean reward of greedy answers on held-out rows (prompts in ``row[prompt_key]``, the
    config's ``data.prompt_key``, text or chat messages; answers in ``row["ground_truth"]``,
    as ``load_prompts`` stores them), scored by the run's reward function."""
    from miniray.rl.engines import HFGenerationEngine

    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    prompts = [r[prompt_key] for r in rows]
    gens = engine.generate(
        prompt_token_ids(tokenizer, prompts), max_new_tokens=max_new_tokens, temperature=0
    )
    rewards = []
    for g, r, p in zip(gens, rows, prompts):
        response = tokenizer.decode(g.response_token_ids, skip_special_tokens=True)
        (reward,) = scorer.score(requests_for(r, [response], prompt_text(tokenizer, p)))
        rewards.append(reward.score)
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
    cfg = as_rl_config(config)
    mode = cfg.async_training.mode
    batch_groups = cfg.data.train_batch_size
    trigger = cfg.trainer.trigger_parameter_sync_step
    timeout = cfg.async_training.generation_timeout
    started_runtime = not miniray.is_initialized()
    if started_runtime:
        miniray.init(num_workers=1)
    # Checked before anything starts: an unknown or uninstalled logger is an error now, not
    # after the first step.
    check_logger_names(cfg.trainer.logger)
    check_devices(cfg)
    sinks = (
        []
        if log_dir is None
        else build_loggers(
            cfg.trainer.logger,
            run_dir=log_dir,
            project=cfg.trainer.project_name,
            experiment=cfg.trainer.experiment_name,
            config=cfg.to_dict(),
        )
    )
    queue = MessageQueue.remote(cfg)
    rollouter = FullyAsyncRollouter.remote(cfg, queue, reward_fn=reward_fn, engine=engine)
    trainer = trainer if trainer is not None else FullyAsyncTrainer(cfg)
    # Async mode publishes a snapshot of the weights in the background (the next step runs
    # while they travel); the synchronizer reads them from here.
    published = PublishedWeights(cfg.async_training.weight_extrapolation)
    sync = UnifiedParameterSynchronizer(
        cfg, trainer_actor=published if mode == "async" else trainer, rollouter_actor=rollouter
    )
    publisher = _Publisher(sync, published, timeout=2 * cfg.async_training.sync_timeout + 30)
    extrapolating = bool(cfg.async_training.weight_extrapolation) and mode == "async"
    result = RunResult(summary={})
    max_new = cfg.data.max_response_length
    eval_scorer = build_scorer(cfg, reward_fn, eval_rows)
    filters = cfg.algorithm.filter_groups
    # Read here, whether or not enabled: the settings are checked even when off.
    metric, max_batches = filters.metric, filters.max_num_gen_batches

    def evaluate() -> float:
        return (
            evaluate_greedy(
                trainer.model,
                trainer.tokenizer,
                eval_rows,
                eval_scorer,
                max_new_tokens=max_new,
                prompt_key=cfg.data.prompt_key,
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
    producer: _ProducerWatch | None = None  # async mode: learns at once that the rollouter died
    finite_at = 0  # the last step whose weights were checked and found finite
    discard_refs: list[miniray.ObjectRef] = []  # the rollouter's answers to discard_groups

    def discard(groups: list) -> None:
        """Dynamic sampling dropped ``groups``: their staleness room goes back now."""
        discard_refs.append(rollouter.discard_groups.remote(len(groups)))

    def fetch_groups(count: int, *, at: int) -> list:
        """``count`` groups for a trainer at version ``at``: from the queue (async), or
        generated now (sync)."""
        if producer is not None:
            return producer.get(
                queue.get_batch.remote(count, at, timeout=timeout), timeout=timeout + 30
            )
        return _from_rollouter(rollouter.generate_batch.remote(count, at), timeout)

    try:
        version, start_step, trained, resumed, dropped_total = _resume(
            cfg, trainer, rollouter, queue, timeout
        )
        finite_at = start_step
        sync.restore_version(version)
        result.resumed_from = None if resumed is None else str(resumed)
        run_start = time.time()
        result.evals.append((start_step, 0.0, evaluate()))
        if mode == "async":
            miniray.get(rollouter.start.remote(), timeout=timeout)
            producer = _ProducerWatch(rollouter, queue)
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.time()
            fetch = functools.partial(fetch_groups, at=version)
            dropped: list = []
            if filters.enable:
                filled = fill_batch(
                    fetch,
                    batch_groups,
                    metric=metric,
                    max_num_gen_batches=max_batches,
                    on_drop=discard,
                )
                groups, dropped = filled.kept, filled.dropped
                dropped_total += len(dropped)
            else:
                groups = fetch(batch_groups)
            waited = time.time() - t0
            wait_s += waited
            # Answers travel through the driver, which is busy training: ask now, read after.
            size_ref = queue.get_queue_size.remote()
            if version_ref is not None:  # the queue took the last version bump (or raises)
                miniray.get(version_ref, timeout=timeout)
                version_ref = None
            for ref in discard_refs:  # the rollouter took the discarded groups (or raises)
                _from_rollouter(ref, timeout)
            discard_refs.clear()
            metrics: dict[str, Any] = dict(trainer.train_step(groups))
            metrics.update(reward_metrics(groups))
            if filters.enable:
                metrics["filter_groups/dropped"] = len(dropped)
                metrics["filter_groups/dropped_total"] = dropped_total
                metrics["filter_groups/fetches"] = filled.fetches
            saving = save_freq >= 0 and (
                step == total_steps or (save_freq > 0 and step % save_freq == 0)
            )
            # The weights leave the trainer only when finite; a step whose loss or gradient
            # norm is not finite is checked at once, so the error names the step it began at.
            publishing = step % trigger == 0
            t1 = time.time()  # the publishing's blocking time includes taking the weights
            weights = None
            if publishing or saving or not _finite_metrics(metrics):
                weights = weights_of(trainer, copy=extrapolating)
                check_finite_weights(weights, step, finite_at, metrics)
                finite_at = step
            positions = [g[0].metadata["prompt_position"] for g in groups]
            gone = [g[0].metadata["prompt_position"] for g in dropped]
            for position in positions + gone:  # a dropped prompt is consumed, never re-issued
                trained.add(position)
            result.trained_positions.append(positions)
            result.dropped_positions.append(gone)
            result.ages.extend(version - g[0].v_start for g in groups)
            if publishing:
                assert weights is not None
                if mode == "async":
                    publisher.wait()  # the previous version is in place: versions stay in order
                    # Taken before the next step changes them: into shared memory now (the
                    # sync's one copy), or kept as a copy to extrapolate from.
                    published.take(weights if extrapolating else miniray.put(weights))
                    publisher.start(version + 1)
                else:
                    _from_rollouter(
                        rollouter.load_weights.remote(miniray.put(weights), version + 1),
                        timeout,
                    )
                version += 1
                trainer.set_version(version)
                # Not waited for: the queue's version only moves forward (the next get_batch
                # passes it too), so the order of the two calls is moot; read at the next step.
                version_ref = queue.update_param_version.remote(version)
                sync_ms.append((time.time() - t1) * 1e3)
            if saving:
                extra = {
                    "step": step,
                    "data_position": trained.to_dict(),
                    "groups_discarded": dropped_total,
                }
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
            for sink in sinks:
                sink.log(metrics, step)
            if on_step is not None:
                on_step(step, metrics)
        publisher.wait()  # a failed last sync fails the run
        if version_ref is not None:
            miniray.get(version_ref, timeout=timeout)
    except Exception as exc:
        # A failure that a dead rollouter caused (a sync or a call to it failing) is reported
        # as what it is; the watch may take a moment longer than the failed call to resolve.
        if producer is not None and not isinstance(exc, ProducerCrashedError):
            about_actors = isinstance(exc, (ParameterSyncError, RayActorError))
            producer.check(wait_s=1.0 if about_actors else 0.0, cause=exc)
        raise
    finally:
        publisher.close()
        eval_scorer.close()
        try:
            miniray.get(rollouter.stop.remote(), timeout=timeout)
            result.queue_stats = miniray.get(queue.get_statistics.remote(), timeout=timeout)
            rollouter_stats = miniray.get(rollouter.get_statistics.remote(), timeout=timeout)
        except Exception:
            rollouter_stats = {}
        result.rollouter_stats = rollouter_stats
        for sink in sinks:
            sink.close()
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
        "prompts_skipped_too_long": int(rollouter_stats.get("prompts_skipped_too_long", 0)),
    }
    return result


def check_devices(cfg: Any) -> None:
    """``n_gpus_per_node`` of the trainer and the rollouter: 0 runs on the CPU; 1 (the most
    the config accepts until the scale-out issues land) is said to run on the CPU too, since
    this loop places nothing on a GPU yet."""
    for key, value in (
        ("trainer.n_gpus_per_node", cfg.trainer.n_gpus_per_node),
        ("rollout.n_gpus_per_node", cfg.rollout.n_gpus_per_node),
    ):
        if value:
            logger.warning(
                "%s=%d: the RL loop places nothing on a GPU yet (the scale-out issues add "
                "that); this role runs on the CPU in its process",
                key,
                value,
            )


def _resume(
    cfg: Any, trainer: Any, rollouter: Any, queue: Any, timeout: float
) -> tuple[int, int, TrainedPositions, Path | None, int]:
    """(version, step, trained positions, checkpoint, groups discarded) to start from,
    restored from the checkpoint ``trainer.resume_mode`` picks (none: a fresh start).

    Before the rollouter starts: it gets the checkpoint's weights and version (its own engine
    was built from the initial model) and the data position; the queue gets the version, so
    ages are measured against the resumed trainer.
    """
    # Before looking for the newest checkpoint: a save killed mid-swap is restored here.
    checkpoint.remove_stale_temporaries(checkpoint.checkpoint_dir(cfg))
    path = checkpoint.resume_path(cfg)
    if path is None:
        return 0, 0, TrainedPositions(), None, 0
    extra = trainer.load_checkpoint(path)
    discarded = int(extra.get("groups_discarded", 0))  # absent before dynamic sampling
    step, version = int(extra["step"]), int(trainer.version)
    trained = TrainedPositions.from_dict(extra["data_position"])
    if step > cfg.trainer.total_training_steps:
        raise ValueError(
            f"trainer.total_training_steps={cfg.trainer.total_training_steps} is invalid: the "
            f"checkpoint {str(path)!r} is already at step {step}"
        )
    _from_rollouter(rollouter.restore_data_position.remote(trained.to_dict(), discarded), timeout)
    weights = miniray.put(trainer.get_weights())
    _from_rollouter(rollouter.load_weights.remote(weights, version), timeout)
    miniray.get(queue.update_param_version.remote(version), timeout=timeout)
    return version, step, trained, path, discarded


def weights_of(trainer: Any, *, copy: bool) -> dict[str, Any]:
    """The trainer's weights to check and publish: its live tensors when it offers them
    (``FullyAsyncTrainer.live_weights``) and the caller copies them out at once, else (or with
    ``copy``) ``get_weights()``, a copy. Measured at Qwen2.5-0.5B size in bf16
    (benchmarks/weight_sync.py): the clone was one of the sync's two memcpys of the model."""
    live = getattr(trainer, "live_weights", None)
    if copy or not callable(live):
        return trainer.get_weights()
    return live()


def reward_metrics(groups: Sequence[Sequence[Any]]) -> dict[str, float]:
    """The mean of each numeric field the reward function returned beside its score, as
    ``reward_extra/<field>`` (verl logs them the same way), over the samples trained on."""
    sums: dict[str, list[float]] = {}
    for group in groups:
        for sample in group:
            for key, value in sample.metadata.get(REWARD_METRICS_KEY, {}).items():
                sums.setdefault(key, []).append(value)
    return {f"reward_extra/{k}": sum(v) / len(v) for k, v in sums.items()}


def _finite_metrics(metrics: dict[str, Any]) -> bool:
    """False when the step's loss or gradient norm is NaN or inf: its update then poisoned
    the weights (the gradient clip scales by a NaN norm), so they are checked at once."""
    return all(
        math.isfinite(metrics[key])
        for key in ("loss", "grad_norm")
        if isinstance(metrics.get(key), (int, float))
    )


def check_finite_weights(
    weights: dict[str, Any], step: int, finite_at: int, metrics: dict[str, Any]
) -> None:
    """Raise ``NonFiniteWeightsError`` when ``weights`` (the trainer's after ``step``) hold NaN
    or inf, naming the step and the first such parameter. ``finite_at``: the last step whose
    weights were found finite, so the message bounds where the divergence began."""
    bad = non_finite_parameters(weights)
    if not bad:
        return
    since = (
        f"step {step}"
        if finite_at >= step - 1
        else f"steps {finite_at + 1}-{step} (finite after step {finite_at}, not checked between)"
    )
    shown = {k: metrics[k] for k in ("loss", "grad_norm", "lr") if k in metrics}
    raise NonFiniteWeightsError(
        f"step {step}: the trainer's weights are not finite: {bad[0]!r} holds NaN or inf "
        f"({len(bad)} of {len(weights)} entries do); the update diverged at {since} "
        f"(metrics of step {step}: {shown}). They were not published to the rollouter nor "
        "checkpointed. Lower actor_rollout_ref.actor.optim.lr (or look for a broken reward "
        "or data), then resume from the last checkpoint",
        step=step,
        parameter=bad[0],
    )


def _from_rollouter(ref: miniray.ObjectRef, timeout: float) -> Any:
    """The answer of a call to the rollouter; its death is ``ProducerCrashedError`` (sync mode,
    and before the generation loop starts, where no ``_ProducerWatch`` runs)."""
    try:
        return miniray.get(ref, timeout=timeout)
    except RayActorError as exc:
        raise ProducerCrashedError(f"the rollouter died: {exc}", str(exc)) from exc


class _ProducerWatch:
    """Learns at once that the rollouter has gone: its process died, or its loop ended.

    One call of ``rollouter.wait_loop_end()`` stays in flight for the whole run. It returns
    when the generation loop ends (its traceback, or None for a stop) and the runtime fails it
    with a ``RayActorError`` as soon as the rollouter's process dies. Without it a SIGKILLed
    rollouter, which cannot close the queue with an error, was found only by the queue's
    timeout (forever with ``generation_timeout=inf``), whose message blamed a paused rollouter.
    """

    def __init__(self, rollouter: Any, queue: Any):
        self._ref = rollouter.wait_loop_end.remote()
        self._queue = queue
        self._error: ProducerCrashedError | None = None

    def get(self, ref: miniray.ObjectRef, *, timeout: float) -> Any:
        """``ref``'s value (a ``GetTimeoutError`` after ``timeout``), or
        ``ProducerCrashedError`` as soon as the rollouter is gone."""
        ready, _ = miniray.wait([ref, self._ref], num_returns=1, timeout=timeout)
        if ref in ready or not ready:  # ready first (wait lists it first), or time is up
            return miniray.get(ref, timeout=0)
        raise self._ended()

    def check(self, *, wait_s: float = 0.0, cause: BaseException | None = None) -> None:
        """Raise ``ProducerCrashedError`` (from ``cause``) if the rollouter is gone, waiting
        up to ``wait_s`` seconds for the watch to tell."""
        ready, _ = miniray.wait([self._ref], timeout=wait_s)
        if ready:
            raise self._ended() from cause

    def _ended(self) -> ProducerCrashedError:
        if self._error is None:
            try:
                crash = miniray.get(self._ref, timeout=0)  # ready: no wait
            except RayActorError as exc:
                message, crash = f"the rollouter died: {exc}", str(exc)
            except Exception as exc:  # the watch itself failed: the rollouter is unusable too
                crash = f"{type(exc).__name__}: {exc}"
                message = f"the rollouter's watch failed: {crash}"
            else:
                message = (
                    f"the rollouter crashed:\n{crash}"
                    if crash
                    else "the rollouter's generation loop stopped before the run ended"
                )
            self._error = ProducerCrashedError(message, crash or "")
            # A get_batch may still wait in the queue for a producer that will never close it.
            self._queue.close.remote(message)
        return self._error


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


class PublishedWeights:
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

    def take(self, weights: Any) -> None:
        """A new snapshot: an ``ObjectRef`` of weights already put, or (to extrapolate from)
        a copy of them; never the live parameters, which the next step changes."""
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

    def __init__(
        self, sync: UnifiedParameterSynchronizer, snapshot: PublishedWeights, *, timeout: float
    ):
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
