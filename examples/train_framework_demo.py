"""Classification with miniray.train: scikit-learn's handwritten digits, data-parallel.

The seed's ``ClassificationTrainer`` example, with a worker class that makes it real: each of
the N workers trains an MLP on 1/N of the training images, the parameter server averages the
replicas every ``sync_interval`` epochs, and ``evaluate()`` scores the final model on the held
out test images (each worker scores its share; the trainer weights them by sample count).

    python examples/train_framework_demo.py                      # 4 workers, 20 epochs
    python examples/train_framework_demo.py --workers 2 --epochs 10 --backend inline
    python examples/train_framework_demo.py --log-dir runs/digits --checkpoint-dir ckpt/digits
    python examples/train_framework_demo.py --checkpoint-dir ckpt/digits --resume

The digits data set (1797 8x8 images, 10 classes) ships inside scikit-learn, so this runs
offline; expect about 95-97 % test accuracy.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn as nn

import miniray
from miniray.train import DataParallelTrainer

DATASETS = ("digits",)


def load_dataset(name: str = "digits", seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: a fixed 80/20 split, standardized features."""
    if name != "digits":
        # The seed trains on CIFAR-10, which cannot be downloaded here; say so and go on.
        warnings.warn(
            f"dataset={name!r} is not available offline; using scikit-learn's digits instead "
            f"(known: {list(DATASETS)})",
            stacklevel=2,
        )
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(0), x[:split].std(0) + 1e-3  # training statistics only
    x = (x - mean) / std
    return x[:split], y[:split], x[split:], y[split:]


def make_model(hidden: int = 128, seed: int = 0) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    reset_parameters(model, seed)
    return model


def reset_parameters(model: nn.Module, seed: int) -> None:
    """PyTorch's default Linear init, drawn from a generator of our own.

    Not ``torch.manual_seed``: with ``--backend inline`` the workers are threads of one process
    sharing torch's global RNG, and one worker's seeding would interleave with another's init.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)


@miniray.remote
class ClassificationWorker:
    """One replica: an MLP, an optimizer and a shard of the digits."""

    def __init__(self, worker_id: int, lr: float = 0.01, hidden: int = 128, seed: int = 0):
        torch.set_num_threads(1)  # N workers share the cores; more threads only contend
        self.worker_id = worker_id
        self.model = make_model(hidden, seed=seed + worker_id)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.gen = torch.Generator().manual_seed(seed * 1000 + worker_id)  # batch shuffling
        self.batch_size = 32

    def load_data_shard(self, shard_id, num_shards, dataset="digits", batch_size=32, **kwargs):
        x_train, y_train, x_test, y_test = load_dataset(dataset)
        self.x, self.y = x_train[shard_id::num_shards], y_train[shard_id::num_shards]
        self.x_test, self.y_test = x_test[shard_id::num_shards], y_test[shard_id::num_shards]
        self.batch_size = batch_size
        return len(self.x)

    def train_epoch(self, epoch, part=0, num_parts=1):
        # DataParallelTrainer(syncs_per_epoch=k) calls parts 0..k-1 of one epoch, a sync after
        # each: the epoch's shuffled batches are drawn at part 0 and split into k runs.
        if part == 0:
            self.batches = torch.randperm(len(self.x), generator=self.gen).split(self.batch_size)
        per_part = -(-len(self.batches) // num_parts)
        batches = self.batches[part * per_part : (part + 1) * per_part]
        self.model.train()
        total_loss, correct = 0.0, 0
        for idx in batches:
            logits = self.model(self.x[idx])
            loss = nn.functional.cross_entropy(logits, self.y[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == self.y[idx]).sum())
        n = sum(len(idx) for idx in batches)
        return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "num_samples": n}

    def evaluate(self, split="test"):
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x, self.y)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(x)
        return {
            "loss": nn.functional.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item(),
            "num_samples": len(x),
        }

    def get_weights(self):
        return [p.detach().clone() for p in self.model.parameters()]

    def set_weights(self, weights):
        with torch.no_grad():
            for p, w in zip(self.model.parameters(), weights):
                p.copy_(w)

    def state_dict(self):
        # Everything a resumed run needs to continue exactly: weights, Adam moments, shuffling.
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": self.gen.get_state(),
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["rng"])


class ClassificationTrainer(DataParallelTrainer):
    """The seed's example 2 (``**options`` passes trainer options such as ``log_dir``)."""

    def __init__(self, num_workers=4, lr=0.01, sync_interval=3, **options):
        super().__init__(num_workers=num_workers, sync_interval=sync_interval, **options)
        self.lr = lr

    def create_worker(self, worker_id, **kwargs):
        return ClassificationWorker.remote(worker_id, lr=self.lr)

    def on_epoch_end(self, epoch, result, **kwargs):
        super().on_epoch_end(epoch, result, **kwargs)
        print(f"  Accuracy: {result['accuracy']:.2%}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--sync-interval", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default=None, help="miniray backend (default: local)")
    parser.add_argument("--log-dir", default=None, help="metrics.jsonl + TensorBoard here")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    options = {"backend": args.backend, "log_dir": args.log_dir}
    options["checkpoint_dir"] = args.checkpoint_dir
    if args.no_progress:
        options["progress"] = False
    start = time.perf_counter()
    with ClassificationTrainer(
        num_workers=args.workers, lr=args.lr, sync_interval=args.sync_interval, **options
    ) as trainer:
        if args.resume:
            print(f"resuming after epoch {trainer.resume_from(args.checkpoint_dir)}")
        trainer.train(epochs=args.epochs, dataset="digits", batch_size=args.batch_size)
        test = trainer.evaluate(split="test")
        stats = trainer.get_sync_stats()
    print(
        f"test accuracy {test['accuracy']:.2%} on {test['num_samples']} images "
        f"({args.workers} workers, {stats['num_syncs']} syncs, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return test


if __name__ == "__main__":
    main()
