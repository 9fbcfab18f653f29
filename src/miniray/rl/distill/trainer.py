"""DistillTrainer: the student, its optimizer, and one GKD step on teacher-scored sequences.

A batch is a list of token sequences (prompt + response) and where each response starts. The
student runs teacher-forced over the whole sequence; row ``t`` of its logits predicts token
``t + 1``, exactly like row ``t`` of the teacher's answer, so the two line up row for row. Only
rows that predict a response token count (``response_mask``): the last prompt row, which
predicts the first response token, through the row that predicts the final token (EOS when the
response finished). Nothing after the sequence's end is scored, so no row predicts "the token
after EOS" (verl's mask included that one).

The teacher's top-k (``actor_rollout_ref.teacher.topk``, 0 = the whole vocabulary) is where the
loss lives (``losses.distillation_loss``). With micro-batches the loss is still the mean over
the whole batch's response tokens: each micro-batch's token mean is weighted by its share of
tokens before backward (TRL #4719: averaging micro-batch means over-weights short responses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from miniray.rl.distill.losses import distillation_loss

__all__ = ["DistillBatch", "DistillTrainer", "Teacher", "build_inputs", "response_mask"]


class Teacher(Protocol):
    """What the trainer needs from a teacher (``TeacherClient`` or an in-process one)."""

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        topk: int = 0,
        temperature: float = 1.0,
        timeout: float | None = None,
        allow_partial: bool = False,
    ) -> Any:
        """Scores with ``token_logprobs``/``topk_logprobs``/``topk_indices`` lists and
        ``missing`` (see ``teacher_client.TeacherScores``)."""
        ...


@dataclass
class DistillBatch:
    """Sequences to distill on. ``version`` is the weights version that generated them (the
    trainer's version at sampling time for ground-truth batches, which need no generation)."""

    batch_index: int
    sequences: list[list[int]]
    prompt_lengths: list[int]
    answers: list[str]
    on_policy: bool
    version: int

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.prompt_lengths):
            raise ValueError(
                f"batch {self.batch_index}: {len(self.sequences)} sequences but "
                f"{len(self.prompt_lengths)} prompt_lengths"
            )
        for i, (seq, p) in enumerate(zip(self.sequences, self.prompt_lengths)):
            if not 1 <= p <= len(seq):
                raise ValueError(
                    f"batch {self.batch_index}: prompt_lengths[{i}]={p} is invalid: must be in "
                    f"[1, {len(seq)}] (the sequence's length)"
                )

    @property
    def response_lengths(self) -> list[int]:
        return [len(s) - p for s, p in zip(self.sequences, self.prompt_lengths)]


def response_mask(
    lengths: Sequence[int], prompt_lengths: Sequence[int], width: int
) -> torch.Tensor:
    """(B, width) mask of the rows that predict response tokens; ``width`` = longest - 1."""
    mask = torch.zeros(len(lengths), width)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        mask[i, p - 1 : n - 1] = 1.0
    return mask


def build_inputs(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, L) and the (B, L - 1) response mask."""
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention[i, : len(seq)] = 1
    return ids, attention, response_mask(lengths, prompt_lengths, width - 1)


def teacher_topk(
    scores: Any, lengths: Sequence[int], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's per-sequence top-k padded to (B, width, k); padding rows are masked out
    by the caller and hold harmless finite values."""
    first = next(t for t in scores.topk_logprobs if t is not None)
    k = first.shape[-1]
    logp = torch.zeros(len(lengths), width, k)
    idx = torch.arange(k).expand(len(lengths), width, k).clone()
    for i, n in enumerate(lengths):
        lp, ix = scores.topk_logprobs[i], scores.topk_indices[i]
        if lp is None or ix is None:
            raise ValueError(f"teacher scores lack sequence {i} (missing: {scores.missing})")
        if lp.shape != (n - 1, k) or ix.shape != (n - 1, k):
            raise ValueError(
                f"teacher top-k of sequence {i} has shape {tuple(lp.shape)}/{tuple(ix.shape)}: "
                f"must be ({n - 1}, {k}) for a sequence of {n} tokens"
            )
        logp[i, : n - 1] = lp.float()
        idx[i, : n - 1] = ix.long()
    return logp, idx


class DistillTrainer:
    """The student and its AdamW; ``train_step`` is one optimizer step on one batch."""

    def __init__(
        self,
        model: Any,
        *,
        pad_token_id: int,
        loss: str = "jsd",
        beta: float = 0.5,
        temperature: float = 1.0,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch_size: int | None = None,
        device: str = "cpu",
    ):
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} is invalid: must be >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.pad_token_id = pad_token_id
        self.loss, self.beta, self.temperature = loss, beta, temperature
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=weight_decay
        )
        self.version = 0  # optimizer steps taken = the version of the current weights

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def train_step(self, batch: DistillBatch, scores: Any) -> dict[str, float]:
        """One optimizer step on ``batch`` against the teacher's ``scores``."""
        _check_scores(batch, scores)
        ids, attention, mask = build_inputs(
            batch.sequences, batch.prompt_lengths, self.pad_token_id
        )
        lengths = [len(s) for s in batch.sequences]
        t_logp, t_idx = teacher_topk(scores, lengths, ids.shape[1] - 1)
        total = mask.sum()
        if total == 0:
            raise ValueError(f"batch {batch.batch_index} has no response tokens to train on")
        size = self.micro_batch_size or len(lengths)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = teacher_mass = student_mass = 0.0
        sampled_rkl: list[torch.Tensor] = []
        for start in range(0, len(lengths), size):
            part = slice(start, start + size)
            rows = int(attention[part].sum(-1).max()) - 1  # trim this micro-batch's padding
            logits = self._logits(ids[part, : rows + 1], attention[part, : rows + 1])
            m = mask[part, :rows].to(self.device)
            out = distillation_loss(
                logits,
                m,
                teacher_topk_logprobs=t_logp[part, :rows].to(self.device),
                teacher_topk_indices=t_idx[part, :rows].to(self.device),
                loss=self.loss,  # type: ignore[arg-type]
                beta=self.beta,
                temperature=self.temperature,
            )
            share = out.num_tokens / float(total)
            (out.loss * share).backward()
            loss_sum += out.loss.item() * share
            teacher_mass += out.teacher_topk_mass * share
            student_mass += out.student_topk_mass * share
            if batch.on_policy:
                sampled_rkl.append(self._sampled_rkl(logits.detach(), ids[part], m, scores, start))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.version += 1
        metrics = {
            "loss": loss_sum,
            "grad_norm": float(grad_norm),
            "num_tokens": int(total),
            "teacher_topk_mass": teacher_mass,
            "student_topk_mass": student_mass,
            "response_length_mean": sum(batch.response_lengths) / len(lengths),
            "on_policy": float(batch.on_policy),
        }
        if sampled_rkl:
            # log q(x) - log p(x) at the student's own tokens (Thinking Machines' per-token
            # signal): in expectation KL(student || teacher) when the tokens were sampled at
            # temperature 1 by these weights; one_step_off samples are one version older.
            metrics["sampled_reverse_kl"] = float(torch.cat(sampled_rkl).mean())
        return metrics

    @torch.no_grad()
    def divergence(self, batch: DistillBatch, scores: Any, *, loss: str = "reverse_kl") -> float:
        """Mean per-token divergence of the current student from the teacher on ``batch``
        (at temperature 1, on the teacher's top-k support); no gradient, no step."""
        _check_scores(batch, scores)
        self.model.eval()
        ids, attention, mask = build_inputs(
            batch.sequences, batch.prompt_lengths, self.pad_token_id
        )
        lengths = [len(s) for s in batch.sequences]
        t_logp, t_idx = teacher_topk(scores, lengths, ids.shape[1] - 1)
        logits = self._logits(ids, attention)
        out = distillation_loss(
            logits,
            mask.to(self.device),
            teacher_topk_logprobs=t_logp.to(self.device),
            teacher_topk_indices=t_idx.to(self.device),
            loss=loss,  # type: ignore[arg-type]
        )
        self.model.train()
        return out.loss.item()

    def get_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights (what rollout workers load)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def _logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device))
        return out.logits[:, :-1, : self.vocab_size].float()

    def _sampled_rkl(
        self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, scores: Any, start: int
    ) -> torch.Tensor:
        rows = logits.shape[1]
        student = torch.log_softmax(logits, -1).gather(
            -1, ids[:, 1 : rows + 1, None].to(self.device)
        )
        teacher = torch.zeros(mask.shape, device=self.device)
        for i in range(ids.shape[0]):
            tok = scores.token_logprobs[start + i]
            if tok is not None:
                n = min(rows, tok.shape[0])
                teacher[i, :n] = tok[:n].to(self.device).float()
        diff = student.squeeze(-1) - teacher
        return diff[mask.bool()].cpu()


def _check_scores(batch: DistillBatch, scores: Any) -> None:
    missing = list(getattr(scores, "missing", []))
    if missing:
        raise ValueError(
            f"batch {batch.batch_index}: the teacher did not score sequences {missing[:8]} "
            f"({getattr(scores, 'errors', {})}); refusing to train on a partial batch"
        )
    if len(scores.topk_logprobs) != len(batch.sequences):
        raise ValueError(
            f"batch {batch.batch_index}: {len(scores.topk_logprobs)} teacher answers for "
            f"{len(batch.sequences)} sequences"
        )
    if all(t is None for t in scores.topk_logprobs):
        raise ValueError(
            f"batch {batch.batch_index}: the teacher sent no top-k log-probs; ask with topk >= 1"
        )
