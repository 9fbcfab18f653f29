"""Fully asynchronous RL post-training: generation and training run at the same time.

The foundations live here: the config tree (``config``), samples with version stamps
(``types``), the staleness rules (``staleness``), the staleness-aware queue (``queue``), the
versioned weight synchronizer (``param_sync``), the errors (``errors``) and the loss functions (``losses``, imported on
demand because it needs torch). Every name the seeds show is importable from this package;
those whose modules need torch (``FullyAsyncRollouter``, ``FullyAsyncTrainer``, ``TeacherClient``)
are imported on first use, so ``import miniray.rl`` stays torch-free for the queue and the
synchronizer.
"""

import importlib
from typing import Any

from miniray.rl.compat import (
    AsyncParameterSynchronizer,
    ParameterSynchronizer,
    ParameterSyncManager,
)
from miniray.rl.config import AsyncTrainingConfig, RLConfig
from miniray.rl.config_loading import async_training_config, load_rl_config
from miniray.rl.errors import (
    NonFiniteWeightsError,
    ParameterSyncError,
    ParameterSyncTimeoutError,
    ProducerCrashedError,
    QueueTimeoutError,
)
from miniray.rl.param_sync import RolloutEndpoint, TrainerEndpoint, UnifiedParameterSynchronizer
from miniray.rl.queue import (
    MessageQueue,
    MessageQueueClient,
    PutResult,
    QueueFinished,
)
from miniray.rl.types import Batch, Sample, SyncResult, collate

# name -> the module that defines it, imported on first access (these modules import torch).
_LAZY = {
    "FullyAsyncRollouter": "miniray.rl.rollouter",
    "FullyAsyncTrainer": "miniray.rl.trainer",
    "TeacherClient": "miniray.rl.distill.teacher_client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'miniray.rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AsyncParameterSynchronizer",
    "AsyncTrainingConfig",
    "Batch",
    "FullyAsyncRollouter",
    "FullyAsyncTrainer",
    "MessageQueue",
    "MessageQueueClient",
    "NonFiniteWeightsError",
    "ParameterSyncError",
    "ParameterSyncManager",
    "ParameterSyncTimeoutError",
    "ParameterSynchronizer",
    "ProducerCrashedError",
    "PutResult",
    "QueueFinished",
    "QueueTimeoutError",
    "RLConfig",
    "RolloutEndpoint",
    "Sample",
    "SyncResult",
    "TeacherClient",
    "TrainerEndpoint",
    "UnifiedParameterSynchronizer",
    "async_training_config",
    "collate",
    "load_rl_config",
]
