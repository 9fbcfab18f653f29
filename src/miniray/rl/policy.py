"""One policy-gradient update of a causal LM from scored samples (GRPO advantages, PPO loss).

This is the numerical core of the trainer, kept free of actors and queues so that it can be
tested on its own: samples in, an optimizer step and its metrics out.

    samples --collate--> Batch --forward--> logprobs (theta)
                           |                 proximal logprobs (theta at the start of the step)
                           +-- rewards --> group-relative advantages
    ppo_loss(theta, prox, advantages, behaviour logprobs recorded at generation) -> step
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from miniray.rl.losses import grpo_advantages, masked_mean, ppo_loss, token_advantages
from miniray.rl.types import Batch, Sample, collate


@dataclass(kw_only=True)
class PolicyUpdateConfig:
    lr: float = 1e-3
    ppo_epochs: int = 1
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    behaviour_weight_cap: float | None = 5.0
    max_grad_norm: float = 1.0
    loss_agg_mode: str = "token-mean"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"PolicyUpdateConfig.lr={self.lr} must be > 0")
        if self.ppo_epochs < 1:
            raise ValueError(f"PolicyUpdateConfig.ppo_epochs={self.ppo_epochs} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(
                f"PolicyUpdateConfig.temperature={self.temperature} must be > 0 (the rollout's)"
            )


def response_logprobs(model: Any, batch: Batch, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the batch's response tokens under ``model``."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions
    ).logits
    start = batch.prompt_length
    logits = logits[:, start - 1 : -1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)


class PolicyUpdater:
    """Owns the optimizer of ``model`` and applies updates from lists of samples."""

    def __init__(self, model: Any, *, pad_token_id: int, config: PolicyUpdateConfig | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.config = config or PolicyUpdateConfig()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.config.lr, weight_decay=0.0)
        self.steps = 0

    def step(self, samples: Sequence[Sample]) -> dict[str, float]:
        cfg = self.config
        batch = collate(samples, pad_token_id=self.pad_token_id)
        advantages = grpo_advantages(batch.rewards, batch.group_index)
        per_token = token_advantages(advantages, batch.response_mask)
        self.model.train()
        metrics: dict[str, float] = {}
        proximal: torch.Tensor | None = None
        for _ in range(cfg.ppo_epochs):
            logprobs = response_logprobs(self.model, batch, temperature=cfg.temperature)
            if proximal is None:
                # Theta at the start of the step is the first epoch's theta: its log-probs,
                # detached, with no extra forward pass (that pass was ~15% of a step).
                proximal = logprobs.detach()
            loss, metrics = ppo_loss(
                logprobs,
                proximal,
                per_token,
                batch.response_mask,
                behaviour_logprobs=batch.behaviour_logprobs,
                clip_ratio_low=cfg.clip_ratio_low,
                clip_ratio_high=cfg.clip_ratio_high,
                behaviour_weight_cap=cfg.behaviour_weight_cap,
                loss_agg_mode=cfg.loss_agg_mode,  # type: ignore[arg-type]
            )
            self.optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            metrics["loss"] = loss.item()
            metrics["grad_norm"] = float(grad_norm)
        self.model.eval()
        self.steps += 1
        metrics["reward_mean"] = batch.rewards.float().mean().item()
        metrics["advantage_abs_mean"] = advantages.abs().mean().item()
        metrics["response_length_mean"] = batch.response_mask.sum(-1).mean().item()
        assert proximal is not None  # ppo_epochs >= 1
        metrics["entropy_proxy"] = -masked_mean(proximal, batch.response_mask).item()
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
