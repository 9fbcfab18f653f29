"""The training framework: write a worker and ``create_worker``; the loop is done for you.

    from miniray.train import DataParallelTrainer

    class MyTrainer(DataParallelTrainer):
        def create_worker(self, worker_id, **kwargs):
            return MyWorker.remote(worker_id)

    with MyTrainer(num_workers=4, sync_interval=1) as trainer:
        trainer.train(epochs=10, batch_size=128)

``BaseTrainer`` owns the runtime, the workers, the epoch loop and its hooks;
``DataParallelTrainer`` adds data shards and parameter-server syncs; checkpoints, distributed
evaluation, metrics files and the progress bar come with both. See docs/train.md.
"""

from miniray.train.data_parallel import DataParallelTrainer
from miniray.train.errors import WorkerContractError, WorkerDiedError, WorkerTimeoutError
from miniray.train.metrics import MetricsWriter, read_jsonl
from miniray.train.trainer import (
    TRAINER_OPTIONS,
    BaseTrainer,
    TrainerConfig,
    aggregate_results,
    weighted_results,
)

__all__ = [
    "TRAINER_OPTIONS",
    "BaseTrainer",
    "DataParallelTrainer",
    "MetricsWriter",
    "TrainerConfig",
    "WorkerContractError",
    "WorkerDiedError",
    "WorkerTimeoutError",
    "aggregate_results",
    "read_jsonl",
    "weighted_results",
]
