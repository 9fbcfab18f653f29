"""Worker actors for the parameter-server tests (module level: the local backend imports them)."""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn

import miniray
from miniray.ps.strategies import AverageStrategy


@miniray.remote
class ListWorker:
    """Holds a weight list (and optionally gradients); can be told to hang or to fail."""

    def __init__(self, weights, gradients=None, delay_s: float = 0.0, error: str | None = None):
        self.weights = [t.clone() for t in weights]
        self.gradients = gradients
        self.delay_s = delay_s
        self.error = error
        self.num_set = 0

    def get_weights(self):
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error:
            raise RuntimeError(self.error)
        return self.weights

    def set_weights(self, weights):
        self.weights = [t.clone() for t in weights]
        self.num_set += 1

    def get_gradients(self):
        return self.gradients

    def load(self, weights, gradients=None):
        self.weights = [t.clone() for t in weights]
        self.gradients = gradients

    def load_raw(self, value):
        self.weights = value

    def times_set(self):
        return self.num_set

    def pid(self):
        return os.getpid()


@miniray.remote
class TrainingWorker:
    """The seed's complete example, verbatim apart from a seed and a real train_step."""

    def __init__(self, worker_id):
        torch.manual_seed(worker_id)
        self.model = nn.Linear(10, 1)

    def get_weights(self):
        return [p.detach().cpu() for p in self.model.parameters()]

    def set_weights(self, weights):
        with torch.no_grad():
            for param, new_weight in zip(self.model.parameters(), weights):
                param.copy_(new_weight)

    def train_step(self):
        x = torch.randn(8, 10)
        loss = self.model(x).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            for p in self.model.parameters():
                p -= 0.1 * p.grad
                p.grad = None


class SlowInHelpers(AverageStrategy):
    """'average', but a helper process of the sliced path hangs on its first chunk (the server
    process, ``server_pid``, does not): for the reducer-timeout test."""

    elementwise = True
    hung = False

    def __init__(self, server_pid: int, hang_s: float = 30.0):
        super().__init__()
        self.server_pid = server_pid
        self.hang_s = hang_s

    def reduce_into(self, out, weight_lists, worker_ids):
        if os.getpid() != self.server_pid and not SlowInHelpers.hung:
            SlowInHelpers.hung = True
            time.sleep(self.hang_s)
        super().reduce_into(out, weight_lists, worker_ids)


class FailsInWorkers(AverageStrategy):
    """'average', but ``reduce_into`` raises, or exits the process (``die=True``), in every
    process except the server's (``server_pid``): the sliced path's participants fail."""

    elementwise = True

    def __init__(self, server_pid: int, die: bool = False):
        super().__init__()
        self.server_pid = server_pid
        self.die = die

    def reduce_into(self, out, weight_lists, worker_ids):
        if os.getpid() != self.server_pid:
            if self.die:
                os._exit(1)
            raise RuntimeError("this participant fails on purpose")
        super().reduce_into(out, weight_lists, worker_ids)


@miniray.remote
class KeepingWorker:
    """Keeps the first weights it is given as they are (no copy) and writes into them, as a
    careless ``set_weights`` might: the server must neither rewrite them nor see the writes."""

    def __init__(self, weights):
        self.weights = [t.clone() for t in weights]
        self.first = None

    def get_weights(self):
        return self.weights

    def set_weights(self, weights):
        if self.first is None:
            self.first = weights
            weights[-1].add_(1000)  # the last page only: the others still show the segment
        self.weights = [t.clone() for t in weights]

    def first_weights(self):
        return [t.clone() for t in self.first]


@miniray.remote
class ScribblingWorker(ListWorker.__ray_actor_class__):  # type: ignore[name-defined]
    """Copies the weights it is given, then writes into what it was given (without keeping
    it): its next loads must not see its own old writes."""

    def set_weights(self, weights):
        super().set_weights(weights)
        weights[0].add_(1000.0)
