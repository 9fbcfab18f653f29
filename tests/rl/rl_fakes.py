"""Fake trainer/rollouter endpoints and a fake clock for the synchronizer and queue tests.

Module-level so that the runtime can start them as actors (``miniray.remote(FakeRollouter)``).
Weights are numpy arrays: importing torch in every actor process would cost seconds per test.
"""

from __future__ import annotations

import threading

import numpy as np

# What the synchronizer tests share: the fakes' weight size, seed 000's statistics keys.
WEIGHT_BYTES = 4 * 8 * 4 + 8 * 8  # float32 (4, 8) + float64 (8,)
SEED_STAT_KEYS = {
    "sync_count",
    "sync_failures",
    "last_sync_time",
    "sync_group_initialized",
    "current_param_version",
    "current_version",
}


def config(**async_training):
    return {"async_training": {"sync_retry_delay": 0.0, **async_training}}


class FakeClock:
    """Monotonic seconds that move only when told to (or when ``sleep`` is called)."""

    def __init__(self, start: float = 100.0):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeTrainer:
    """Offers ``get_weights``: two tensors whose values say which 'step' produced them."""

    def __init__(self, value: float = 1.0, *, fail_times: int = 0):
        self.value = value
        self.fail_times = fail_times
        self.calls = 0

    def get_weights(self) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("trainer could not gather its weights")
        return {
            "layer.weight": np.full((4, 8), self.value, dtype=np.float32),
            "layer.bias": np.full((8,), self.value, dtype=np.float64),
        }

    def set_value(self, value: float) -> None:
        self.value = value

    def get_calls(self) -> int:
        return self.calls


class FakeRollouter:
    """Offers pause/resume/load and records every call in order.

    ``fail_loads``: the first N loads raise. ``hang_on``: 'pause' or 'load' blocks until
    ``release()`` (or ``hang_limit`` seconds, so a forgotten release cannot hang the suite).
    """

    def __init__(
        self,
        *,
        fail_loads: int = 0,
        hang_on: str | None = None,
        hang_limit: float = 10.0,
        pause_answer: bool = True,
        resume_fails: bool = False,
    ):
        self.fail_loads = fail_loads
        self.hang_on = hang_on
        self.hang_limit = hang_limit
        self.pause_answer = pause_answer
        self.resume_fails = resume_fails
        self.events: list[str] = []
        self.paused = False
        self.version = 0
        self.weights: dict[str, np.ndarray] | None = None
        self._release = threading.Event()

    def pause_rollout(self) -> bool:
        self.events.append("pause")
        if self.hang_on == "pause":
            self._release.wait(self.hang_limit)
        self.paused = True
        return self.pause_answer

    def resume_rollout(self) -> bool:
        self.events.append("resume")
        if self.resume_fails:
            raise RuntimeError("resume failed")
        self.paused = False
        return True

    def load_weights(self, weights: dict[str, np.ndarray], version: int) -> bool:
        self.events.append(f"load:{version}")
        if self.fail_loads > 0:
            self.fail_loads -= 1
            raise RuntimeError("rollouter could not load the weights")
        if self.hang_on == "load":
            self._release.wait(self.hang_limit)
            return True  # too late: the synchronizer gave up; the version is not adopted
        self.weights = {
            k: v.clone() if hasattr(v, "clone") else v.copy() for k, v in weights.items()
        }
        self.version = version
        return True

    def release(self) -> None:
        self._release.set()

    def get_events(self) -> list[str]:
        return list(self.events)

    def get_state(self) -> dict:
        value = None if self.weights is None else float(self.weights["layer.weight"][0, 0])
        return {"paused": self.paused, "version": self.version, "value": value}


def ship_by_value_to_ray() -> None:
    """Ray's workers cannot import this test helper (it is not on their ``sys.path``), so Ray
    must pickle its classes by value. The embedded backends pass the driver's ``sys.path`` to
    their processes and need nothing."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- runs with a real trainer: a deterministic engine, a reward, a crash (checkpoint tests) --
class DeterministicEngine:
    """Response ``i`` of a batch is a digit that depends only on the prompt and ``i``."""

    def __init__(self, digit_ids):
        self.digit_ids = digit_ids

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        from miniray.rl.engines.base import Generation

        out = []
        for i, prompt in enumerate(prompts):
            if should_stop is not None and should_stop():
                return [
                    Generation(
                        prompt_token_ids=list(p),
                        response_token_ids=[],
                        response_logprobs=[],
                        finish_reason="aborted",
                    )
                    for p in prompts
                ]
            token = self.digit_ids[(sum(prompt) + i) % len(self.digit_ids)]
            out.append(
                Generation(
                    prompt_token_ids=list(prompt),
                    response_token_ids=[token],
                    response_logprobs=[-2.3],
                    finish_reason="length",
                )
            )
        return out

    def load_weights(self, state_dict, *, take=False):
        pass

    def state_dict(self):
        return {}


def reward_by_digit(response, truth):
    """Rewards that differ within a group, so every step moves the weights."""
    return float(int(response[0]) % 3) if response[:1].isdigit() else 0.0


class Crash(RuntimeError):
    pass


class PacedEngine(DeterministicEngine):
    """``DeterministicEngine`` whose calls take ``seconds`` (in steps of 5 ms, stopping early
    when asked); records the versions it loaded in ``loaded``. ``hang_marker``: a file; the
    first call in a process where it does not exist yet creates it and hangs (a hung
    replica), so the replica restarted after it generates normally."""

    def __init__(self, digit_ids, seconds=0.0, hang_marker=None):
        super().__init__(digit_ids)
        self.seconds = seconds
        self.hang_marker = hang_marker
        self.loaded: list[int] = []

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        import os
        import time

        if self.hang_marker is not None and not os.path.exists(self.hang_marker):
            open(self.hang_marker, "w").close()
            time.sleep(3600)
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not (should_stop is not None and should_stop()):
            time.sleep(0.005)
        return super().generate(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, should_stop=should_stop
        )

    def load_weights(self, state_dict, *, take=False):
        # A test's tagged weights carry their version; a run's are the model's (-1 here).
        tag = state_dict.get("version")
        self.loaded.append(-1 if tag is None else int(tag[0]))


class PacedEngines:
    """An ``engine_factory``: replica ``i`` gets a ``PacedEngine`` taking ``seconds[i]`` per
    call; every engine it made in this process is in ``made`` (inline: the test reads them)."""

    made: dict[int, list[PacedEngine]] = {}

    def __init__(self, digit_ids, seconds, hang_marker=None, hang_replica=None):
        self.digit_ids = digit_ids
        self.seconds = seconds
        self.hang_marker = hang_marker
        self.hang_replica = hang_replica

    def __call__(self, index):
        marker = self.hang_marker if index == self.hang_replica else None
        engine = PacedEngine(self.digit_ids, self.seconds[index], hang_marker=marker)
        PacedEngines.made.setdefault(index, []).append(engine)
        return engine


class SwappingRollouter(FakeRollouter):
    """A ``FakeRollouter`` that also offers ``swap_weights`` (as ``FullyAsyncRollouter`` does):
    pause, load and resume in one call, recorded as ``swap:<version>`` around them."""

    def swap_weights(self, version, *, weights=None, refs=None, timeout=30.0):
        self.events.append(f"swap:{version}")
        if refs is not None:
            import miniray

            (ref,) = refs
            weights = miniray.get(ref, timeout=timeout)
        self.pause_rollout()
        try:
            self.load_weights(weights, version)
        finally:
            self.resume_rollout()
        return {"pause_s": 0.0, "load_s": 0.0}
