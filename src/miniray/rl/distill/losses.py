"""Distillation losses (GKD): divergences between the student's and the teacher's next-token
distributions, on response tokens only, and the ``lmbda`` rule that picks on-policy batches.

Shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``k`` teacher top-k. Row ``t`` of
every tensor is the distribution of the token at position ``t + 1`` (the student's logits at
``t`` and the teacher's row ``t`` predict the same token).

Divergences, per position, with ``P`` the teacher and ``Q`` the student (TRL's and the GKD
paper's convention):

* ``forward_kl``  = KL(P || Q)   (mean-seeking; what supervised KD minimises)
* ``reverse_kl``  = KL(Q || P)   (mode-seeking)
* ``jsd`` (beta)  = beta * KL(P || M) + (1 - beta) * KL(Q || M),  M = beta * P + (1 - beta) * Q

As in TRL, ``beta = 0`` *is* forward KL and ``beta = 1`` *is* reverse KL (both special-cased):
the plain formula goes to 0 at both ends. In between, JSD(beta) / beta -> KL(P || Q) as
beta -> 0 and JSD(beta) / (1 - beta) -> KL(Q || P) as beta -> 1, so its gradients behave like
forward KL near 0 and like reverse KL near 1 (tests check both limits numerically).

Temperature ``T`` divides the student's logits and the teacher's log-probs before both are
normalised. Dividing log-probs by ``T`` and renormalising equals dividing the teacher's logits
by ``T``, so the teacher is always asked for temperature-1 log-probs and the loss applies ``T``
once (never twice: TRL PR #6847 is about the two places a temperature can hide).

The teacher comes either as full log-probs ``(B, T, V)`` or as its top-k: log-probs and token
ids ``(B, T, k)``. With top-k, both distributions are restricted to the teacher's k tokens and
renormalised there (k-way distributions), so every divergence stays a true divergence (>= 0)
and the gradient is exact for that restricted problem. With ``k = V`` it equals the full loss;
with small k it ignores the tail mass (reported as ``teacher_topk_mass``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch

from miniray.rl.losses import masked_mean

__all__ = [
    "LOSSES",
    "DistillLoss",
    "LossName",
    "distillation_loss",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "is_on_policy",
    "on_policy_schedule",
    "restrict_to_topk",
    "reverse_kl",
]

LossName = Literal["forward_kl", "reverse_kl", "jsd"]
LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

# Log-probs below this are treated as probability 0. A teacher may send -inf (a token it will
# never emit); exp(-inf) * (-inf - x) is NaN, and NaN in one position poisons the whole batch.
_LOG_FLOOR = -1e4


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from normalised log-probs."""
    p_logp = p_logp.clamp(min=_LOG_FLOOR)
    q_logp = q_logp.clamp(min=_LOG_FLOOR)
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: (..., V) log-probs -> (...)."""
    _check_pair(student_logp, teacher_logp)
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per position: (..., V) log-probs -> (...)."""
    _check_pair(student_logp, teacher_logp)
    return _kl(student_logp, teacher_logp)


def generalized_jsd(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per position (see the module docstring)."""
    _check_beta(beta)
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    _check_pair(student_logp, teacher_logp)
    s = student_logp.clamp(min=_LOG_FLOOR)
    t = teacher_logp.clamp(min=_LOG_FLOOR)
    mixture = torch.logsumexp(
        torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0
    )  # log M, M = beta * P + (1 - beta) * Q
    return beta * _kl(t, mixture) + (1.0 - beta) * _kl(s, mixture)


def divergence(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    *,
    loss: LossName,
    beta: float = 0.5,
) -> torch.Tensor:
    """The per-position divergence named ``loss`` (``beta`` is used by ``jsd`` only)."""
    if loss == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if loss == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    if loss == "jsd":
        return generalized_jsd(student_logp, teacher_logp, beta)
    raise ValueError(f"loss={loss!r} is unknown: must be one of {list(LOSSES)}")


def restrict_to_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on the teacher's top-k tokens, each renormalised there.

    ``student_logits`` (B, T, V); ``teacher_topk_*`` (B, T, k) with distinct ids per row.
    Returns two (B, T, k) tensors of normalised log-probs at ``temperature``.
    """
    _check_temperature(temperature)
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} and "
            f"teacher_topk_indices {tuple(teacher_topk_indices.shape)} must have the same shape"
        )
    if teacher_topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k of shape {tuple(teacher_topk_indices.shape)} does not match "
            f"student_logits of shape {tuple(student_logits.shape)}: must be (B, T, k) and "
            "(B, T, V)"
        )
    vocab = student_logits.shape[-1]
    indices = teacher_topk_indices.long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(
            f"teacher_topk_indices hold ids in [{int(indices.min())}, {int(indices.max())}]: "
            f"must be in [0, {vocab}) (the student's vocabulary size); do student and teacher "
            "share a tokenizer?"
        )
    student = student_logits.float().gather(-1, indices) / temperature
    teacher = teacher_topk_logprobs.float().clamp(min=_LOG_FLOOR) / temperature
    return torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1)


@dataclass
class DistillLoss:
    """The scalar to backpropagate and per-batch diagnostics (plain floats, no graph)."""

    loss: torch.Tensor
    num_tokens: int
    teacher_topk_mass: float  # mean teacher probability on the support the loss saw (1 = full)
    student_topk_mass: float  # the same for the student, at the loss temperature


def distillation_loss(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    loss: LossName = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> DistillLoss:
    """Mean divergence over the positions where ``mask`` is 1 (the response tokens).

    Give the teacher either as ``teacher_logprobs`` (B, T, V) or as ``teacher_topk_logprobs``
    plus ``teacher_topk_indices`` (B, T, k). ``mask`` (B, T) is 1 where row ``t`` predicts a
    response token; prompt and padding rows are 0 and contribute nothing. The mean is over
    unmasked tokens of the whole batch (a long response weighs more than a short one).
    """
    _check_temperature(temperature)
    if student_logits.dim() != 3:
        raise ValueError(
            f"student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match student_logits of shape "
            f"{tuple(student_logits.shape)}: must be (B, T)"
        )
    full = teacher_logprobs is not None
    topk = teacher_topk_logprobs is not None or teacher_topk_indices is not None
    if full == topk:
        raise ValueError(
            "distillation_loss needs the teacher as exactly one of teacher_logprobs (B, T, V) "
            "or teacher_topk_logprobs + teacher_topk_indices (B, T, k)"
        )
    if full:
        assert teacher_logprobs is not None
        if teacher_logprobs.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logprobs of shape {tuple(teacher_logprobs.shape)} must equal "
                f"student_logits' shape {tuple(student_logits.shape)}"
            )
        student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        teacher_logp = torch.log_softmax(
            teacher_logprobs.float().clamp(min=_LOG_FLOOR) / temperature, dim=-1
        )
        teacher_mass = torch.ones_like(mask, dtype=torch.float32)
        student_mass = torch.ones_like(mask, dtype=torch.float32)
    else:
        if teacher_topk_logprobs is None or teacher_topk_indices is None:
            raise ValueError(
                "teacher top-k needs both teacher_topk_logprobs and teacher_topk_indices"
            )
        student_logp, teacher_logp = restrict_to_topk(
            student_logits,
            teacher_topk_logprobs,
            teacher_topk_indices,
            temperature=temperature,
        )
        with torch.no_grad():
            teacher_mass = teacher_topk_logprobs.float().exp().sum(-1)
            scaled = torch.log_softmax(student_logits.detach().float() / temperature, dim=-1)
            student_mass = scaled.gather(-1, teacher_topk_indices.long()).exp().sum(-1)
    per_token = divergence(student_logp, teacher_logp, loss=loss, beta=beta)
    value = masked_mean(per_token, mask)
    num_tokens = int(mask.sum().item())
    return DistillLoss(
        loss=value,
        num_tokens=num_tokens,
        teacher_topk_mass=float(masked_mean(teacher_mass, mask)) if num_tokens else 0.0,
        student_topk_mass=float(masked_mean(student_mass, mask)) if num_tokens else 0.0,
    )


# -- the lmbda rule ------------------------------------------------------------------------------
def is_on_policy(lmbda: float, *, seed: int, batch_index: int) -> bool:
    """Whether batch ``batch_index`` trains on the student's own generations (else on the
    dataset's ground-truth responses): ``u < lmbda`` with ``u ~ U[0, 1)``.

    ``u`` comes from a generator seeded by ``(seed, batch_index)`` alone, so the decision does
    not depend on how many batches a pipelined scheduler asked about before (TRL draws from the
    global ``random`` in call order, which a prefetching scheduler would change). ``lmbda = 0``
    is never on-policy, ``lmbda = 1`` always (TRL's ``<=`` could fire at 0 when ``u == 0``).
    """
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda={lmbda!r} is invalid: must be in [0, 1]")
    if batch_index < 0:
        raise ValueError(f"batch_index={batch_index} is invalid: must be >= 0")
    return random.Random(f"gkd-lmbda-{seed}-{batch_index}").random() < lmbda


def on_policy_schedule(lmbda: float, *, seed: int, num_batches: int) -> list[bool]:
    """``is_on_policy`` for batches ``0 .. num_batches - 1``."""
    return [is_on_policy(lmbda, seed=seed, batch_index=i) for i in range(num_batches)]


# -- checks ----------------------------------------------------------------------------------------
def _check_pair(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> None:
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student log-probs of shape {tuple(student_logp.shape)} and teacher log-probs of "
            f"shape {tuple(teacher_logp.shape)} must have the same shape"
        )


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} is invalid: must be in [0, 1]")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be > 0")
