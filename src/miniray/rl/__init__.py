"""Fully asynchronous RL post-training: generation and training run at the same time.

The foundations live here: the config tree (``config``), samples with version stamps
(``types``), the staleness rules (``staleness``), the staleness-aware queue (``queue``), the
versioned weight synchronizer (``param_sync``), the errors (``errors``) and the loss functions (``losses``, imported on
demand because it needs torch). Every name the seeds show is importable from this package.
"""

from miniray.rl.config import (
    AsyncTrainingConfig,
    RLConfig,
    async_training_config,
    load_rl_config,
)
from miniray.rl.errors import (
    ParameterSyncError,
    ParameterSyncTimeoutError,
    ProducerCrashedError,
    QueueTimeoutError,
)
from miniray.rl.param_sync import (
    AsyncParameterSynchronizer,
    ParameterSynchronizer,
    ParameterSyncManager,
    RolloutEndpoint,
    SyncResult,
    TrainerEndpoint,
    UnifiedParameterSynchronizer,
)
from miniray.rl.queue import (
    MessageQueue,
    MessageQueueClient,
    PutResult,
    QueueFinished,
)
from miniray.rl.types import Batch, Sample, collate

__all__ = [
    "AsyncParameterSynchronizer",
    "AsyncTrainingConfig",
    "Batch",
    "MessageQueue",
    "MessageQueueClient",
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
    "TrainerEndpoint",
    "UnifiedParameterSynchronizer",
    "async_training_config",
    "collate",
    "load_rl_config",
]
