"""Rollout-worker stand-ins for the pulled-generation tests, started as real actors.

Module-level so that the local backend's worker processes can import them; no torch, so that an
actor starts in about a second. A worker answers prompt ``[p]`` with the response
``[p, version, pid, seed % 1000]``: the test reads from each answer which prompt it answers,
with which weights, by which process and with which chunk seed.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass
class FakeGeneration:
    prompt_token_ids: list[int]
    response_token_ids: list[int]


class FakeWorker:
    """``mode``: ok (each call sleeps ``delay`` s) | hang (sleeps an hour in generate) | die
    (SIGKILLs itself in generate) | raise (a ValueError from generate). Appends its pid to
    ``pid_file`` when it starts."""

    def __init__(self, mode: str = "ok", delay: float = 0.0, pid_file: str | None = None):
        self.mode, self.delay = mode, delay
        self.version = 0
        if pid_file is not None:
            with open(pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")

    def node(self) -> str:
        return "test-node"

    def pid(self) -> int:
        return os.getpid()

    def load_weights(self, weights, version: int) -> int:
        self.version = version
        return version

    def generate(self, prompts, *, max_new_tokens: int, temperature: float, seed=None):
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "raise":
            raise ValueError("prompt 0 has no tokens the model knows")
        time.sleep(self.delay)
        pid, mark = os.getpid(), (seed or 0) % 1000
        return self.version, [
            FakeGeneration(list(p), [p[0], self.version, pid, mark]) for p in prompts
        ]
