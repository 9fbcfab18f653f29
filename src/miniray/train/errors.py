"""What can go wrong while a trainer drives its workers, one class per thing a caller can do.

* ``WorkerContractError`` (a ``TypeError``): the worker class lacks a method the trainer needs,
  or ``create_worker`` returned something that is not an actor handle. Fix the code.
* ``WorkerDiedError`` (a ``RayActorError``): a worker's process died during a call. Restart
  from the last checkpoint (``resume_from``).
* ``WorkerTimeoutError`` (a ``GetTimeoutError``, hence a ``TimeoutError``): workers did not
  answer within ``timeout_s``. Raise the limit or find the hang.

An exception raised by the user's own code inside a worker keeps its type (``except
ValueError`` still works, as in Ray); the trainer only adds a note naming the worker, the
method and the epoch.

These live here rather than in ``miniray.errors`` because only the training layer raises them;
``miniray.errors`` is the runtime's and must not know about epochs.
"""

from __future__ import annotations

from miniray.errors import GetTimeoutError, RayActorError


class WorkerContractError(TypeError):
    """A worker does not implement what the trainer calls (the message names the method)."""


class WorkerDiedError(RayActorError):
    """A worker actor died while the trainer waited on it."""

    def __init__(self, message: str, *, worker_id: int, method: str, epoch: int | None):
        super().__init__(message)
        self.worker_id = worker_id
        self.method = method
        self.epoch = epoch


class WorkerTimeoutError(GetTimeoutError):
    """Workers did not answer a call within the trainer's ``timeout_s``."""

    def __init__(
        self, message: str, *, worker_ids: list[int], method: str, epoch: int | None
    ) -> None:
        super().__init__(message)
        self.worker_ids = worker_ids
        self.method = method
        self.epoch = epoch
