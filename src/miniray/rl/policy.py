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

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from miniray.rl.losses import (
    KL_TYPES,
    LossAggMode,
    aggregate_loss,
    grpo_advantages,
    kl_penalty,
    loss_denominator,
    masked_mean,
    ppo_loss,
    token_advantages,
    token_logprobs,
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
    # Rows per forward/backward (gradients accumulate over a minibatch's micro-batches): peak
    # memory is set by this, not by the minibatch. Per rank, as verl's key says. None: a
    # rank's whole share of the minibatch at once.
    ppo_micro_batch_size: int | None = None
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    use_rollout_log_probs: bool = True  # False: plain PPO, no correction towards the behaviour
    behaviour_weight_cap: float | None = 5.0
    behaviour_weight_mode: Literal["mask", "clamp"] = "mask"
    behaviour_weight_level: Literal["token", "prefix", "sequence"] = "token"  # losses.ppo_loss
    entropy_coeff: float = 0.0
    max_grad_norm: float = 1.0
    loss_agg_mode: LossAggMode = "token-mean"
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
        if self.ppo_micro_batch_size is not None and self.ppo_micro_batch_size < 1:
            raise ValueError(
                f"PolicyUpdateConfig.ppo_micro_batch_size={self.ppo_micro_batch_size} must be "
                ">= 1 or None (a rank's whole share of the minibatch)"
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


def response_logits(model: Any, batch: Batch) -> torch.Tensor:
    """The model's logits (B, R, V) at the positions that predict the response tokens.

    Models that take ``logits_to_keep`` (transformers' causal LMs) compute the head on the
    last R + 1 positions only: the prompt's logits, (B, P, V), are never made.
    """
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    width = batch.input_ids.shape[1] - batch.prompt_length
    extra = {"logits_to_keep": width + 1} if _takes_logits_to_keep(model) else {}
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        **extra,
    ).logits
    return logits[:, -(width + 1) : -1]


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _takes_logits_to_keep(model: Any) -> bool:
    import inspect

    inner = getattr(model, "module", model)  # DDP wraps; FSDP2 keeps the class's forward
    kind = type(inner)
    if kind not in _LOGITS_TO_KEEP:
        params: Mapping[str, Any]
        try:
            params = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _LOGITS_TO_KEEP[kind] = "logits_to_keep" in params
    return _LOGITS_TO_KEEP[kind]


def response_token_logprobs(
    model: Any, batch: Batch, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the response tokens under ``model`` and, with ``with_entropy``,
    the entropy (B, R) of each position's distribution; chunked over tokens
    (``losses.token_logprobs``), so no (tokens x vocab) fp32 tensor is made."""
    return token_logprobs(
        response_logits(model, batch),
        batch.response_ids,
        temperature=temperature,
        with_entropy=with_entropy,
    )


def response_logprobs(model: Any, batch: Batch, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the batch's response tokens under ``model``."""
    return response_token_logprobs(model, batch, temperature=temperature)[0]


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


@dataclass(frozen=True)
class MicroBatch:
    """Rows of the batch one forward/backward takes. ``weight`` 0: a stand-in for a rank whose
    share ran out, run (its loss times 0) only so that every rank makes the same collectives
    (FSDP2 gathers parameters in every forward)."""

    rows: torch.Tensor
    weight: int = 1


def shard_rows(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of a minibatch's rows: contiguous, sizes differing by at most one."""
    return torch.tensor_split(rows, world_size)[rank]


def micro_batches(
    rows: torch.Tensor, *, rank: int, world_size: int, micro_batch_size: int | None
) -> list[MicroBatch]:
    """Rank ``rank``'s share of the minibatch ``rows`` in micro-batches of at most
    ``micro_batch_size`` rows (None: one). Every rank gets the same number, the largest
    share's, so their collectives pair up; a rank with fewer rows gets stand-ins."""
    share = shard_rows(rows, rank, world_size)
    largest = -(-len(rows) // world_size)
    count = 1 if micro_batch_size is None else max(1, -(-largest // micro_batch_size))
    return [
        MicroBatch(part) if len(part) else MicroBatch(rows[:1], weight=0)
        for part in torch.tensor_split(share, count)
    ]


def gradient_sync(model: Any, *, enabled: bool) -> contextlib.AbstractContextManager:
    """Gradients are reduced over the ranks in this backward (``enabled``), or only kept for
    a later one: DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``; a plain module
    has nothing to reduce."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _reduced(
    totals: dict[str, float], all_reduce: Callable[[torch.Tensor], None] | None
) -> dict[str, float]:
    """``totals`` summed over the ranks by ``all_reduce`` (one collective; every rank has the
    same keys, since they run the same config); as they are without one."""
    if all_reduce is None:
        return dict(totals)
    keys = sorted(totals)
    values = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    all_reduce(values)
    return dict(zip(keys, values.tolist()))


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
        device: torch.device | str = "cpu",
    ):
        """``model`` may be wrapped for data parallelism (DDP, FSDP2) and live on
        ``device``; batches are collated on the CPU and moved there one micro-batch at a
        time."""
        self.model = model
        self.device = torch.device(device)
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

    def step(
        self,
        samples: Sequence[Sample],
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> dict[str, float]:
        """One update: ``ppo_epochs`` passes over the batch in minibatches of
        ``ppo_mini_batch_size`` samples, an optimizer step per minibatch, each minibatch's
        gradient accumulated over micro-batches of ``ppo_micro_batch_size`` rows.

        Data parallel (``world_size`` > 1, ``model`` wrapped by DDP or FSDP2): every rank gets
        the whole sample list, computes the advantages over whole groups, and trains on its
        share of each minibatch (``shard_rows``). Each share's loss is its part of the
        minibatch's (the denominator is the whole minibatch's), times ``world_size`` since
        the wrapper averages gradients over ranks: N ranks take the step one rank takes on
        the whole batch. ``all_reduce`` (a SUM in place over the ranks) makes the metrics the
        whole minibatch's; without it they are this rank's share's.
        """
        cfg = self.config
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
        mode = cfg.loss_agg_mode
        batch = collate(samples, pad_token_id=self.pad_token_id)
        advantages = grpo_advantages(
            batch.rewards, batch.group_index, norm_by_std=self.config.norm_adv_by_std_in_grpo
        )
        per_token = token_advantages(advantages, batch.response_mask)
        behaviour = batch.behaviour_logprobs if cfg.use_rollout_log_probs else None
        lr = scheduled_lr(cfg, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        size = cfg.ppo_mini_batch_size or len(batch)
        minibatches = [
            torch.arange(first, min(first + size, len(batch)))
            for first in range(0, len(batch), size)
        ]
        plans = [
            micro_batches(
                rows, rank=rank, world_size=world_size, micro_batch_size=cfg.ppo_micro_batch_size
            )
            for rows in minibatches
        ]
        mine_parts = [m.rows for plan in plans for m in plan if m.weight]
        mine = torch.cat(mine_parts) if mine_parts else torch.zeros(0, dtype=torch.long)
        reference = None
        if self.ref_model is not None:
            reference = torch.zeros_like(batch.response_mask)
            reference[mine] = self._frozen_logprobs(self.ref_model, batch, mine)
        self.model.train()
        proximal = torch.zeros_like(batch.response_mask)
        # The proximal policy is theta at the start of the update. With one minibatch it is
        # the first epoch's theta, its log-probs detached, with no extra forward pass (~15% of
        # a step); with several, later minibatches no longer see it: it takes its own pass.
        proximal_in_first_epoch = len(minibatches) == 1
        if not proximal_in_first_epoch:
            proximal[mine] = self._frozen_logprobs(self.model, batch, mine)
        totals: dict[str, float] = {}
        for epoch in range(cfg.ppo_epochs):
            for rows, plan in zip(minibatches, plans):
                denominator = loss_denominator(batch.response_mask[rows], mode)
                totals = {}
                self.optimizer.zero_grad()
                for index, micro in enumerate(plan):
                    with gradient_sync(self.model, enabled=index == len(plan) - 1):
                        fill = proximal_in_first_epoch and epoch == 0
                        loss, terms = self._micro_loss(
                            batch,
                            micro,
                            per_token,
                            behaviour,
                            proximal,
                            reference,
                            denominator=denominator,
                            fill_proximal=fill,
                        )
                        (loss * (micro.weight * world_size)).backward()
                    if micro.weight:
                        for key, value in terms.items():
                            totals[key] = totals.get(key, 0.0) + value
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), cfg.max_grad_norm
                )
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
                    grad_norm = grad_norm.full_tensor()
                self.optimizer.step()
                # The same on every rank: summed below, so each adds its share.
                totals["grad_norm"] = float(grad_norm) / (world_size if all_reduce else 1)
        self.model.eval()
        self.steps += 1
        mask = batch.response_mask
        totals["entropy_proxy"] = -float((proximal[mine] * mask[mine]).sum())
        totals["tokens_mine"] = float(mask[mine].sum())
        metrics = _reduced(totals, all_reduce)
        tokens = max(1.0, metrics.pop("tokens"))
        for key in [k for k in metrics if k.startswith("weighted/")]:
            metrics[key.removeprefix("weighted/")] = metrics.pop(key) / tokens
        metrics["entropy_proxy"] /= max(1.0, metrics.pop("tokens_mine"))
        metrics["lr"] = lr
        metrics["reward_mean"] = batch.rewards.float().mean().item()
        metrics["advantage_abs_mean"] = advantages.abs().mean().item()
        metrics["response_length_mean"] = mask.sum(-1).mean().item()
        if self.ref_model is not None:
            metrics["kl_coef"] = cfg.kl_loss_coef
        return metrics

    def _micro_loss(
        self,
        batch: Batch,
        micro: MicroBatch,
        per_token: torch.Tensor,
        behaviour: torch.Tensor | None,
        proximal: torch.Tensor,
        reference: torch.Tensor | None,
        *,
        denominator: float,
        fill_proximal: bool,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch as its part of the minibatch's (``denominator``) and
        its metric sums: ``loss`` (its part), ``weighted/<metric>`` (a mean over its tokens
        times their number, over ``tokens`` in all: the metrics are token means)."""
        cfg, rows = self.config, micro.rows
        part = batch.select(rows).trimmed()
        width = part.response_mask.shape[1]
        logprobs, entropy = response_token_logprobs(
            self.model,
            part.to(self.device),
            temperature=cfg.temperature,
            with_entropy=cfg.entropy_coeff > 0,
        )
        logprobs = logprobs.cpu()  # the loss's other tensors are collated on the CPU
        if fill_proximal:
            proximal[rows, :width] = logprobs.detach()
        loss, metrics = ppo_loss(
            logprobs,
            proximal[rows, :width],
            per_token[rows, :width],
            part.response_mask,
            behaviour_logprobs=None if behaviour is None else behaviour[rows, :width],
            clip_ratio_low=cfg.clip_ratio_low,
            clip_ratio_high=cfg.clip_ratio_high,
            behaviour_weight_cap=cfg.behaviour_weight_cap,
            behaviour_weight_mode=cfg.behaviour_weight_mode,
            behaviour_weight_level=cfg.behaviour_weight_level,
            loss_agg_mode=cfg.loss_agg_mode,
            denominator=denominator,
        )
        mode = cfg.loss_agg_mode
        if entropy is not None:
            entropy = entropy.cpu()
            part_entropy = aggregate_loss(
                entropy, part.response_mask, mode, denominator=denominator
            )
            loss = loss - cfg.entropy_coeff * part_entropy
            metrics["entropy"] = masked_mean(entropy.detach(), part.response_mask).item()
        if reference is not None:
            kl = kl_penalty(logprobs, reference[rows, :width], cfg.kl_loss_type)
            kl_loss = aggregate_loss(kl, part.response_mask, mode, denominator=denominator)
            loss = loss + cfg.kl_loss_coef * kl_loss
            metrics["kl_loss"] = masked_mean(kl.detach(), part.response_mask).item()
        tokens = float(part.response_mask.sum())
        terms = {f"weighted/{k}": v * tokens for k, v in metrics.items()}
        terms.update(loss=float(loss.detach()), tokens=tokens)
        return loss, terms

    @torch.no_grad()
    def _frozen_logprobs(self, model: Any, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Log-probs (len(rows), R) of ``rows`` under ``model`` without gradient, in
        micro-batches (the reference model's own size if set, else the update's)."""
        cfg = self.config
        size = (
            (cfg.ref_micro_batch_size if model is self.ref_model else None)
            or cfg.ppo_micro_batch_size
            or len(rows)
        )
        out = torch.zeros(len(rows), batch.response_mask.shape[1])
        was_training = model.training
        model.eval()
        for first in range(0, len(rows), size):
            chunk = rows[first : first + size]
            part = batch.select(chunk).trimmed()
            width = part.response_mask.shape[1]
            logp = response_logprobs(model, part.to(self.device), temperature=cfg.temperature)
            out[first : first + len(chunk), :width] = logp.cpu()
        model.train(was_training)
        return out

    def state_dict(self, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """The weights: a copy, or with ``copy=False`` the live tensors (detached; valid until
        the next step changes them). Tied entries (a causal LM's embedding and ``lm_head``)
        stay one tensor under both names, so the copy and every sync move their bytes once.
        Of the module a DDP wrapper holds (FSDP2's shards: ``parallel.full_state_dict``)."""
        from miniray.rl.parallel import share_tied

        return share_tied(getattr(self.model, "module", self.model).state_dict(), copy=copy)
