"""A generation engine's answer without a model, for the RL loop tests that only need samples."""

from __future__ import annotations

from miniray.rl.engines.base import Generation


def echo_generations(prompts) -> list[Generation]:
    """Each prompt answered with its own last token at log-prob -0.5, cut at the length limit."""
    return [
        Generation(
            prompt_token_ids=list(p),
            response_token_ids=[p[-1]],
            response_logprobs=[-0.5],
            finish_reason="length",
        )
        for p in prompts
    ]
