"""What a generation engine offers the rollouter: sample with log-probs, take new weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(kw_only=True)
class Generation:
    """One sampled response. ``response_logprobs[i]`` is the behaviour policy's log-prob of
    ``response_token_ids[i]`` (at the sampling temperature): the trainer's off-policy correction
    needs exactly these numbers, so engines apply no filtering but the ``top_k`` / ``top_p``
    they are asked for, and report the log-probs of that filtered, renormalised distribution."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens) or "aborted" (asked to stop)


class GenerationEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Generation]: ...

    def load_weights(self, state_dict: Mapping[str, Any], *, take: bool = False) -> None:
        """Replace the weights. ``take=True``: the caller hands the tensors over and will not
        touch them again, so an engine may adopt them instead of copying (the HF engine does;
        vLLM and engines on another device copy into their own memory)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...


def check_generate_args(
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float,
    *,
    top_p: float = 1.0,
    top_k: int = -1,
) -> None:
    """The argument rules every engine's ``generate`` shares."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_k < -1:
        raise ValueError(f"top_k={top_k} must be >= 1, or -1 / 0 for no top-k")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
