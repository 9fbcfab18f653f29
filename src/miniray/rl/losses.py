"""Pure tensor functions of the policy update: log-probs, GRPO advantages, decoupled PPO loss.

Shapes: ``B`` samples, ``T`` response tokens; ``mask`` (B, T) is 1 on the response tokens the
model generated (0 on padding and on the observations of a multi-turn conversation).
Three log-prob tensors meet in the loss (AReaL's decoupled PPO, arXiv:2505.24298):

* ``logprobs``: the policy being trained (``pi_theta``), with gradient;
* ``proximal_logprobs``: the trust-region anchor (``pi_prox``), e.g. the policy at the start of
  this update, without gradient;
* ``behaviour_logprobs``: recorded by the rollouter when it generated the tokens
  (``pi_behave``), possibly several versions old.

    loss = - E[ w * min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) ],
    r = pi_theta / pi_prox,   w = pi_prox / pi_behave  (masked or clamped above a cap)

Without behaviour log-probs (or with ``proximal == behaviour``) ``w = 1`` and this is plain PPO.
The importance weight corrects for the samples' staleness; the cap keeps a few wildly
off-policy tokens from dominating the gradient.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "LossAggMode",
    "aggregate_loss",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "loss_denominator",
    "masked_mean",
    "ppo_loss",
    "token_advantages",
    "token_logprobs",
]

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLType = Literal["k1", "k2", "k3", "low_var_kl"]
KL_TYPES: tuple[str, ...] = ("k1", "k2", "k3", "low_var_kl")


# Rows of logits converted to fp32 at a time by ``token_logprobs``: 2**24 elements is 64 MiB
# of fp32, ~110 positions of a 151,936-token vocabulary. Measured on a (4, 512, 151936) bf16
# batch, forward and backward: peak 0.84 GiB above the logits against 5.80 GiB for the plain
# log_softmax, and 4.5 s against 14.5 s (one core; the plain path's fp32 copies dominate).
CHUNK_ELEMENTS = 2**24


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits / temperature)`` at ``tokens`` and, with ``with_entropy``, the
    entropy of each position's distribution: (..., V) logits, (...) tokens -> two (...) fp32
    tensors (the second None without ``with_entropy``).

    The same values and gradients as ``logprobs_from_logits`` / ``entropy_from_logits``, but
    no (tokens x vocab) fp32 tensor exists beyond one chunk of ``chunk_elements``: the forward
    keeps only each row's log-sum-exp, the backward recomputes the softmax chunk by chunk and
    writes the gradient straight into one tensor of the logits' own dtype.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match tokens of shape "
            f"{tuple(tokens.shape)}: must be (..., V) and (...)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} is invalid: must be > 0")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements={chunk_elements} is invalid: must be >= 1")
    vocab = logits.shape[-1]
    rows = max(1, chunk_elements // max(1, vocab))
    flat = logits.reshape(-1, vocab)
    logp, entropy = _ChunkedLogProbs.apply(
        flat, tokens.reshape(-1).long(), float(temperature), rows, bool(with_entropy)
    )
    logp = logp.view(tokens.shape)
    return logp, (entropy.view(tokens.shape) if with_entropy else None)


class _ChunkedLogProbs(torch.autograd.Function):
    """(N, V) logits, (N,) tokens -> (N,) log-probs and (N,) entropies, chunked over rows.

    With ``x = logits / T``, ``p = softmax(x)``, ``H = -sum p log p``:
    d log p[tok] / dx = onehot(tok) - p and dH / dx = -p * (log p + H).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float,
        rows: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for first in range(0, n, rows):
            part = slice(first, min(first + rows, n))
            x = logits[part].float() / temperature
            lse[part] = torch.logsumexp(x, dim=-1)
            logp[part] = x.gather(-1, tokens[part, None]).squeeze(-1) - lse[part]
            if with_entropy:
                p = torch.exp(x - lse[part, None])
                entropy[part] = lse[part] - (p * x).sum(-1)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.temperature, ctx.rows, ctx.with_entropy = temperature, rows, with_entropy
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        logits, tokens, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        temperature, rows, n = ctx.temperature, ctx.rows, logits.shape[0]
        grad = torch.empty_like(logits)
        for first in range(0, n, rows):
            part = slice(first, min(first + rows, n))
            x = logits[part].float() / temperature
            logp_all = x - lse[part, None]
            p = torch.exp(logp_all)
            g = torch.zeros_like(x)
            if grad_logp is not None:
                g -= p * grad_logp[part, None]
                g.scatter_add_(-1, tokens[part, None], grad_logp[part, None])
            if ctx.with_entropy and grad_entropy is not None and grad_entropy.numel():
                g -= p * (logp_all + entropy[part, None]) * grad_entropy[part, None]
            grad[part] = (g / temperature).to(logits.dtype)
        return grad, None, None, None, None


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., token]``: (B, T, V) logits and (B, T) tokens -> (B, T).
    The plain computation; ``token_logprobs`` is the same in bounded memory."""
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match tokens of shape "
            f"{tuple(tokens.shape)}: must be (..., V) and (...)"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1; 0 where nothing is unmasked (no NaN)."""
    _check_same_shape(values, mask, "values", "mask")
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages: each reward minus its group's mean (over the group's std).

    ``rewards`` (B,) and ``group_index`` (B,) integer ids of the prompt each sample answers.
    A group of one has no baseline to compare against, so its advantage is 0 (verl's choice of
    mean 0, std 1 would instead push the raw reward into the gradient). A group whose rewards
    are all equal also gets 0: it carries no signal about which response is better.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must "
            "both be 1-D of the same length"
        )
    rewards = rewards.float()
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups).index_add_(0, inverse, torch.ones_like(rewards))
    sums = torch.zeros(num_groups).index_add_(0, inverse, rewards)
    means = sums / counts
    centred = rewards - means[inverse]
    if norm_by_std:
        sq = torch.zeros(num_groups).index_add_(0, inverse, centred**2)
        # Unbiased std, as in GRPO; groups of one are zeroed below anyway.
        std = (sq / (counts - 1).clamp(min=1.0)).sqrt()
        centred = centred / (std[inverse] + eps)
    return torch.where(counts[inverse] > 1, centred, torch.zeros_like(centred))


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per sample (B,) spread over its response tokens (B, T)."""
    if advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be (B,) and mask "
            f"{tuple(mask.shape)} must be (B, T)"
        )
    return advantages[:, None] * mask.to(advantages.dtype)


def loss_denominator(mask: torch.Tensor, mode: LossAggMode = "token-mean") -> float:
    """What ``aggregate_loss`` divides by on the rows of ``mask``: their real tokens for
    ``token-mean``, their number for the sequence modes. Computed once over a whole
    minibatch, it lets micro-batches and ranks each reduce their share of it
    (``aggregate_loss(..., denominator=)``) so that the shares add up to the whole."""
    if mode == "token-mean":
        return max(1.0, float(mask.sum()))
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float(mask.shape[0])
    raise ValueError(
        f"loss_agg_mode={mode!r} is unknown: must be one of "
        "['token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum']"
    )


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggMode = "token-mean",
    *,
    denominator: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    ``token-mean``: every token weighs the same (long responses weigh more);
    ``seq-mean-token-mean``: every sample weighs the same;
    ``seq-mean-token-sum``: per-sample sums, averaged over samples.

    ``denominator`` (``loss_denominator`` of the whole minibatch): these rows are a share of
    it, and the result is their part of the minibatch's loss (the parts sum to it).
    """
    _check_same_shape(loss, mask, "loss", "mask")
    if denominator is None:
        denominator = loss_denominator(mask, mode)
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        total = (loss * mask).sum()
    elif mode == "seq-mean-token-mean":
        total = ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif mode == "seq-mean-token-sum":
        total = (loss * mask).sum()
    else:
        raise ValueError(
            f"loss_agg_mode={mode!r} is unknown: must be one of "
            "['token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum']"
        )
    return total / denominator


def ppo_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    behaviour_logprobs: torch.Tensor | None = None,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float | None = None,
    behaviour_weight_cap: float | None = 5.0,
    behaviour_weight_mode: Literal["mask", "clamp"] = "mask",
    behaviour_weight_level: Literal["token", "prefix", "sequence"] = "token",
    loss_agg_mode: LossAggMode = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped PPO loss with AReaL's decoupled off-policy correction (module doc).

    All tensors are (B, T); ``advantages`` per token (see ``token_advantages``);
    ``denominator`` as ``aggregate_loss`` takes it (these rows a share of a minibatch). Returns the
    scalar loss and metrics: ``clip_fraction``, ``approx_kl`` (theta vs prox), and with
    behaviour log-probs ``behaviour_weight_mean``, ``behaviour_filtered_fraction``,
    ``behaviour_approx_kl`` (prox vs behaviour).

    ``behaviour_weight_level`` says which ratios weigh a token:

    * ``"token"``: its own (AReaL's choice; stays near 1 on long responses);
    * ``"prefix"``: the product over the response up to and including it, which also
      corrects for the earlier tokens having been drawn from the behaviour policy;
    * ``"sequence"``: the product over the whole response. With a reward for the whole
      response this is the exact correction: the later tokens, which decide the reward too,
      were drawn from the behaviour policy as well. Its variance grows with the length.

    The token level leaves out the context: on a policy that moves fast, later tokens are
    learned in the contexts the old policy produced, and judged by how the old policy would
    have finished the response.
    """
    for name, t in (
        ("proximal_logprobs", proximal_logprobs),
        ("advantages", advantages),
        ("mask", mask),
    ):
        _check_same_shape(logprobs, t, "logprobs", name)
    if clip_ratio_low < 0 or clip_ratio_low >= 1:
        raise ValueError(f"clip_ratio_low={clip_ratio_low} is invalid: must be in [0, 1)")
    high = clip_ratio_low if clip_ratio_high is None else clip_ratio_high
    if high < 0:
        raise ValueError(f"clip_ratio_high={high} is invalid: must be >= 0")
    mask = mask.to(logprobs.dtype)
    prox = proximal_logprobs.detach()
    advantages = advantages.detach()
    log_ratio = logprobs - prox
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_ratio_low, 1.0 + high)
    # max of the negated objectives = min of the objectives: the pessimistic bound.
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped)
    metrics = {
        "clip_fraction": masked_mean(((ratio - clipped).abs() > 0).to(mask.dtype), mask).item(),
        "approx_kl": masked_mean(-log_ratio.detach(), mask).item(),
    }
    if behaviour_logprobs is not None:
        _check_same_shape(logprobs, behaviour_logprobs, "logprobs", "behaviour_logprobs")
        # Zero off the mask: a padding column or a multi-turn sample's observation has no
        # behaviour log-prob (its placeholder is 0), and must weigh 1 there, not exp(prox).
        behave_log_ratio = (prox - behaviour_logprobs.detach()) * mask
        if behaviour_weight_level == "token":
            weight = torch.exp(behave_log_ratio)
        elif behaviour_weight_level == "prefix":
            weight = torch.exp(torch.cumsum(behave_log_ratio * mask, dim=-1))
        elif behaviour_weight_level == "sequence":
            total = (behave_log_ratio * mask).sum(-1, keepdim=True)
            weight = torch.exp(total).expand_as(behave_log_ratio)
        else:
            raise ValueError(
                f"behaviour_weight_level={behaviour_weight_level!r} is unknown: must be "
                "'token', 'prefix' or 'sequence'"
            )
        keep = torch.ones_like(mask)
        if behaviour_weight_cap is not None:
            if behaviour_weight_cap <= 1:
                raise ValueError(
                    f"behaviour_weight_cap={behaviour_weight_cap} is invalid: must be > 1"
                )
            over = weight > behaviour_weight_cap
            if behaviour_weight_mode == "mask":
                keep = (~over).to(mask.dtype)
            elif behaviour_weight_mode == "clamp":
                weight = weight.clamp(max=behaviour_weight_cap)
            else:
                raise ValueError(
                    f"behaviour_weight_mode={behaviour_weight_mode!r} is unknown: must be "
                    "'mask' or 'clamp'"
                )
            metrics["behaviour_filtered_fraction"] = masked_mean(over.to(mask.dtype), mask).item()
        per_token = per_token * weight * keep
        metrics["behaviour_weight_mean"] = masked_mean(weight, mask * keep).item()
        metrics["behaviour_approx_kl"] = masked_mean(-behave_log_ratio, mask).item()
    loss = aggregate_loss(per_token, mask, loss_agg_mode, denominator=denominator)
    return loss, metrics


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} has shape {tuple(b.shape)} but {name_a} has {tuple(a.shape)}: "
            "they must match"
        )


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs
    (Schulman's estimators; ``d = ref - logprobs``):

    * ``k1``: ``-d``, unbiased, high variance, can be negative;
    * ``k2``: ``d**2 / 2``, biased, low variance, its gradient is that of the true KL's
      second-order term;
    * ``k3``: ``exp(d) - d - 1``, unbiased and always >= 0;
    * ``low_var_kl``: ``k3`` with ``d`` clamped to [-20, 20] and the result to [0, 10], as
      verl's ``actor.kl_loss_type=low_var_kl`` does, so one token the reference finds nearly
      impossible cannot blow the loss up.
    """
    _check_same_shape(logprobs, ref_logprobs, "logprobs", "ref_logprobs")
    d = ref_logprobs - logprobs
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        return torch.expm1(d) - d
    if kind == "low_var_kl":
        d = d.clamp(-20.0, 20.0)
        return (torch.expm1(d) - d).clamp(0.0, 10.0)
    raise ValueError(
        f"actor_rollout_ref.actor.kl_loss_type={kind!r} is not supported; use one of {KL_TYPES}"
    )
