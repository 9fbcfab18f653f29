"""Rollout-worker and trainer stand-ins for the weight-sync tests, started as real actors.

Module-level so that the local backend's worker processes can import them; numpy weights, so
that an actor starts without importing torch.
"""

from __future__ import annotations

import time

import numpy as np


def weights():
    return {"layer.weight": np.ones((4, 8), dtype=np.float32), "layer.bias": np.zeros(8)}


class Trainer:
    def __init__(self, hang: bool = False):
        self.hang = hang

    def get_weights(self):
        if self.hang:
            time.sleep(3600)
        return weights()


class RolloutWorker:
    """``mode``: ok | hang (sleeps forever in load_weights) | raise | wrong_version."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.version = 0
        self.loaded = None

    def load_weights(self, weights, version):
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "raise":
            raise ValueError("bad weights: layer.weight has shape (4, 8), expected (8, 4)")
        self.loaded = {k: np.asarray(v).copy() for k, v in weights.items()}
        self.version = version if self.mode != "wrong_version" else version - 1
        return self.version

    def state(self):
        return self.version, None if self.loaded is None else sorted(self.loaded)

    def ping(self):
        return True
