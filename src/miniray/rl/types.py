"""The RL layer's value types: ``Sample`` (with version stamps) and ``Batch`` (samples collated
into padded tensors), which flow from the rollouter to the trainer; ``SyncResult``, what one weight
sync did; ``TeacherScores``, what the teacher answered. Plain data, so the behaviour modules and
``errors`` (whose exceptions carry results) all import them from here and never each other.

A sample carries the behaviour log-probs recorded at generation (one per response token), so
the trainer can correct for off-policy data (decoupled PPO) without re-running the old policy,
and its version stamps, so everyone computes its age the same way (``staleness.sample_age``).
A multi-turn sample (``rl.multi_turn``) also carries ``response_mask``: its response interleaves
the model's turns with tool observations, and only the model's tokens (mask 1) are trained on,
weighed or counted as generated; ``collate`` turns it into ``Batch.response_mask``.
torch is imported only by ``collate``: the queue and the rollouter's bookkeeping need none.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from miniray.rl.staleness import check_version, in_flight_span, sample_age

if TYPE_CHECKING:
    import torch

__all__ = ["Batch", "Sample", "SyncResult", "TeacherScores", "collate"]


class _SampleIds:
    """Ids unique across processes: a random prefix per process and a counter. ``uuid4`` per
    sample read ``os.urandom`` each time, 5% of the demo rollouter's busy time under py-spy
    (128 samples per ~40 ms step, two busy cores); a counter costs a tenth of that."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix, self.counter = uuid.uuid4().hex[:16], itertools.count()

    def new(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_SAMPLE_IDS = _SampleIds()
os.register_at_fork(after_in_child=_SAMPLE_IDS.reset)  # a child must not repeat its parent's ids


def new_sample_id() -> str:
    """A fresh ``Sample.sample_id``: 32 hex digits, unique across the run's processes."""
    return _SAMPLE_IDS.new()


@dataclass(kw_only=True)
class Sample:
    """One prompt and one generated response, stamped with versions and times.

    ``created_at``/``finished_at`` are wall-clock seconds (``time.time()``), comparable across
    the processes of one machine. ``group_id`` ties the responses to one prompt together (GRPO
    normalises rewards within a group).
    """

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    v_start: int
    v_end: int = -1  # -1: the same as v_start (set in __post_init__)
    response_logprobs: list[float] | None = None
    reward: float | None = None
    group_id: str = ""
    sample_id: str = field(default_factory=new_sample_id)
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    prompt: str = ""
    response: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # One 0/1 per response token: 1 the model generated it, 0 an observation (a tool's result
    # appended by the agent loop). None: every response token is the model's (single turn).
    response_mask: list[int] | None = None

    def __post_init__(self) -> None:
        check_version(self.v_start, "Sample.v_start")
        if self.v_end == -1:
            self.v_end = self.v_start
        check_version(self.v_end, "Sample.v_end")
        in_flight_span(self.v_start, self.v_end)  # raises when v_end < v_start
        for name in ("prompt_token_ids", "response_token_ids"):
            if not isinstance(getattr(self, name), list):
                raise TypeError(
                    f"Sample.{name} must be a list of token ids, "
                    f"got {type(getattr(self, name)).__name__}"
                )
        self._check_logprobs()
        self._check_mask()
        if self.finished_at is not None and self.finished_at < self.created_at:
            raise ValueError(
                f"Sample.finished_at={self.finished_at} is invalid: must be >= "
                f"created_at={self.created_at}"
            )

    def _check_logprobs(self) -> None:
        if self.response_logprobs is not None and len(self.response_logprobs) != len(
            self.response_token_ids
        ):
            raise ValueError(
                f"Sample.response_logprobs has {len(self.response_logprobs)} entries: must "
                f"have one per response token ({len(self.response_token_ids)})"
            )

    def _check_mask(self) -> None:
        mask = self.response_mask
        if mask is None:
            return
        if len(mask) != len(self.response_token_ids):
            raise ValueError(
                f"Sample.response_mask has {len(mask)} entries: must have one per response "
                f"token ({len(self.response_token_ids)})"
            )
        if any(m not in (0, 1) for m in mask):
            raise ValueError(
                f"Sample.response_mask={mask} is invalid: entries must be 0 (observation) or "
                "1 (generated)"
            )

    @property
    def num_response_tokens(self) -> int:
        """Every response token, observations included (what ``max_response_length`` caps)."""
        return len(self.response_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        """The response tokens the model generated (observations excluded)."""
        if self.response_mask is None:
            return len(self.response_token_ids)
        return sum(self.response_mask)

    def age(self, v_trainer_now: int) -> int:
        """Versions between the weights that started this sample and the trainer's now."""
        return sample_age(v_trainer_now, self.v_start)

    @property
    def in_flight_span(self) -> int:
        return in_flight_span(self.v_start, self.v_end)

    @property
    def duration_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.created_at

    def append_tokens(
        self, token_ids: Sequence[int], logprobs: Sequence[float] | None, version: int
    ) -> None:
        """Continue a partial rollout with tokens generated at ``version`` (moves ``v_end``).

        ``v_start`` never changes: the age of a sample is that of its oldest tokens.
        """
        check_version(version, "version")
        if version < self.v_end:
            raise ValueError(
                f"version={version} is invalid: tokens cannot come from a version older than "
                f"the sample's v_end={self.v_end}"
            )
        if (logprobs is None) != (self.response_logprobs is None):
            raise ValueError(
                "logprobs must be given exactly when the sample records response_logprobs"
            )
        self.response_token_ids.extend(token_ids)
        if logprobs is not None:
            assert self.response_logprobs is not None
            self.response_logprobs.extend(logprobs)
        if self.response_mask is not None:
            self.response_mask.extend([1] * len(token_ids))
        self._check_logprobs()
        self._check_mask()
        self.v_end = version

    def append_observation(self, token_ids: Sequence[int]) -> None:
        """Append tokens the model did not generate (a tool's result in the chat template's
        tool role): mask 0, so no loss, entropy or behaviour weight, and a log-prob of 0 as a
        placeholder nothing reads. The versions do not move: no weights produced them."""
        if self.response_mask is None:
            self.response_mask = [1] * len(self.response_token_ids)
        self.response_token_ids.extend(token_ids)
        self.response_mask.extend([0] * len(token_ids))
        if self.response_logprobs is not None:
            self.response_logprobs.extend([0.0] * len(token_ids))
        self._check_logprobs()
        self._check_mask()

    def finish(self, reward: float | None = None, *, now: float | None = None) -> None:
        self.finished_at = time.time() if now is None else now
        if reward is not None:
            self.reward = float(reward)


@dataclass(kw_only=True)
class Batch:
    """Samples collated for training: prompts left-padded, responses right-padded.

    ``input_ids = [prompt | response]`` of shape (B, P + R); ``response_mask`` (B, R) is 1 on
    the response tokens the model generated (0 on padding and on a multi-turn sample's
    observations, which ``attention_mask`` still covers); ``behaviour_logprobs`` (B, R) holds the recorded log-probs (0 on
    padding); ``rewards`` (B,); ``v_start`` (B,) the version stamps.
    """

    samples: list[Sample]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor | None
    rewards: torch.Tensor
    v_start: torch.Tensor
    group_index: torch.Tensor
    prompt_length: int

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def select(self, rows: torch.Tensor) -> Batch:
        """The rows ``rows`` (a 1-D index tensor) as a batch of their own: a minibatch. The
        padding stays as it is (every response still starts at ``prompt_length``)."""
        index = rows.tolist()
        return Batch(
            samples=[self.samples[i] for i in index],
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            behaviour_logprobs=(
                None if self.behaviour_logprobs is None else self.behaviour_logprobs[rows]
            ),
            rewards=self.rewards[rows],
            v_start=self.v_start[rows],
            group_index=self.group_index[rows],
            prompt_length=self.prompt_length,
        )

    def trimmed(self) -> Batch:
        """The same rows without the padding columns no row of theirs needs: the prompt's left
        padding every row has and the response's right padding every row has (a micro-batch
        of short responses should not pay for the batch's longest). Responses keep starting
        at column ``prompt_length``; (B, R) tensors shrink to the new R from the right."""
        # The attention mask, not the response mask: an observation inside a response is a
        # real column the model reads, though no loss falls on it.
        lengths = self.attention_mask[:, self.prompt_length :].sum(-1)
        keep_r = max(1, int(lengths.max().item())) if len(self) else 1
        prompt_real = self.attention_mask[:, : self.prompt_length].sum(-1)
        keep_p = max(1, int(prompt_real.max().item())) if len(self) else self.prompt_length
        drop = self.prompt_length - keep_p
        end = self.prompt_length + keep_r
        return Batch(
            samples=self.samples,
            input_ids=self.input_ids[:, drop:end],
            attention_mask=self.attention_mask[:, drop:end],
            response_mask=self.response_mask[:, :keep_r],
            behaviour_logprobs=(
                None if self.behaviour_logprobs is None else self.behaviour_logprobs[:, :keep_r]
            ),
            rewards=self.rewards,
            v_start=self.v_start,
            group_index=self.group_index,
            prompt_length=keep_p,
        )

    def to(self, device: Any) -> Batch:
        """The batch with its tensors on ``device`` (the trainer rank's)."""
        import dataclasses

        import torch

        moved: dict[str, Any] = {
            f.name: value.to(device)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def collate(samples: Sequence[Sample], *, pad_token_id: int) -> Batch:
    """Pad ``samples`` into one ``Batch``; every sample must have a reward."""
    import torch

    if not samples:
        raise ValueError("collate() needs at least one sample, got an empty list")
    missing = [i for i, s in enumerate(samples) if s.reward is None]
    if missing:
        raise ValueError(
            f"collate(): sample {missing[0]} (id {samples[missing[0]].sample_id}) has no "
            "reward; score samples before training on them"
        )
    with_logprobs = [s.response_logprobs is not None for s in samples]
    if any(with_logprobs) and not all(with_logprobs):
        raise ValueError("collate(): either every sample has response_logprobs or none does")
    prompt_len = max(len(s.prompt_token_ids) for s in samples)
    response_len = max(1, max(s.num_response_tokens for s in samples))
    # Rows are padded as Python lists and turned into tensors once per field: writing them
    # into preallocated tensors row by row took ~17 ms for 128 samples, a quarter of the demo's
    # training step.
    ids, attention, response_mask, logprobs = [], [], [], []
    groups: dict[str, int] = {}
    group_index = []
    for s in samples:
        p, r = len(s.prompt_token_ids), s.num_response_tokens
        left, right = prompt_len - p, response_len - r
        # Left-pad prompts so every response starts at the same column.
        ids.append(
            [pad_token_id] * left
            + s.prompt_token_ids
            + s.response_token_ids
            + [pad_token_id] * right
        )
        attention.append([0] * left + [1] * (p + r) + [0] * right)
        model_tokens = [1.0] * r if s.response_mask is None else [float(m) for m in s.response_mask]
        response_mask.append(model_tokens + [0.0] * right)
        if s.response_logprobs is not None:
            logprobs.append([*s.response_logprobs, *([0.0] * right)])
        group_index.append(groups.setdefault(s.group_id or s.sample_id, len(groups)))
    return Batch(
        samples=list(samples),
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(attention, dtype=torch.long),
        response_mask=torch.tensor(response_mask, dtype=torch.float32),
        behaviour_logprobs=(
            torch.tensor(logprobs, dtype=torch.float32) if all(with_logprobs) else None
        ),
        rewards=torch.tensor([float(s.reward or 0.0) for s in samples], dtype=torch.float32),
        v_start=torch.tensor([s.v_start for s in samples], dtype=torch.long),
        group_index=torch.tensor(group_index, dtype=torch.long),
        prompt_length=prompt_len,
    )


@dataclass
class SyncResult:
    """What one sync did: outcome, versions, attempts, seconds per phase and bytes moved."""

    status: Literal["ok", "failed", "timeout", "refused"]
    version: int
    previous_version: int
    current_version: int
    attempts: int = 0
    pause_s: float = 0.0
    transfer_s: float = 0.0
    load_s: float = 0.0
    resume_s: float = 0.0
    total_s: float = 0.0
    bytes: int = 0
    resumed: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TeacherScores:
    """Per-sequence teacher outputs, in the order of the sequences given to ``score``.

    For a sequence of length ``L``: ``token_logprobs[i]`` float32 ``[L - 1]`` (row ``t`` is
    ``log p(seq[t + 1] | seq[: t + 1])``), ``topk_logprobs[i]`` float32 ``[L - 1, k]`` and
    ``topk_indices[i]`` int64 ``[L - 1, k]`` (sorted, most likely first; None when ``topk=0``).
    Entries are None only for the sequences listed in ``missing``; ``errors`` says why.
    """

    token_logprobs: list[torch.Tensor | None]
    topk_logprobs: list[torch.Tensor | None]
    topk_indices: list[torch.Tensor | None]
    missing: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    attempts: int = 1
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.missing

    def __len__(self) -> int:
        return len(self.token_logprobs)
