"""A custom loop on BaseTrainer: a learning-rate sweep, one model per worker, no parameter server.

Not every distributed job is data parallel. Here each worker trains its own digits classifier
with its own learning rate; the epoch is the seed's example 3 (call a custom method on every
worker, combine the answers), and the trainer keeps what BaseTrainer gives for free: the
runtime's lifecycle, the epoch loop and hooks, timeouts, errors that name the worker, the
progress bar and metrics files.

    python examples/train_custom_trainer.py                  # 4 learning rates, 8 epochs
    python examples/train_custom_trainer.py --backend inline --epochs 3
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from train_framework_demo import load_dataset, make_model

import miniray
from miniray.train import BaseTrainer

LEARNING_RATES = (1e-4, 1e-3, 1e-2, 1e-1)


@miniray.remote
class CustomWorker:
    """Trains one model on all the training digits with its own learning rate."""

    def __init__(self, worker_id, lr=1e-3):
        torch.set_num_threads(1)
        self.model = make_model(seed=0)  # same start for every lr: only the lr differs
        self.gen = torch.Generator().manual_seed(0)  # batch order, also the same for every lr
        self.lr = lr
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.x, self.y, self.x_val, self.y_val = load_dataset("digits")

    def custom_method(self, epoch):
        """One epoch of training; returns the validation accuracy."""
        for idx in torch.randperm(len(self.x), generator=self.gen).split(64):
            loss = nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        with torch.no_grad():
            return (self.model(self.x_val).argmax(1) == self.y_val).float().mean().item()


class CustomTrainer(BaseTrainer):
    """The seed's example 3, plus the best learning rate so far."""

    def create_worker(self, worker_id, **kwargs):
        return CustomWorker.remote(worker_id, lr=LEARNING_RATES[worker_id % len(LEARNING_RATES)])

    def train_epoch(self, epoch, **kwargs):
        # Fully custom: no get_weights/set_weights needed. call_workers would add a timeout
        # and name a failing worker; the seed's plain miniray.get works too.
        results = miniray.get([w.custom_method.remote(epoch) for w in self.workers], timeout=600)
        best = max(range(len(results)), key=results.__getitem__)
        return {
            "custom_metric": sum(results) / len(results),
            "best_accuracy": results[best],
            "best_lr": LEARNING_RATES[best % len(LEARNING_RATES)],
        }

    def on_epoch_end(self, epoch, result, **kwargs):
        print(
            f"epoch {epoch}: mean val accuracy {result['custom_metric']:.2%}, "
            f"best {result['best_accuracy']:.2%} at lr={result['best_lr']:g}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    with CustomTrainer(num_workers=len(LEARNING_RATES), backend=args.backend) as trainer:
        result = trainer.train(epochs=args.epochs)
    final = result["final"]
    print(f"best learning rate: {final['best_lr']:g} ({final['best_accuracy']:.2%} validation)")
    return final


if __name__ == "__main__":
    main()
