"""The driver of a distillation run: rollout workers, teacher, trainer, in a scheduler's order.

    driver (trainer: student + AdamW)         rollout workers (a ReplicaPool)  teacher server
    scheduler iteration i:
      sync_rollout_weights(v)  ----------->   load_weights(v)   (nccl_timeout per side)
      start_generation(i)      ----------->   generate(prompts of batch i)
      train(i - d)  <-- overlaps generation
      wait generation(i)  (generation_timeout)
      start_scoring(i)         ---------------------------------------------> score (request_timeout)
      ...train(i) waits for its scores

A batch is on-policy (the student's generations) with probability ``distill.lmbda``, decided
per batch index; otherwise it is the dataset's prompts with their ground-truth answers, which
need no generation. The rollout workers are a ``replica_pool.ReplicaPool`` (started, fanned out
to, restarted and counted as the RL rollouter's replicas are); a batch's prompts go to them in
chunks, by pull (``dispatch.ChunkedGeneration``): a worker that dies or hangs in a generation
gives its chunk back to the others and is restarted with the current weights up to
``rollout.max_restarts`` times; the batch fails, naming the workers, only when none is left.
``DistillResult.rollout_stats`` has the pool's per-worker statistics. Every wait is bounded; a
silent teacher or a failed weight sync ends the run with an error that names it, and the
``finally`` stops every process this run started.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import miniray
from miniray.config import from_dict
from miniray.rl.data_position import PromptOrder
from miniray.rl.distill.config import DistillConfig
from miniray.rl.distill.dispatch import ChunkedGeneration, GeneratedBatch
from miniray.rl.distill.losses import is_on_policy
from miniray.rl.distill.rollout_worker import RolloutWorker
from miniray.rl.distill.scheduler import StepRecord, run_schedule
from miniray.rl.distill.trainer import DistillBatch, DistillTrainer, Teacher
from miniray.rl.distill.weight_sync import sync_rollout_weights
from miniray.rl.endpoints import Pending
from miniray.rl.placement import ReplicaPlacement, cuda_device_count, replica_placement
from miniray.rl.prompts import prompt_token_ids, read_training_prompts
from miniray.rl.replica_pool import ReplicaPool
from miniray.rl.tasks import exact_match_reward, load_prompts

__all__ = ["DistillResult", "DistillRun", "run_distillation"]

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    # Per rollout worker (``ReplicaPool.statistics``), with its name: prompts generated
    # ("groups"), tokens, seconds in its calls and tokens_per_s (each chunk's call timed by its
    # lane), node, loaded_version, missed_syncs, failures (died or hung in a generation) and
    # last_failure (why, or None).
    rollout_stats: list[dict[str, Any]] = field(default_factory=list)


class _Generation:
    """One batch in generation (``dispatch.ChunkedGeneration``); ``result`` builds the batch."""

    def __init__(self, work: ChunkedGeneration, build: Callable[[GeneratedBatch], DistillBatch]):
        self.work, self.build = work, build

    def result(self, timeout: float | None = None) -> DistillBatch:
        return self.build(self.work.result(timeout))

    def done(self) -> bool:
        return self.work.done()


class DistillRun:
    """The stages the scheduler drives (``scheduler.DistillStages``) over real components."""

    def __init__(
        self,
        cfg: DistillConfig,
        *,
        trainer: DistillTrainer,
        tokenizer: Any,
        teacher: Teacher,
        workers: ReplicaPool,
        rows: Sequence[dict],
    ):
        self.cfg, self.trainer, self.tokenizer = cfg, trainer, tokenizer
        self.teacher, self.workers, self.rows = teacher, workers, list(rows)
        self.order = PromptOrder(len(self.rows), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        topk = cfg.actor_rollout_ref.teacher.topk
        self.topk = trainer.vocab_size if topk == 0 else min(topk, trainer.vocab_size)
        self.rollout_version = 0
        self.worker_faults: dict[str, str] = {}  # rollout worker -> its last failure
        self._generations: list[ChunkedGeneration] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- data --------------------------------------------------------------------------------
    def batch_rows(self, batch_index: int) -> list[dict]:
        size = self.cfg.data.train_batch_size
        return [self.rows[self.order.row(batch_index * size + j)] for j in range(size)]

    def prompt_ids(self, row: dict) -> list[int]:
        """The row's prompt tokens: as ``_load_rows`` fitted them to data.max_prompt_length
        (training rows), or as ``prompts.prompt_token_ids`` makes them (held-out rows)."""
        if PROMPT_IDS in row:
            return list(row[PROMPT_IDS])
        return prompt_token_ids(self.tokenizer, [row[self.cfg.data.prompt_key]])[0]

    def answer_of(self, row: dict) -> str:
        key = self.cfg.data.answer_key
        return str(row[key] if key in row else row["ground_truth"])

    # -- the stages ----------------------------------------------------------------------------
    def sync_weights(self, version: int) -> None:
        sync_rollout_weights(
            self.trainer,
            self.workers,
            version=version,
            timeout=self.cfg.actor_rollout_ref.nccl_timeout,
        )
        self.rollout_version = version

    def start_generation(self, batch_index: int) -> Any:
        rows = self.batch_rows(batch_index)
        prompts = [self.prompt_ids(r) for r in rows]
        answers = [self.answer_of(r) for r in rows]
        d = self.cfg.distill
        if not is_on_policy(d.lmbda, seed=d.seed, batch_index=batch_index):
            return Pending.completed(self._ground_truth(batch_index, prompts, answers))
        work = ChunkedGeneration(
            self.workers,
            prompts,
            batch_index=batch_index,
            seed=self.cfg.trainer.seed,
            timeout=self.cfg.trainer.generation_timeout,
            generate_kwargs={
                "max_new_tokens": self.cfg.data.max_response_length,
                "temperature": self.cfg.actor_rollout_ref.rollout.temperature,
            },
            causes=self.worker_faults,
        )
        self._generations = [g for g in self._generations if not g.done()] + [work]

        def build(generated: GeneratedBatch) -> DistillBatch:
            versions = set(generated.versions)
            # Workers load weights only while idle, all to the same version, and a restarted
            # one loads the current version before it generates: one version.
            assert len(versions) == 1, f"batch {batch_index} mixes weight versions {versions}"
            gens = generated.generations
            return DistillBatch(
                batch_index=batch_index,
                sequences=[g.prompt_token_ids + g.response_token_ids for g in gens],
                prompt_lengths=[len(g.prompt_token_ids) for g in gens],
                answers=answers,
                on_policy=True,
                version=versions.pop(),
            )

        return _Generation(work, build)

    def start_scoring(self, batch_index: int, generated: DistillBatch) -> Any:
        submit = getattr(self.teacher, "submit", None)
        kwargs: dict[str, Any] = {
            "topk": self.topk,
            "temperature": 1.0,
        }  # the loss applies its temperature
        if callable(submit):
            return submit(generated.sequences, **kwargs)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "distill-teacher")
        return self._executor.submit(self.teacher.score, generated.sequences, **kwargs)

    def train(self, batch_index: int, generated: DistillBatch, scores: Any) -> dict[str, Any]:
        return self.trainer.train_step(generated, scores)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, rows: Sequence[dict]) -> dict[str, float]:
        """Greedy accuracy of the current student on ``rows`` and its reverse KL to the
        teacher per response token (on the student's own greedy responses)."""
        from miniray.rl.engines import HFGenerationEngine

        tok = self.tokenizer
        engine = HFGenerationEngine(
            self.trainer.model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        prompts = [self.prompt_ids(r) for r in rows]
        gens = engine.generate(
            prompts, max_new_tokens=self.cfg.data.max_response_length, temperature=0
        )
        self.trainer.model.train()
        answers = [self.answer_of(r) for r in rows]
        correct = [
            exact_match_reward(tok.decode(g.response_token_ids, skip_special_tokens=True), a)
            for g, a in zip(gens, answers)
        ]
        batch = DistillBatch(
            batch_index=-1,
            sequences=[g.prompt_token_ids + g.response_token_ids for g in gens],
            prompt_lengths=[len(g.prompt_token_ids) for g in gens],
            answers=answers,
            on_policy=True,
            version=self.trainer.version,
        )
        scores = self.teacher.score(
            batch.sequences,
            topk=self.topk,
            temperature=1.0,
            timeout=self.cfg.actor_rollout_ref.teacher.request_timeout,
        )
        return {
            "accuracy": sum(correct) / max(1, len(correct)),
            "reverse_kl": self.trainer.divergence(batch, scores, loss="reverse_kl"),
        }

    def _ground_truth(
        self, batch_index: int, prompts: list[list[int]], answers: list[str]
    ) -> DistillBatch:
        eos = self.tokenizer.eos_token_id
        limit = self.cfg.data.max_response_length
        responses = [([*self.tokenizer(a)["input_ids"], eos])[:limit] for a in answers]
        return DistillBatch(
            batch_index=batch_index,
            sequences=[p + r for p, r in zip(prompts, responses)],
            prompt_lengths=[len(p) for p in prompts],
            answers=answers,
            on_policy=False,
            version=self.rollout_version,
        )

    def close(self) -> None:
        """Stop the generations in flight (before the caller kills the workers: a lane must not
        restart a worker after that) and the teacher's thread."""
        for work in self._generations:
            work.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def run_distillation(
    config: Any,
    *,
    teacher: Teacher | None = None,
    eval_rows: Sequence[dict] | None = None,
    log_dir: str | pathlib.Path | None = None,
    on_step: Callable[[StepRecord, dict[str, Any]], None] | None = None,
) -> DistillResult:
    """Distill for ``trainer.total_epochs`` (or ``total_training_steps``) and summarise.

    ``teacher`` replaces the one the config names (e.g. a ``LocalTeacher``); ``eval_rows``
    default to ``data.val_files``. Starts (and stops) the runtime when none is running.
    """
    cfg = config if isinstance(config, DistillConfig) else from_dict(DistillConfig, config)
    from miniray.rl.models.tiny import load

    model, tokenizer = load(cfg.actor_rollout_ref.model.path)
    rows = _load_rows(cfg, tokenizer)
    if eval_rows is None:
        eval_rows = [r for path in cfg.data.val_files for r in _read_prompts(cfg, path)]
    num_batches = cfg.trainer.total_epochs * len(rows) // cfg.data.train_batch_size
    if cfg.trainer.total_training_steps is not None:
        num_batches = min(num_batches, cfg.trainer.total_training_steps)
    if num_batches < 1:
        raise ValueError(
            f"data.train_batch_size={cfg.data.train_batch_size} is invalid: larger than the "
            f"{len(rows)} usable prompts in data.train_files times trainer.total_epochs="
            f"{cfg.trainer.total_epochs}; no batch to train on"
        )
    trainer = _make_trainer(cfg, model, tokenizer)
    started_runtime = not miniray.is_initialized()
    if started_runtime:
        miniray.init(num_workers=1)
    workers: ReplicaPool | None = None
    server = None
    owned_teacher = None
    log_file = None
    run = None
    result = DistillResult(summary={})
    start = time.time()
    try:
        if teacher is None:
            teacher, server = _connect_teacher(cfg)
            owned_teacher = teacher
        _check_vocab(teacher, trainer.vocab_size, cfg.actor_rollout_ref.teacher.request_timeout)
        workers = _start_workers(cfg)
        run = DistillRun(
            cfg, trainer=trainer, tokenizer=tokenizer, teacher=teacher, workers=workers, rows=rows
        )
        if log_dir is not None:
            log_dir = pathlib.Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            log_file = (log_dir / "metrics.jsonl").open("w")
        if eval_rows:
            result.evals.append({"step": 0, "wall_s": 0.0, **run.evaluate(eval_rows)})
        test_freq = cfg.trainer.test_freq
        schedule = run_schedule(
            run,
            num_batches=num_batches,
            scheduler=cfg.trainer.scheduler,
            generation_timeout=cfg.trainer.generation_timeout,
            teacher_timeout=cfg.actor_rollout_ref.teacher.request_timeout
            * (cfg.actor_rollout_ref.teacher.max_retries + 1)
            + 5.0,  # the client's own bound, plus decoding: its error is the informative one
        )
        loop_start = time.time()
        for record in schedule:
            step = len(result.history) + 1
            metrics = {
                "step": step,
                "batch": record.batch_index,
                "gen_version": record.gen_version,
                "trainer_version": record.trainer_version,
                "staleness": record.staleness,
                "wall_s": round(time.time() - loop_start, 3),
                **record.metrics,
                **{f"timing/{k}": round(v, 4) for k, v in record.timing.items()},
            }
            if eval_rows and (step == num_batches or (test_freq and step % test_freq == 0)):
                ev = run.evaluate(eval_rows)
                result.evals.append({"step": step, "wall_s": metrics["wall_s"], **ev})
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
            result.history.append(metrics)
            if log_file is not None:
                log_file.write(json.dumps(metrics) + "\n")
                log_file.flush()
            if on_step is not None:
                on_step(record, metrics)
        loop_s = time.time() - loop_start
    finally:
        if run is not None:
            run.close()
        if workers is not None:
            result.rollout_stats = [
                {"name": name, "last_failure": run.worker_faults.get(name) if run else None, **s}
                for name, s in zip(workers.names, workers.statistics(time.time() - start))
            ]
            workers.shutdown()
        if owned_teacher is not None and hasattr(owned_teacher, "close"):
            owned_teacher.close()
        if server is not None:
            server.stop()
        if log_file is not None:
            log_file.close()
        if started_runtime:
            miniray.shutdown()
    result.summary = _summary(cfg, result, num_batches, loop_s, time.time() - start)
    return result


def _summary(
    cfg: DistillConfig, result: DistillResult, num_batches: int, loop_s: float, wall: float
) -> dict[str, Any]:
    h = result.history
    ages = [m["staleness"] for m in h]
    summary: dict[str, Any] = {
        "run": f"{cfg.trainer.project_name}/{cfg.trainer.experiment_name}",
        "steps": len(h),
        "scheduler": cfg.trainer.scheduler,
        "loss": cfg.distill.loss,
        "train_loop_s": round(loop_s, 2),
        "wall_s": round(wall, 2),
        "first_loss": round(h[0]["loss"], 4) if h else None,
        "last_loss": round(h[-1]["loss"], 4) if h else None,
        "mean_staleness": round(statistics.mean(ages), 3) if ages else 0.0,
        "max_staleness": max(ages) if ages else 0,
        "on_policy_batches": int(sum(m["on_policy"] for m in h)),
        "rollout_workers": cfg.num_rollout_workers,
        # died or hung in a generation (each then restarted while rollout.max_restarts allows)
        "rollout_worker_failures": sum(w["failures"] for w in result.rollout_stats),
    }
    for key in ("wait_gen", "wait_teacher", "train", "sync_rollout_weights"):
        values = [m[f"timing/{key}"] for m in h if f"timing/{key}" in m]
        if values:
            summary[f"{key}_s_mean"] = round(statistics.mean(values), 4)
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        summary.update(
            initial_accuracy=first["accuracy"],
            final_accuracy=last["accuracy"],
            initial_reverse_kl=round(first["reverse_kl"], 4),
            final_reverse_kl=round(last["reverse_kl"], 4),
        )
    assert len(h) == num_batches or not h
    return summary


def _read_prompts(cfg: DistillConfig, path: str) -> list[dict]:
    """Rows of one data file, the prompt and the answer read from the columns the config
    names (``data.prompt_key``, ``data.answer_key``)."""
    return load_prompts(path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)


# Where a training row keeps its prompt's token ids, fitted to data.max_prompt_length.
PROMPT_IDS = "_prompt_token_ids"


def _load_rows(cfg: DistillConfig, tokenizer: Any) -> list[dict]:
    """The training rows, each with its prompt tokens (``prompts.prompt_token_ids``: BOS +
    text, or chat messages through the tokenizer's template) fitted to
    ``data.max_prompt_length`` as ``data.filter_overlong_prompts`` / ``data.truncation`` say
    (``prompts.read_training_prompts``, as the RL rollouter reads them)."""
    prompts = read_training_prompts(cfg.data, tokenizer)
    return [{**row, PROMPT_IDS: ids} for row, ids in zip(prompts.rows, prompts.token_ids)]


def _make_trainer(cfg: DistillConfig, model: Any, tokenizer: Any) -> DistillTrainer:
    import torch

    device = "cpu"
    if cfg.trainer.n_gpus_per_node > 0:
        if _trains_on_cuda(cfg):
            device = "cuda"
        else:
            logger.warning(
                "trainer.n_gpus_per_node=%d but CUDA is not available: training on the CPU",
                cfg.trainer.n_gpus_per_node,
            )
    actor = cfg.actor_rollout_ref.actor
    torch.manual_seed(cfg.trainer.seed)
    return DistillTrainer(
        model,
        pad_token_id=tokenizer.pad_token_id,
        loss=cfg.distill.loss,
        beta=cfg.distill.beta,
        temperature=cfg.distill.temperature,
        lr=actor.optim.lr,
        weight_decay=actor.optim.weight_decay,
        grad_clip=actor.optim.grad_clip,
        micro_batch_size=actor.micro_batch_size,
        device=device,
    )


def _trains_on_cuda(cfg: DistillConfig) -> bool:
    """The student trains on cuda:0 when ``trainer.n_gpus_per_node`` asks and CUDA is here."""
    return cfg.trainer.n_gpus_per_node > 0 and cuda_device_count() > 0


def _worker_placement(cfg: DistillConfig) -> ReplicaPlacement:
    """The rollout workers' devices (``placement.replica_placement``): GPUs after the
    student's one where ``rollout.n_gpus_per_node`` asks for them and CUDA is here."""
    return replica_placement(
        cfg.rollout,
        cuda_devices=cuda_device_count(),
        trainer_gpus=1 if _trains_on_cuda(cfg) else 0,
        single_node=cfg.rollout.nnodes == 1,
    )


def _start_workers(cfg: DistillConfig) -> ReplicaPool:
    """The rollout workers, started together; each must answer ``node()`` within
    ``trainer.generation_timeout`` (else all are killed and the error names it). One that dies
    or hangs in a generation is restarted, with the current weights, up to
    ``rollout.max_restarts`` times; a load is bounded by ``actor_rollout_ref.nccl_timeout``."""
    actor = miniray.remote(RolloutWorker)
    path = cfg.actor_rollout_ref.model.path
    engine = cfg.actor_rollout_ref.rollout.name
    names = [f"rollout_worker_{i}" for i in range(cfg.num_rollout_workers)]
    placement = _worker_placement(cfg)
    if placement.note:
        logger.warning("%s", placement.note)

    def start_one(i: int) -> Any:
        return actor.options(num_gpus=placement.num_gpus).remote(
            path,
            seed=cfg.trainer.seed + i,
            name=names[i],
            engine=engine,
            device=placement.device(i),
        )

    return ReplicaPool.start(
        cfg.num_rollout_workers,
        start_one,
        require_all=True,
        ready="node",
        max_restarts=cfg.rollout.max_restarts,
        start_timeout=cfg.trainer.generation_timeout,
        load_timeout=cfg.actor_rollout_ref.nccl_timeout,
        names=names,
    )


def _connect_teacher(cfg: DistillConfig) -> tuple[Any, Any]:
    from miniray.rl.distill.teacher_client import TeacherClient

    t = cfg.actor_rollout_ref.teacher
    server = None
    port = t.server_port
    if t.launch:
        from miniray.rl.distill.teacher_server import start_teacher_server

        assert t.model_path is not None  # TeacherConfig.validate
        server = start_teacher_server(
            t.model_path,
            port=port,
            host=t.server_ip,
            n_server_workers=t.n_server_workers,
            token=t.token,
            ready_timeout=t.ready_timeout,
            num_threads=t.num_threads,
        )
        port = server.port
    try:
        client = TeacherClient(
            server_ip=t.server_ip,
            server_port=port,
            token=t.token,
            num_microbatches=t.num_microbatches,
            request_timeout=t.request_timeout,
            max_retries=t.max_retries,
        )
    except Exception:
        if server is not None:
            server.stop()
        raise
    return client, server


def _check_vocab(teacher: Any, vocab_size: int, timeout: float) -> None:
    """Student and teacher must share the token ids (tinker-cookbook #796: a mismatched
    tokenizer or chat format silently scores nonsense)."""
    info = getattr(teacher, "server_info", None)
    if not callable(info):
        return
    teacher_vocab = info(timeout=timeout).get("vocab_size")
    if teacher_vocab is not None and int(teacher_vocab) != vocab_size:
        raise ValueError(
            f"the teacher's vocabulary has {teacher_vocab} tokens and the student's "
            f"(actor_rollout_ref.model.path) {vocab_size}: they must share a tokenizer"
        )
