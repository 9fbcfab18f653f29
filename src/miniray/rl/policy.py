"""One policy-gradient update of a causal LM from scored samples (GRPO advantages, PPO loss).

This is the numerical core of the trainer, kept free of actors and queues so that it can be
tested on its own: samples in, an optimizer step and its metrics out.

    samples --collate--> Batch --forward--> logprobs (theta)
                           |                 proximal logprobs (theta at the start of the step)
                           +-- rewards --> group-relative advantages
    ppo_loss(theta, prox, advantages, behaviour logprobs recorded at generation)
      + kl_loss_coef * KL(theta || reference)   (with use_kl_loss: a frozen copy of the start)
      -> step
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from miniray.rl.losses import (
    KL_TYPES,
    aggregate_loss,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    ppo_loss,
    token_advantages,
)
from miniray.rl.types import Batch, Sample, collate

# The advantage estimators the update knows (``algorithm.adv_estimator``).
ADV_ESTIMATORS = ("grpo",)


@dataclass(kw_only=True)
class PolicyUpdateConfig:
    """The knobs of one update; the trainer fills them from ``actor_rollout_ref.actor``."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    ppo_epochs: int = 1
    ppo_mini_batch_size: int | None = None  # samples per optimizer step; None: the whole batch
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    use_rollout_log_probs: bool = True  # False: plain PPO, no correction towards the behaviour
    behaviour_weight_cap: float | None = 5.0
    behaviour_weight_mode: str = "mask"
    behaviour_weight_level: str = "token"  # token | prefix | sequence (losses.ppo_loss)
    entropy_coeff: float = 0.0
    max_grad_norm: float = 1.0
    loss_agg_mode: str = "token-mean"
    temperature: float = 1.0
    # The advantage (``algorithm``): GRPO's group-relative one; without the std division
    # (norm_adv_by_std_in_grpo=False) it is Dr. GRPO's reward minus the group mean.
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    # The learning-rate schedule, per update (``scheduled_lr``).
    warmup_steps: int = 0
    warmup_style: str = "constant"  # constant | cosine: what follows the warm-up
    min_lr_ratio: float = 0.0  # cosine: the last update's lr as a fraction of ``lr``
    total_steps: int | None = None  # cosine: the update the decay ends at
    # KL to a frozen reference policy, added to the loss (verl's actor.use_kl_loss).
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"  # k1 | k2 | k3 | low_var_kl (losses.kl_penalty)
    ref_micro_batch_size: int | None = None  # rows per reference forward; None: the batch

    def __post_init__(self) -> None:
        if self.adv_estimator not in ADV_ESTIMATORS:
            raise ValueError(
                f"PolicyUpdateConfig.adv_estimator={self.adv_estimator!r} is unknown: must be "
                f"one of {list(ADV_ESTIMATORS)}"
            )
        if self.kl_loss_type not in KL_TYPES:
            raise ValueError(
                f"PolicyUpdateConfig.kl_loss_type={self.kl_loss_type!r} is unknown: must be one "
                f"of {KL_TYPES}"
            )
        if self.kl_loss_coef < 0:
            raise ValueError(f"PolicyUpdateConfig.kl_loss_coef={self.kl_loss_coef} must be >= 0")
        if self.ref_micro_batch_size is not None and self.ref_micro_batch_size < 1:
            raise ValueError(
                f"PolicyUpdateConfig.ref_micro_batch_size={self.ref_micro_batch_size} must be "
                ">= 1 or None (the whole batch)"
            )
        if self.lr <= 0:
            raise ValueError(f"PolicyUpdateConfig.lr={self.lr} must be > 0")
        if self.ppo_epochs < 1:
            raise ValueError(f"PolicyUpdateConfig.ppo_epochs={self.ppo_epochs} must be >= 1")
        if self.ppo_mini_batch_size is not None and self.ppo_mini_batch_size < 1:
            raise ValueError(
                f"PolicyUpdateConfig.ppo_mini_batch_size={self.ppo_mini_batch_size} must be "
                ">= 1 or None (the whole batch)"
            )
        if self.temperature <= 0:
            raise ValueError(
                f"PolicyUpdateConfig.temperature={self.temperature} must be > 0 (the rollout's)"
            )
        if self.warmup_style not in ("constant", "cosine"):
            raise ValueError(
                f"PolicyUpdateConfig.warmup_style={self.warmup_style!r} is unknown: must be "
                "'constant' or 'cosine'"
            )
        if self.warmup_style == "cosine" and not self.total_steps:
            raise ValueError(
                "PolicyUpdateConfig.warmup_style='cosine' needs total_steps (the update the "
                f"decay ends at), got {self.total_steps!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"PolicyUpdateConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"PolicyUpdateConfig.warmup_steps={self.warmup_steps} must be >= 0")


def scheduled_lr(config: PolicyUpdateConfig, step: int) -> float:
    """The learning rate of update ``step`` (0-based): a linear warm-up over
    ``warmup_steps`` updates, then constant, or a cosine decay to ``min_lr_ratio * lr`` at
    ``total_steps``. A function of the step alone, so a resumed run continues the schedule
    from its checkpointed step count."""
    base = config.lr
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.warmup_style == "constant":
        return base
    assert config.total_steps is not None  # checked in __post_init__
    span = max(1, config.total_steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def response_log_softmax(model: Any, batch: Batch, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R, V) of the whole next-token distribution at each response position."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions
    ).logits
    start = batch.prompt_length
    return torch.log_softmax(logits[:, start - 1 : -1].float() / temperature, dim=-1)


def chosen_logprobs(log_softmax: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The (B, R) entries of a (B, R, V) ``response_log_softmax`` at the response tokens."""
    return log_softmax.gather(-1, batch.response_ids[..., None]).squeeze(-1)


def response_logprobs(model: Any, batch: Batch, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the batch's response tokens under ``model``."""
    return chosen_logprobs(response_log_softmax(model, batch, temperature=temperature), batch)


@torch.no_grad()
def reference_logprobs(
    model: Any, batch: Batch, *, micro_batch_size: int | None, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs (B, R) of the response tokens under a frozen ``model``, ``micro_batch_size``
    rows per forward pass: only one chunk's (rows, R, V) distribution exists at a time."""
    size = micro_batch_size or len(batch)
    parts = []
    for first in range(0, len(batch), size):
        rows = torch.arange(first, min(first + size, len(batch)))
        parts.append(response_logprobs(model, batch.select(rows), temperature=temperature))
    return torch.cat(parts)


class PolicyUpdater:
    """Owns the optimizer of ``model`` and applies updates from lists of samples; with
    ``use_kl_loss`` it also holds ``ref_model``, frozen, for the KL term."""

    def __init__(
        self,
        model: Any,
        *,
        pad_token_id: int,
        config: PolicyUpdateConfig | None = None,
        ref_model: Any = None,
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.config = config or PolicyUpdateConfig()
        if self.config.use_kl_loss and ref_model is None:
            raise ValueError(
                "actor_rollout_ref.actor.use_kl_loss=true needs a reference model "
                "(PolicyUpdater(ref_model=...)); the trainer loads one from model.path"
            )
        self.ref_model = ref_model if self.config.use_kl_loss else None
        if self.ref_model is not None:
            self.ref_model.eval()
            self.ref_model.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        self.steps = 0

    def step(self, samples: Sequence[Sample]) -> dict[str, float]:
        """One update: ``ppo_epochs`` passes over the batch in minibatches of
        ``ppo_mini_batch_size`` samples, an optimizer step per minibatch."""
        cfg = self.config
        batch = collate(samples, pad_token_id=self.pad_token_id)
        advantages = grpo_advantages(
            batch.rewards, batch.group_index, norm_by_std=self.config.norm_adv_by_std_in_grpo
        )
        per_token = token_advantages(advantages, batch.response_mask)
        behaviour = batch.behaviour_logprobs if cfg.use_rollout_log_probs else None
        lr = scheduled_lr(cfg, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        reference = None
        if self.ref_model is not None:
            reference = reference_logprobs(
                self.ref_model,
                batch,
                micro_batch_size=cfg.ref_micro_batch_size,
                temperature=cfg.temperature,
            )
        self.model.train()
        size = cfg.ppo_mini_batch_size or len(batch)
        proximal: torch.Tensor | None = None
        if size >= len(batch):
            parts = [(batch, per_token, behaviour, slice(None))]
        else:
            # The proximal policy is theta at the start of the update; with several optimizer
            # steps per pass, later minibatches no longer see it, so it takes its own pass.
            with torch.no_grad():
                proximal = response_logprobs(self.model, batch, temperature=cfg.temperature)
            parts = []
            for first in range(0, len(batch), size):
                rows = torch.arange(first, min(first + size, len(batch)))
                parts.append(
                    (
                        batch.select(rows),
                        per_token[rows],
                        None if behaviour is None else behaviour[rows],
                        rows,
                    )
                )
        metrics: dict[str, float] = {}
        for _ in range(cfg.ppo_epochs):
            for part, part_advantages, part_behaviour, rows in parts:
                logp = response_log_softmax(self.model, part, temperature=cfg.temperature)
                logprobs = chosen_logprobs(logp, part)
                if proximal is None:
                    # One minibatch: theta at the start is the first epoch's theta, its
                    # log-probs detached, with no extra forward pass (~15% of a step).
                    proximal = logprobs.detach()
                loss, metrics = ppo_loss(
                    logprobs,
                    proximal[rows],
                    part_advantages,
                    part.response_mask,
                    behaviour_logprobs=part_behaviour,
                    clip_ratio_low=cfg.clip_ratio_low,
                    clip_ratio_high=cfg.clip_ratio_high,
                    behaviour_weight_cap=cfg.behaviour_weight_cap,
                    behaviour_weight_mode=cfg.behaviour_weight_mode,  # type: ignore[arg-type]
                    behaviour_weight_level=cfg.behaviour_weight_level,  # type: ignore[arg-type]
                    loss_agg_mode=cfg.loss_agg_mode,  # type: ignore[arg-type]
                )
                if cfg.entropy_coeff > 0:
                    entropy = -(logp.exp() * logp).sum(-1)
                    mode = cfg.loss_agg_mode
                    mean_entropy = aggregate_loss(entropy, part.response_mask, mode)  # type: ignore[arg-type]
                    loss = loss - cfg.entropy_coeff * mean_entropy
                    metrics["entropy"] = mean_entropy.item()
                if reference is not None:
                    kl = kl_penalty(logprobs, reference[rows], cfg.kl_loss_type)
                    kl_loss = aggregate_loss(kl, part.response_mask, cfg.loss_agg_mode)  # type: ignore[arg-type]
                    loss = loss + cfg.kl_loss_coef * kl_loss
                    metrics["kl_loss"] = kl_loss.item()
                    metrics["kl_coef"] = cfg.kl_loss_coef
                self.optimizer.zero_grad()
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), cfg.max_grad_norm
                )
                self.optimizer.step()
                metrics["loss"] = loss.item()
                metrics["grad_norm"] = float(grad_norm)
        self.model.eval()
        self.steps += 1
        metrics["lr"] = lr
        metrics["reward_mean"] = batch.rewards.float().mean().item()
        metrics["advantage_abs_mean"] = advantages.abs().mean().item()
        metrics["response_length_mean"] = batch.response_mask.sum(-1).mean().item()
        assert proximal is not None  # ppo_epochs >= 1
        metrics["entropy_proxy"] = -masked_mean(proximal, batch.response_mask).item()
        return metrics

    def state_dict(self, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """The weights: a copy, or with ``copy=False`` the live tensors (detached; valid until
        the next step changes them). Tied entries (a causal LM's embedding and ``lm_head``)
        stay one tensor under both names, so the copy and every sync move their bytes once."""
        tensors: dict[tuple, torch.Tensor] = {}
        out = {}
        for name, tensor in self.model.state_dict().items():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if key not in tensors:
                tensors[key] = tensor.detach().clone() if copy else tensor.detach()
            out[name] = tensors[key]
        return out
