"""What can go wrong in RL post-training, one class per thing a caller can do about it.

* ``ProducerCrashedError``: the rollouter closed the queue with an error, or its process died
  (the loop learns of that at once, not at a timeout). Read ``producer_error``, fix the
  cause, resume from the last checkpoint.
* ``NonFiniteWeightsError``: a training step left NaN or inf in the weights; they were neither
  published to the rollouter nor checkpointed. ``step`` and ``parameter`` say where.
* ``QueueTimeoutError`` (a ``TimeoutError``): a blocking queue call ran out of time; the message
  says what it waited for.
* ``ParameterSyncError``: a weight sync failed after its retries; the rollouter keeps the old
  version and ``result`` holds the phases and the error. ``ParameterSyncTimeoutError`` (also a
  ``TimeoutError``): it ran past ``async_training.sync_timeout``; the rollouter was resumed.
* ``RolloutWeightSyncError`` (a ``ParameterSyncError``): distillation's trainer -> rollout
  workers sync failed; ``failures`` maps each worker to why. ``RolloutWeightSyncTimeoutError``:
  a side did not answer within ``actor_rollout_ref.nccl_timeout``.
* ``TeacherError``: the teacher did not score some sequences (``code`` says why);
  ``TeacherTimeoutError`` (a ``GetTimeoutError``, hence a ``TimeoutError``): no answer in time.
* ``TrainerRankError``: a rank of the RL trainer group died, failed or did not finish within
  ``actor_rollout_ref.nccl_timeout`` of the others; ``rank`` and ``pid`` name it. The group is
  closed (every rank killed); resume from the last checkpoint.
* ``CallTimeoutError`` (a ``GetTimeoutError``, hence a ``TimeoutError``): a call on a trainer,
  rollouter or queue (``rl.endpoints``) did not answer by the caller's deadline; ``what`` names
  it. Retrying may help; what the call raised itself arrives as that error instead.
* ``GenerationTimeoutError`` (a ``TimeoutError``): a distillation batch was not generated
  within ``trainer.generation_timeout``.

These live here rather than in ``miniray.errors`` for the reason ``miniray.train.errors`` gives:
only the RL layer raises them, and the runtime's module must not know about weight versions.
Every class survives pickling with its fields, since they cross actor boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from miniray.errors import GetTimeoutError
from miniray.rl.types import SyncResult, TeacherScores

__all__ = [
    "CallTimeoutError",
    "GenerationTimeoutError",
    "NonFiniteWeightsError",
    "ParameterSyncError",
    "ParameterSyncTimeoutError",
    "ProducerCrashedError",
    "QueueTimeoutError",
    "RolloutWeightSyncError",
    "RolloutWeightSyncTimeoutError",
    "TeacherError",
    "TeacherTimeoutError",
    "TrainerRankError",
]


class ProducerCrashedError(RuntimeError):
    """The producer closed the queue with an error; the error text is in the message."""

    def __init__(self, message: str, producer_error: str = ""):
        super().__init__(message)
        self.producer_error = producer_error

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.producer_error))


class TrainerRankError(RuntimeError):
    """A rank of the trainer group died, failed or hung; ``rank`` and ``pid`` name it (-1 and
    None for a group already closed)."""

    def __init__(self, rank: int, pid: int | None, message: str):
        super().__init__(message)
        self.rank = rank
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.rank, self.pid, str(self)))


class NonFiniteWeightsError(RuntimeError):
    """The trainer's weights hold NaN or inf after ``step``; ``parameter`` is the first such
    one. Raised before they reach the rollouter, whose sampling they would crash."""

    def __init__(self, message: str, *, step: int = -1, parameter: str = ""):
        super().__init__(message)
        self.step = step
        self.parameter = parameter

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {"step": self.step, "parameter": self.parameter}
        return (_rebuild, (type(self), self.args[0], fields))


class QueueTimeoutError(TimeoutError):
    """A blocking queue call ran out of time; the message says what it waited for."""


class ParameterSyncError(RuntimeError):
    """A weight sync failed after its retries; ``result`` holds the details."""

    def __init__(self, message: str, result: SyncResult | None = None):
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.result))


class ParameterSyncTimeoutError(ParameterSyncError, TimeoutError):
    """A weight sync ran past ``sync_timeout``; the rollouter was resumed regardless."""


class RolloutWeightSyncError(ParameterSyncError):
    """A rollout weight sync failed; ``failures`` maps each failed worker to why."""

    def __init__(
        self,
        message: str,
        *,
        failures: Mapping[str, str] | None = None,
        elapsed_s: float = 0.0,
        version: int = -1,
    ):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.elapsed_s = elapsed_s
        self.version = version

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {"failures": self.failures, "elapsed_s": self.elapsed_s, "version": self.version}
        return (_rebuild, (type(self), self.args[0], fields))


class RolloutWeightSyncTimeoutError(RolloutWeightSyncError, TimeoutError):
    """A side of the sync did not answer within ``actor_rollout_ref.nccl_timeout``."""


def _rebuild(cls: type, message: str, fields: dict[str, Any]) -> Any:
    """Unpickle an error whose fields are keyword-only arguments."""
    return cls(message, **fields)


class TeacherError(Exception):
    """The teacher did not score some sequences: it answered with an error, or failed.

    ``code`` is the server's error code (``bad_request``, ``unauthorized``, ``too_large``,
    ``busy``, ``internal``, ``worker_died``) or a client-side one (``timeout``,
    ``disconnected``, ``start_failed``). ``scores`` holds what did arrive, when any did.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        address: str = "",
        missing_microbatches: Sequence[int] = (),
        elapsed_s: float = 0.0,
        scores: TeacherScores | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.address = address
        self.missing_microbatches = list(missing_microbatches)
        self.elapsed_s = elapsed_s
        self.scores = scores

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {
            "code": self.code,
            "address": self.address,
            "missing_microbatches": self.missing_microbatches,
            "elapsed_s": self.elapsed_s,
            "scores": self.scores,
        }
        return (_rebuild, (type(self), self.args[0], fields))


class TeacherTimeoutError(TeacherError, GetTimeoutError):
    """No answer before the deadline (also a builtin ``TimeoutError``)."""

    def __init__(self, message: str, **kwargs: Any):
        kwargs.setdefault("code", "timeout")
        super().__init__(message, **kwargs)


class GenerationTimeoutError(TimeoutError):
    """A batch's generation did not finish within ``trainer.generation_timeout``."""


class CallTimeoutError(GetTimeoutError):
    """A call on an endpoint did not answer by the caller's deadline; ``what`` names it."""

    def __init__(self, message: str, *, what: str = ""):
        super().__init__(message)
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args[0], {"what": self.what}))
