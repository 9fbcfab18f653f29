"""Worker actors and data for the training-framework tests (module level: children import them).

``RegressionWorker`` trains a linear model or a small MLP on its shard of one deterministic
regression data set with SGD; ``reference_run`` is the same training in one process on all the
data, which the equivalence tests compare against. Fault switches (raise, hang, die at an
epoch) exercise the trainer's error reporting.
"""

from __future__ import annotations

import os
import threading
import time

import torch
import torch.nn as nn

import miniray

NUM_SAMPLES = 48
NUM_FEATURES = 5


def make_data(num_samples: int = NUM_SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, NUM_FEATURES, generator=gen, dtype=torch.float64)
    true_w = torch.randn(NUM_FEATURES, 1, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ true_w) + 0.1 * torch.randn(
        num_samples, 1, generator=gen, dtype=torch.float64
    )
    return x, y


# On the inline backend workers are threads of one process sharing torch's global RNG: without
# the lock, two workers seeding and initializing at once interleave and get each other's numbers.
_INIT_LOCK = threading.Lock()


def make_model(kind: str, seed: int) -> nn.Module:
    if kind not in ("linear", "mlp"):
        raise ValueError(f"model={kind!r} must be 'linear' or 'mlp'")
    with _INIT_LOCK:
        torch.manual_seed(seed)
        if kind == "linear":
            model: nn.Module = nn.Linear(NUM_FEATURES, 1)
        else:
            model = nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.Tanh(), nn.Linear(8, 1))
    # float64 so that the equivalence tests compare algebra, not rounding order.
    return model.double()


def shard_bounds(
    shard_id: int, num_shards: int, n: int, sizes: list[int] | None
) -> tuple[int, int]:
    """Contiguous shards; equal unless explicit ``sizes`` are given."""
    if sizes is None:
        per = n // num_shards
        return shard_id * per, (shard_id + 1) * per
    start = sum(sizes[:shard_id])
    return start, start + sizes[shard_id]


def reference_run(kind: str, lr: float, epochs: int, seed: int = 0) -> list[torch.Tensor]:
    """Full-batch gradient descent on all the data in one process."""
    x, y = make_data()
    model = make_model(kind, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


class WeightsOnlyWorker:
    """Weights contract only (no state_dict): the trainer's weights-only checkpoint path."""

    def __init__(
        self,
        worker_id: int,
        model: str = "linear",
        lr: float = 0.1,
        momentum: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        raise_at_epoch: int | None = None,
        hang_at_epoch: int | None = None,
        hang_marker: str | None = None,
        die_at_epoch: int | None = None,
        nan_at_epoch: int | None = None,
    ):
        torch.set_num_threads(1)
        self.worker_id = worker_id
        # Every replica gets a different init; the trainer's broadcast must make them equal.
        self.model = make_model(model, seed + worker_id)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(1000 + seed + worker_id)
        self.raise_at_epoch = raise_at_epoch
        self.hang_at_epoch = hang_at_epoch
        self.hang_marker = hang_marker
        self.die_at_epoch = die_at_epoch
        self.nan_at_epoch = nan_at_epoch
        self.x, self.y = make_data()
        self.calls: list = []

    def load_data_shard(self, shard_id, num_shards, sizes=None, **kwargs):
        self.calls.append(("load_data_shard", shard_id, num_shards, sorted(kwargs)))
        start, stop = shard_bounds(shard_id, num_shards, len(self.x), sizes)
        self.x, self.y = self.x[start:stop], self.y[start:stop]
        return stop - start

    def train_epoch(self, epoch):
        self.calls.append(("train_epoch", epoch))
        if epoch == self.raise_at_epoch:
            raise ValueError(f"bad batch in worker {self.worker_id}")
        if epoch == self.hang_at_epoch:
            if self.hang_marker:
                with open(self.hang_marker, "w") as f:
                    f.write(str(os.getpid()))
            time.sleep(3 if self.hang_marker is None else 600)
        if epoch == self.die_at_epoch:
            os._exit(3)
        n = len(self.x)
        if self.batch_size is None:
            batches = [torch.arange(n)]
        else:
            order = torch.randperm(n, generator=self.gen)
            batches = list(order.split(self.batch_size))
        total = 0.0
        for idx in batches:
            self.opt.zero_grad()
            loss = nn.functional.mse_loss(self.model(self.x[idx]), self.y[idx])
            loss.backward()
            self.opt.step()
            total += loss.item() * len(idx)
        if epoch == self.nan_at_epoch:  # a diverged replica
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return {"loss": total / n, "num_samples": n, "worker": self.worker_id}

    def evaluate(self, offset: float = 0.0):
        with torch.no_grad():
            err = (self.model(self.x) - self.y).pow(2).mean().item()
        return {"mse": err + offset, "num_samples": len(self.x)}

    def get_weights(self):
        return [p.detach().clone() for p in self.model.parameters()]

    def set_weights(self, weights):
        with torch.no_grad():
            for p, w in zip(self.model.parameters(), weights):
                p.copy_(w)

    def get_calls(self):
        return self.calls


class RegressionWorker(WeightsOnlyWorker):
    """Adds state_dict/load_state_dict: model, optimizer (momentum buffers) and the shuffle RNG."""

    def state_dict(self):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": self.gen.get_state(),
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["rng"])


class PartsWorker(RegressionWorker):
    """Trains in parts of an epoch (``syncs_per_epoch``): one full-shard step per part."""

    def train_epoch(self, epoch, part=0, num_parts=1):
        result = super().train_epoch(epoch)
        self.calls[-1] = ("train_epoch", epoch, part, num_parts)
        return result


# Decorated after all exist: the subclasses subclass the plain classes.
PartsWorker = miniray.remote(PartsWorker)  # type: ignore[misc]
RegressionWorker = miniray.remote(RegressionWorker)  # type: ignore[misc]
WeightsOnlyWorker = miniray.remote(WeightsOnlyWorker)  # type: ignore[misc]


@miniray.remote
class NoSetWeightsWorker:
    """Breaks the data-parallel contract: no set_weights."""

    def __init__(self, worker_id):
        self.worker_id = worker_id

    def train_epoch(self, epoch):
        return {"loss": 1.0}

    def get_weights(self):
        return [torch.zeros(1)]


@miniray.remote
class CounterWorker:
    """For custom BaseTrainer loops: no weights at all."""

    def __init__(self, worker_id, scale=1):
        self.worker_id = worker_id
        self.scale = scale
        self.count = 0

    def custom_method(self, epoch):
        self.count += 1
        return (self.worker_id + 1) * self.scale * (epoch + 1)

    def train_epoch(self, epoch):
        return {"value": float(self.worker_id * 10 + epoch), "tag": "same", "id": self.worker_id}
