"""The distillation schedulers: in which order batches are generated, scored and trained.

Three stages per batch: the rollout workers *generate* it with the weights they hold, the
teacher *scores* it, the trainer *trains* on it (one optimizer step, trainer version + 1).
``trainer.scheduler`` chooses how far generation runs ahead of training (the pipeline depth
``d``)::

    iteration i (i = 0 .. N - 1 + d):
      if i < N:  sync weights if the trainer moved (rollout workers are idle here)
                 start generating batch i                       --> rollout workers (async)
      if d > 0 and i >= d:
                 wait teacher(i - d), train(i - d)              <-- overlaps generation of i
      if i < N:  wait generation(i)   (generation_timeout)
                 start scoring batch i                          --> teacher (async)
      if d == 0: wait teacher(i), train(i)

* ``serial`` (d = 0): generate, score, train, one after the other; staleness 0.
* ``one_step_off`` (d = 1): generating batch k + 1 overlaps training on batch k; a batch is
  trained at most 1 version after the weights that generated it.
* ``two_step_off`` (d = 2): batch k + 2 generates while batch k trains and the teacher scores
  batch k + 1; staleness at most 2, and the teacher gets a whole iteration to answer.

Staleness of a trained batch = trainer version when it is trained - version of the weights it
was generated with: a sample's age, ``rl.staleness.sample_age``, the one definition the async
queue uses too. The rollout workers only load weights while idle (after the previous generation
was awaited), so the version a batch was generated with is exact, and never newer than the
trainer's.

verl's ``one_step_off_scheduler`` wrote ``if i == 1 ... else`` where ``elif`` was meant: batch 0
was generated twice and trained twice, and batch 1 trained 2 versions stale. Every batch here is
generated once and trained once; ``tests/rl/distill/test_distill_scheduler.py`` checks it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from miniray.rl.endpoints import Pending
from miniray.rl.errors import GenerationTimeoutError, TeacherTimeoutError
from miniray.rl.staleness import sample_age

__all__ = [
    "SCHEDULERS",
    "DistillStages",
    "Event",
    "GenerationTimeoutError",
    "Pending",
    "SchedulerName",
    "StepRecord",
    "TeacherTimeoutError",
    "pipeline_depth",
    "run_schedule",
]

SchedulerName = Literal["serial", "one_step_off", "two_step_off"]
# scheduler -> pipeline depth = how many batches generation runs ahead = the staleness bound
SCHEDULERS: dict[str, int] = {"serial": 0, "one_step_off": 1, "two_step_off": 2}


class DistillStages(Protocol):
    """What a scheduler drives. ``sync_weights`` bounds its own waits (``nccl_timeout``).

    The ``start_*`` stages return work in flight: an ``endpoints.Pending``, or anything
    ``Pending.of`` takes (an ``ObjectRef``, a ``concurrent.futures.Future``).
    """

    def sync_weights(self, version: int) -> None:
        """Load the trainer's current weights (version ``version``) into the rollout workers."""
        ...

    def start_generation(self, batch_index: int) -> Any:
        """Start generating batch ``batch_index`` with the rollout workers' current weights."""
        ...

    def start_scoring(self, batch_index: int, generated: Any) -> Any:
        """Start the teacher on a generated batch."""
        ...

    def train(self, batch_index: int, generated: Any, scores: Any) -> dict[str, Any]:
        """One optimizer step on the batch; returns metrics."""
        ...


class Event(NamedTuple):
    """One thing the scheduler did, for tests and logs.

    ``gen``: generation of ``batch`` started with weights ``version``; ``sync``: weights
    ``version`` loaded into the rollout workers (``batch`` is None); ``train``: ``batch``
    trained while the trainer was at ``version`` (it becomes ``version + 1``).
    """

    kind: Literal["gen", "sync", "train"]
    batch: int | None
    version: int


@dataclass
class StepRecord:
    """One training step, yielded by ``run_schedule`` at the end of its iteration."""

    batch_index: int
    gen_version: int
    trainer_version: int  # before this step; the trainer is at trainer_version + 1 afterwards
    metrics: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def staleness(self) -> int:
        return sample_age(self.trainer_version, self.gen_version)


def pipeline_depth(scheduler: str) -> int:
    """The depth (= staleness bound) of a scheduler name; errors list the known names."""
    if scheduler not in SCHEDULERS:
        raise ValueError(
            f"trainer.scheduler={scheduler!r} is unknown: must be one of {list(SCHEDULERS)}"
        )
    return SCHEDULERS[scheduler]


def run_schedule(
    stages: DistillStages,
    *,
    num_batches: int,
    scheduler: str,
    generation_timeout: float,
    teacher_timeout: float,
    start_version: int = 0,
    on_event: Callable[[Event], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[StepRecord]:
    """Generate, score and train ``num_batches`` batches in ``scheduler``'s order.

    Yields one ``StepRecord`` per trained batch, in batch order. Every wait on a generation is
    bounded by ``generation_timeout`` and every wait on the teacher by ``teacher_timeout``;
    a late stage raises ``GenerationTimeoutError`` / ``TeacherTimeoutError`` naming the batch.
    Work that recovers from a failure bounds that itself and may wait beyond the timeout while
    it does (``dispatch.ChunkedGeneration``: a chunk's deadline, a worker's restart).
    """
    depth = pipeline_depth(scheduler)
    if num_batches < 0:
        raise ValueError(f"num_batches={num_batches} is invalid: must be >= 0")
    for name, value in (
        ("generation_timeout", generation_timeout),
        ("teacher_timeout", teacher_timeout),
    ):
        if not value > 0:
            raise ValueError(f"{name}={value!r} is invalid: must be > 0 seconds")
    emit = on_event or (lambda event: None)
    trainer_version = rollout_version = start_version
    generating: dict[int, tuple[Any, int]] = {}  # batch -> (generation, weights version)
    scoring: dict[int, tuple[Any, Any, int]] = {}  # batch -> (teacher, generated, version)

    for i in range(num_batches + depth):
        timing: dict[str, float] = {}
        trained: StepRecord | None = None
        if i < num_batches:
            if rollout_version < trainer_version:
                t = clock()
                stages.sync_weights(trainer_version)
                rollout_version = trainer_version
                timing["sync_rollout_weights"] = clock() - t
                emit(Event("sync", None, rollout_version))
            generating[i] = (stages.start_generation(i), rollout_version)
            emit(Event("gen", i, rollout_version))
        if depth > 0 and i >= depth:
            trained = _train(
                stages,
                scoring.pop(i - depth),
                i - depth,
                trainer_version,
                teacher_timeout,
                timing,
                clock,
                emit,
            )
            trainer_version += 1
        if i < num_batches:
            pending, version = generating.pop(i)
            t = clock()
            generated = _wait(
                pending,
                generation_timeout,
                GenerationTimeoutError,
                f"generation of batch {i}",
                "trainer.generation_timeout",
            )
            timing["wait_gen"] = clock() - t
            scoring[i] = (stages.start_scoring(i, generated), generated, version)
        if depth == 0 and i < num_batches:
            trained = _train(
                stages, scoring.pop(i), i, trainer_version, teacher_timeout, timing, clock, emit
            )
            trainer_version += 1
        if trained is not None:
            trained.timing.update(timing)
            yield trained
    assert not generating and not scoring, "every batch is generated and trained exactly once"


def _train(
    stages: DistillStages,
    entry: tuple[Any, Any, int],
    batch: int,
    trainer_version: int,
    teacher_timeout: float,
    timing: dict[str, float],
    clock: Callable[[], float],
    emit: Callable[[Event], None],
) -> StepRecord:
    pending, generated, gen_version = entry
    t = clock()
    scores = _wait(
        pending,
        teacher_timeout,
        TeacherTimeoutError,
        f"teacher scores of batch {batch}",
        "actor_rollout_ref.teacher.request_timeout",
    )
    timing["wait_teacher"] = clock() - t
    emit(Event("train", batch, trainer_version))
    t = clock()
    metrics = stages.train(batch, generated, scores)
    timing["train"] = clock() - t
    return StepRecord(batch, gen_version, trainer_version, dict(metrics))


def _wait(work: Any, timeout: float, error: type[TimeoutError], what: str, key: str) -> Any:
    """The stage's result; a ``TimeoutError`` the work raised itself is re-raised as is."""

    def late(_: str) -> TimeoutError:
        return error(f"{what} did not finish within {key}={timeout:g}s")

    return Pending.of(work, what).result(time.monotonic() + timeout, timeout_error=late)
