"""The driver of an RL run: fully asynchronous, or the synchronous baseline on the same resources.

``run`` is one loop over two small parts that hide the mode::

    source = batch_source(...)          async: rollouter --> queue actor --> batch (oldest first)
    publisher = WeightPublisher(...)    sync:  rollouter.generate_batch(n, version) --> batch
    resume from a checkpoint; evaluate; source.start()
    for step:
        batch = source.next_batch(version)            (dynamic sampling's fill inside)
        source.prefetch(next step's version)            async: the next get_batch waits meanwhile
        send the step (unless sent during the last one)  (publisher.prepare before, every k;
                                                          publisher.sent after: its swap too)
        async, a publishing step: send the next step now, its batch the prefetched ref
        metrics = the step's result
        every k steps:  publisher.publish(version + 1)  async: snapshot, sync in the background
                        trainer.set_version, source.hand_off    sync: load, blocking
        other steps:    publisher.check_weights         (NaN/inf weights never leave)
        checkpoint (save_freq); evaluate (test_freq); write the step's metrics
    summary = build_summary(...)

``batch_source`` (where batches come from, a dead rollouter noticed at once) and
``weight_publisher`` (taking, checking, extrapolating and loading the weights) say how;
``summary.build_summary`` is the summary's arithmetic.

Checkpoints (``trainer.save_freq``) hold the trainer's state plus the step and the data
position (``data_position.TrainedPositions``: which prompts were trained). A resumed run
(``trainer.resume_mode``) continues the step and version numbering, hands the checkpoint's
weights and version to the rollouter and queue, and the rollouter issues exactly the prompts
not trained before the checkpoint: groups in flight or queued at the crash are regenerated.
"""

from __future__ import annotations

import gc
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import miniray
from miniray.rl import checkpoint
from miniray.rl.batch_source import Batch, batch_source, rollouter_result
from miniray.rl.data_position import TrainedPositions
from miniray.rl.dynamic_sampling import REWARD_METRICS_KEY
from miniray.rl.multi_turn import (
    AgentLoop,
    agent_loop_of,
    conversation_metrics,
    greedy_conversations,
    record_conversations,
)
from miniray.rl.prompts import prompt_text, prompt_token_ids
from miniray.rl.queue import MessageQueue
from miniray.rl.replicas import replica_count, rollout_placement
from miniray.rl.rewards import RewardScorer, build_scorer, requests_for
from miniray.rl.rollouter import FullyAsyncRollouter, RewardFn, as_rl_config
from miniray.rl.summary import build_summary, trainer_placement
from miniray.rl.tracking import MetricsLogger, build_loggers, check_logger_names, peak_rss_gib
from miniray.rl.trainer_group import TrainerGroup
from miniray.rl.weight_publisher import WeightPublisher

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
    policy: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    scorer: RewardScorer,
    *,
    max_new_tokens: int,
    prompt_key: str = "prompt",
    agent: AgentLoop | None = None,
) -> float:
    """Mean reward of greedy answers on held-out rows (prompts in ``row[prompt_key]``, the
    config's ``data.prompt_key``, text or chat messages; answers in ``row["ground_truth"]``,
    as ``load_prompts`` stores them), scored by the run's reward function in this process.

    ``policy``: a causal LM here, or a trainer offering ``greedy_tokens`` (the trainer group
    generates on its ranks and only the token ids come back). ``agent``: a multi-turn run's
    agent loop; each prompt is then a whole greedy conversation with its tool calls, and the
    reward sees the conversation as in training (``multi_turn.record_conversations``)."""
    prompts = [r[prompt_key] for r in rows]
    generate = getattr(policy, "greedy_tokens", None)
    if generate is None:
        from miniray.rl.engines import HFGenerationEngine

        engine = HFGenerationEngine(
            policy, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )

        def generate(ids: list, new_tokens: int) -> list:
            gens = engine.generate(ids, max_new_tokens=new_tokens, temperature=0)
            return [g.response_token_ids for g in gens]

    tools = agent.registry.schemas if agent is not None else None
    ids = prompt_token_ids(tokenizer, prompts, tools=tools)
    if agent is None:
        responses, conversations = generate(ids, max_new_tokens), None
    else:
        conversations = greedy_conversations(
            agent,
            generate,
            ids,
            eos_token_id=tokenizer.eos_token_id,
            max_response_length=max_new_tokens,
        )
        responses = [sample.response_token_ids for sample, _ in conversations]
    rewards = []
    for i, (tokens, r, p) in enumerate(zip(responses, rows, prompts)):
        response = tokenizer.decode(tokens, skip_special_tokens=True)
        requests = requests_for(r, [response], prompt_text(tokenizer, p, tools=tools))
        if conversations is not None:
            sample, conv = conversations[i]
            requests = record_conversations(requests, [sample], [conv])
        (reward,) = scorer.score(requests)
        rewards.append(reward.score)
    return sum(rewards) / max(1, len(rewards))


def run(
    config: Any,
    *,
    eval_rows: Sequence[dict] = (),
    reward_fn: RewardFn | None = None,
    log_dir: str | pathlib.Path | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    engine: Any = None,
    trainer: Any = None,
    engine_factory: Callable[[int], Any] | None = None,
) -> RunResult:
    """Train for ``trainer.total_training_steps`` steps; returns the summary and the curves.

    ``eval_rows`` (``data.val_files``' rows) are evaluated greedily before the first step
    (``trainer.val_before_train``) and every ``trainer.test_freq`` steps and after the last.

    The trainer is a ``TrainerGroup`` of rank actors (``trainer.nnodes x n_gpus_per_node``),
    closed when the run ends. ``engine`` (shipped to the rollouter) and ``trainer`` replace
    the real ones, e.g. with fakes of known timing in benchmarks (their interfaces:
    ``engines.base.GenerationEngine``, and ``train_step``/``get_weights``/``set_version`` of
    ``FullyAsyncTrainer``; the caller keeps a trainer it passes). With several rollout
    replicas (``rollout.nnodes x n_gpus_per_node``) ``engine_factory`` builds each one's
    engine in its own process instead. ``on_step`` runs while the next step may already be
    training on the ranks (async mode): it must not call the trainer, which refuses a call
    with a step in flight.
    """
    cfg = as_rl_config(config)
    trigger, save_freq = cfg.trainer.trigger_parameter_sync_step, cfg.trainer.save_freq
    total_steps, test_freq = cfg.trainer.total_training_steps, cfg.trainer.test_freq
    started_runtime = not miniray.is_initialized()
    if started_runtime:
        miniray.init(num_workers=1)
    # Checked before anything starts: an unknown or uninstalled logger is an error now, not
    # after the first step.
    check_logger_names(cfg.trainer.logger)
    replicas_at = rollout_placement(cfg)  # in the driver: a Ray actor may see no GPU
    if replicas_at.note:
        logger.warning("%s", replicas_at.note)
    sinks = _open_sinks(cfg, log_dir)
    queue = MessageQueue.remote(cfg)
    # A one-replica rollouter generates in its own process: on CUDA that process needs the GPU.
    in_process_gpu = replicas_at.num_gpus if replica_count(cfg) == 1 else 0
    rollouter = FullyAsyncRollouter.options(num_gpus=in_process_gpu).remote(
        cfg,
        queue,
        reward_fn=reward_fn,
        engine=engine,
        engine_factory=engine_factory,
        placement=replicas_at,
    )
    own_trainer = trainer is None
    trainer = TrainerGroup.start(cfg) if trainer is None else trainer
    publisher = WeightPublisher.for_run(cfg, trainer, rollouter)
    source = batch_source(cfg, rollouter, queue, poll=publisher.check)
    placement = trainer_placement(trainer)
    result = RunResult(summary={})
    eval_scorer = build_scorer(cfg, reward_fn, eval_rows)
    # Multi-turn: the held-out conversations call the tools too (the driver's own registry).
    eval_agent = agent_loop_of(cfg, trainer.tokenizer) if eval_rows else None

    def evaluate() -> float:
        if not eval_rows:
            return float("nan")
        return evaluate_greedy(
            trainer,
            trainer.tokenizer,
            eval_rows,
            eval_scorer,
            max_new_tokens=cfg.data.max_response_length,
            prompt_key=cfg.data.prompt_key,
            agent=eval_agent,
        )

    run_start, wait_s = time.time(), 0.0
    try:
        version, start_step, trained, resumed, source.groups_discarded = _resume(
            cfg, trainer, rollouter, queue, cfg.async_training.generation_timeout
        )
        publisher.restore(version, start_step)
        result.resumed_from = None if resumed is None else str(resumed)
        run_start = time.time()
        if cfg.trainer.val_before_train:
            result.evals.append((start_step, 0.0, evaluate()))
        source.start()
        # The run's setup lives as long as the run: out of the collector's way. A full
        # collection of this process (torch and transformers imported) took 100-240 ms, and
        # it holds the local backend's router: every message of the run waited meanwhile.
        gc.freeze()
        steps, ahead = _Steps(trainer), False  # ahead: this step was sent during the last one
        for step in range(start_step + 1, total_steps + 1):
            batch = source.next_batch(version)
            wait_s += batch.wait_s
            publishing = step % trigger == 0
            next_version = version + 1 if publishing else version
            if step < total_steps:  # the next batch waits in the queue while this one trains
                source.prefetch(next_version)
            if not ahead:
                if publishing:
                    publisher.prepare(step)
                steps.send(batch.groups, version)
                if publishing:
                    publisher.sent(step)
            saving = save_freq >= 0 and (
                step == total_steps or (save_freq > 0 and step % save_freq == 0)
            )
            evaluating = bool(eval_rows) and test_freq > 0 and (step % test_freq == 0)
            # The next step goes to the trainer now, its batch still in the queue, when
            # nothing must see this step's weights before it: no checkpoint or evaluation,
            # and a publish (whose weights call the trainer runs first) rather than a check.
            ahead = (
                publishing
                and step < total_steps
                and steps.can_send_ahead
                and source.batch_by_ref
                and not (saving or evaluating)
            )
            if ahead:
                if (step + 1) % trigger == 0:
                    publisher.prepare(step + 1)
                steps.send(source.prefetched_ref(), next_version)
                if (step + 1) % trigger == 0:
                    publisher.sent(step + 1)
            metrics: dict[str, Any] = dict(steps.result())
            metrics.update(reward_metrics(batch.groups), **batch.metrics)
            metrics.update(conversation_metrics([s for g in batch.groups for s in g]))
            _record_batch(result, trained, batch, version)  # ages: at the version trained at
            if publishing:
                publisher.publish(version + 1, step=step, metrics=metrics)
                version += 1
                trainer.set_version(version)
                source.hand_off(version)
            else:
                publisher.check_weights(step, metrics, always=saving)
            if saving:
                extra = {
                    "step": step,
                    "data_position": trained.to_dict(),
                    "groups_discarded": source.groups_discarded,
                }
                checkpoint.save_step(trainer, cfg, step, extra)
            metrics.update(
                step=step,
                version=version,
                wall_s=time.time() - run_start,
                trainer_wait_s=batch.wait_s,
                queue_size=source.queue_size(),
                queue_capacity=cfg.async_training.max_queue_size,
            )
            if not result.history:  # the first line says where the trainer ran
                metrics.update(placement)
            if evaluating or (eval_rows and test_freq > 0 and step == total_steps):
                reward = evaluate()
                result.evals.append((step, time.time() - run_start, reward))
                metrics["eval_reward"] = reward
            result.history.append(metrics)
            _write_metrics(sinks, metrics, step)
            if on_step is not None:
                on_step(step, metrics)
        publisher.wait()  # a failed last sync fails the run
        source.finish()  # and so does a last version the queue did not take
    except Exception as exc:
        source.check(exc)  # a failure a dead rollouter caused is reported as that
        raise
    finally:
        publisher.close()
        eval_scorer.close()
        result.queue_stats, result.rollouter_stats = source.stop()
        if own_trainer:
            trainer.close()
        for sink in sinks:
            sink.close()
        if started_runtime:
            miniray.shutdown()
    result.summary = build_summary(
        mode=cfg.async_training.mode,
        history=result.history,
        evals=result.evals,
        ages=result.ages,
        wall_s=time.time() - run_start,
        wait_s=wait_s,
        blocking_ms=publisher.blocking_ms,
        sync_stats=publisher.statistics(),
        rollouter_stats=result.rollouter_stats,
        placement=placement,
        driver_peak_rss_gib=peak_rss_gib(),
    )
    return result


class _Steps:
    """The trainer's steps as the loop sends them. A ``TrainerGroup`` takes a step sent
    before the previous one has answered (``send_step``); another trainer (a benchmark's
    fake, a ``FullyAsyncTrainer`` in this process) trains when the result is asked for."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.can_send_ahead = callable(getattr(trainer, "send_step", None))
        self._groups: Any = None

    def send(self, groups: Any, version: int) -> None:
        if self.can_send_ahead:
            self.trainer.send_step(groups, version)
        else:
            self._groups = groups

    def result(self) -> dict[str, Any]:
        if self.can_send_ahead:
            return self.trainer.step_result()
        groups, self._groups = self._groups, None
        return self.trainer.train_step(groups)


def _record_batch(result: RunResult, trained: TrainedPositions, batch: Batch, version: int) -> None:
    """The batch's prompt positions (trained and dropped) and the ages of its groups."""
    positions = [g[0].metadata["prompt_position"] for g in batch.groups]
    gone = [g[0].metadata["prompt_position"] for g in batch.dropped]
    for position in positions + gone:  # a dropped prompt is consumed, never re-issued
        trained.add(position)
    result.trained_positions.append(positions)
    result.dropped_positions.append(gone)
    result.ages.extend(version - g[0].v_start for g in batch.groups)


def _open_sinks(cfg: Any, log_dir: str | pathlib.Path | None) -> list[MetricsLogger]:
    """``trainer.logger``'s sinks under ``log_dir`` (none without one)."""
    if log_dir is None:
        return []
    return build_loggers(
        cfg.trainer.logger,
        run_dir=log_dir,
        project=cfg.trainer.project_name,
        experiment=cfg.trainer.experiment_name,
        config=cfg.to_dict(),
    )


def _write_metrics(sinks: Sequence[MetricsLogger], metrics: dict[str, Any], step: int) -> None:
    """One step's metrics to every sink. ``train.metrics.MetricsWriter`` is not reused: its
    records are epochs (``phase``/``epoch``/``time``) in JSONL and TensorBoard only, where the
    RL sinks are steps in five backends (``rl.tracking``)."""
    for sink in sinks:
        sink.log(metrics, step)


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
    rollouter_result(rollouter.restore_data_position.remote(trained.to_dict(), discarded), timeout)
    weights = miniray.put(trainer.get_weights())
    rollouter_result(rollouter.load_weights.remote(weights, version), timeout)
    miniray.get(queue.update_param_version.remote(version), timeout=timeout)
    return version, step, trained, path, discarded


def reward_metrics(groups: Sequence[Sequence[Any]]) -> dict[str, float]:
    """The mean of each numeric field the reward function returned beside its score, as
    ``reward_extra/<field>`` (verl logs them the same way), over the samples trained on."""
    sums: dict[str, list[float]] = {}
    for group in groups:
        for sample in group:
            for key, value in sample.metadata.get(REWARD_METRICS_KEY, {}).items():
                sums.setdefault(key, []).append(value)
    return {f"reward_extra/{k}": sum(v) / len(v) for k, v in sums.items()}
