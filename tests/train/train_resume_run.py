"""A training run for test_train_resume.py, as its own process (so that it can be SIGKILLed).

python train_resume_run.py OUT.pt --epochs 5 --checkpoint-dir D [--resume] [--hang-at-epoch K --marker F]

Trains an MLP with momentum SGD on shuffled mini-batches (2 workers, momentum strategy, sync
every 2 epochs) on the local backend and writes every worker's and the server's final weights
to OUT.pt (``run`` does the same in the caller's process). With --hang-at-epoch, worker 0 writes F when epoch K starts and then sleeps: the
test kills this process then, after the checkpoint of epoch K has been written.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from train_workers import RegressionWorker

import miniray
from miniray.train import DataParallelTrainer


class ResumeTrainer(DataParallelTrainer):
    def create_worker(self, worker_id, **kwargs):
        faults = kwargs["faults"] if worker_id == 0 else {}
        return RegressionWorker.remote(
            worker_id, model="mlp", lr=0.05, momentum=0.9, batch_size=8, **faults
        )


def run(
    epochs: int,
    *,
    backend: str = "local",
    checkpoint_dir: str | None = None,
    resume: bool = False,
    hang_at_epoch: int | None = None,
    marker: str | None = None,
) -> dict:
    """Train; return every worker's and the server's final weights and the epoch losses."""
    trainer = ResumeTrainer(
        num_workers=2,
        sync_interval=2,
        sync_strategy="momentum",
        momentum=0.5,
        backend=backend,
        checkpoint_dir=checkpoint_dir,
        timeout_s=300,
        progress=False,
    )
    with trainer:
        if resume:
            trainer.resume_from(checkpoint_dir)
        faults = {"hang_at_epoch": hang_at_epoch, "hang_marker": marker}
        out = trainer.train(epochs=epochs, faults=faults)
        workers = miniray.get([w.get_weights.remote() for w in trainer.workers], timeout=60)
        server = miniray.get(trainer.param_server.pull_weights.remote(), timeout=60)
    losses = [h["loss"] for h in out["history"]]
    return {"workers": workers, "server": server, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hang-at-epoch", type=int, default=None)
    parser.add_argument("--marker", default=None)
    args = parser.parse_args()
    result = run(
        args.epochs,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        hang_at_epoch=args.hang_at_epoch,
        marker=args.marker,
    )
    torch.save(result, args.out)


if __name__ == "__main__":
    main()
