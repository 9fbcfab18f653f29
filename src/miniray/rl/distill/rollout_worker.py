"""RolloutWorker: one copy of the student that generates responses, run as a miniray actor.

The scheduler talks to ``rollout.n_gpus_per_node`` of them (one process each, on a GPU of its own
where CUDA is, else on the CPU), held
in a ``replica_pool.ReplicaPool`` as the RL rollouter's replicas are; a batch's prompts go to them
in chunks, by pull (``dispatch.ChunkedGeneration``). A worker loads new weights only between
generations
(actor calls run one at a time), so every response it returns was generated with exactly the
version it reports alongside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from miniray.rl.placement import node_id

__all__ = ["RolloutWorker"]


class RolloutWorker:
    """Samples from the student with exact behaviour log-probs; takes versioned weights."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        num_threads: int = 1,
        name: str = "rollout",
        engine: str = "transformers",
        device: str = "cpu",
    ):
        """``engine``: ``actor_rollout_ref.rollout.name``; only transformers here. ``device``:
        the worker's, as the driver planned it (``placement.replica_placement``)."""
        from miniray.rl.engines import HFGenerationEngine
        from miniray.rl.placement import local_device

        if engine != "transformers":
            raise ValueError(
                f"actor_rollout_ref.rollout.name={engine!r} is invalid for distillation: its "
                "rollout workers generate with 'transformers' only"
            )
        self.name = name
        # One thread per worker: several workers and the trainer share the machine's cores.
        self.engine = HFGenerationEngine(
            model_path=model_path,
            seed=seed,
            num_threads=num_threads,
            device=local_device(device),
        )
        self.version = 0

    def ping(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "pid": os.getpid()}

    def node(self) -> str:
        """The node this worker runs on: the pool's ready call (its ``stats[i]["node"]``)."""
        return node_id()

    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None = None,
    ) -> tuple[int, list[Any]]:
        """``(version of the weights used, [Generation, ...])`` for ``prompts``. ``seed``
        (``dispatch.chunk_seed``) reseeds the sampler first, so a chunk's responses do not
        depend on which worker generates it or on what that worker generated before."""
        version = self.version
        if seed is not None:
            self.engine.generator.manual_seed(seed)
        gens = self.engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature)
        return version, gens

    def load_weights(self, weights: Mapping[str, Any], version: int) -> int:
        """Load ``weights`` (strict names and shapes), then adopt ``version``; returns it.
        The engine may adopt the tensors (``take=True``): they arrive as private copies
        through the runtime, as ``FullyAsyncRollouter.load_weights`` explains."""
        if not isinstance(version, int) or version < self.version:
            raise ValueError(
                f"{self.name}: version={version!r} is invalid: must be an int >= the version "
                f"it holds ({self.version})"
            )
        self.engine.load_weights(weights, take=True)
        self.version = version
        return version
