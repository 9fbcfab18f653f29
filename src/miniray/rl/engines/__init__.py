"""Generation engines behind one small protocol: transformers (CPU or a GPU), vLLM where it exists.

``VLLMGenerationEngine`` is exported lazily: importing this package never imports vllm.
"""

from __future__ import annotations

from typing import Any

from miniray.rl.engines.base import Generation, GenerationEngine
from miniray.rl.engines.hf import HFGenerationEngine

__all__ = [
    "ENGINE_NAMES",
    "Generation",
    "GenerationEngine",
    "HFGenerationEngine",
    "VLLMGenerationEngine",
    "build_engine",
]

ENGINE_NAMES = ("transformers", "vllm")


def build_engine(
    name: str,
    *,
    model_path: str,
    seed: int = 0,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> Any:
    """The engine ``actor_rollout_ref.rollout.name`` names, loaded from ``model_path`` in
    ``dtype`` (``actor_rollout_ref.model``), sampling with the random seed ``seed``, on
    ``device`` (transformers; vLLM takes the GPU its process was given)."""
    if name == "transformers":
        return HFGenerationEngine(
            model_path=model_path,
            seed=seed,
            num_threads=1,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            device=device,
        )
    if name == "vllm":
        from miniray.rl.engines.vllm import VLLMGenerationEngine

        return VLLMGenerationEngine(
            model_path, seed=seed, dtype=dtype, trust_remote_code=trust_remote_code
        )
    raise ValueError(
        f"actor_rollout_ref.rollout.name={name!r} is invalid: must be one of {list(ENGINE_NAMES)}"
    )


def __getattr__(name: str) -> Any:
    if name == "VLLMGenerationEngine":
        from miniray.rl.engines.vllm import VLLMGenerationEngine

        return VLLMGenerationEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
