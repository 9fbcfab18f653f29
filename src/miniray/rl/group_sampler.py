"""GroupSampler: how the rollouter makes a group, from its prompt to its scored samples.

    rollouter lane                        GroupSampler                            engine
    new_groups(count, v) ------------->   next positions from the cursor (lock),
                                          rows and prompt ids tokenized at start
    sample(groups, v, lane) ---------->   call(): one engine call continuing every  --> generate
                                          unfinished response; the agent loop ends
                                          each turn (multi-turn); True if a pause or
                                          stop cut it
    finish(groups, lane) ------------->   decode, score (the scorer's threads), stamp
    drop(groups) --------------------->   give the positions back to the cursor (lock)
    generate(count, v, lane) --------->   all four for groups made whole now (the
                                          rollouter's generate_groups / generate_batch)

What the rollouter keeps: the generation loop (lanes, admission control), pause/resume and
weight loads, and the statistics (it merges ``counts`` in). The lock is the rollouter's: the
sender gives stale-rejected positions back to the same cursor under it.

Prompts (``RolloutPrompts``) are read from the ``data.prompt_key`` column (answers from
``data.answer_key``); prompts longer than ``data.max_prompt_length`` tokens are dropped at start
and counted (``prompts_skipped_too_long``) with ``data.filter_overlong_prompts`` (the default),
else refused or cut as ``data.truncation`` says (``prompts.fit_prompt_lengths``). They come from
``data_position.PromptCursor`` in a fixed seeded order; each group records its prompt position
in ``Sample.metadata["prompt_position"]``. A dropped or stale-rejected group gives its position
back, so the prompt is generated again rather than lost, and a resumed run
(``FullyAsyncRollouter.restore_data_position``) issues exactly the prompts not trained before
its checkpoint.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from miniray.rl.config import RLConfig
from miniray.rl.data_position import PromptCursor, PromptOrder
from miniray.rl.dynamic_sampling import REWARD_METRICS_KEY
from miniray.rl.multi_turn import AgentLoop, Conversation, record_conversations
from miniray.rl.prompts import prompt_text, read_training_prompts
from miniray.rl.replica_pool import ReplicaPool
from miniray.rl.replicas import ReplicaFailed
from miniray.rl.rewards import requests_for
from miniray.rl.types import Sample

__all__ = ["GroupSampler", "Rollout", "RolloutPrompts", "sampling_filters"]


def sampling_filters(cfg: RLConfig) -> dict[str, Any]:
    """``top_p`` / ``top_k`` for the engine when ``actor_rollout_ref.rollout`` sets them: an
    engine that cannot filter (a test's fake, a custom one) then fails on the keyword instead
    of sampling unfiltered, and one that never gets asked need not know the keywords."""
    rollout = cfg.actor_rollout_ref.rollout
    filters: dict[str, Any] = {}
    if rollout.top_p < 1.0:
        filters["top_p"] = rollout.top_p
    if rollout.top_k > 0:
        filters["top_k"] = rollout.top_k
    return filters


@dataclass
class RolloutPrompts:
    """The rollouter's prompts: the rows, their token ids and texts as the model sees them, and
    the seeded order and cursor that issue them (``restore_data_position`` replaces the cursor)."""

    rows: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    order: PromptOrder
    cursor: PromptCursor
    dropped: int  # over data.max_prompt_length, at start
    truncated: int  # cut to the limit (data.truncation)

    @classmethod
    def read(cls, cfg: RLConfig, tokenizer: Any, tools: Any) -> RolloutPrompts:
        """Tokenized once, here: the limit needs every length, and the loop then reuses them."""
        data = cfg.data
        prompts = read_training_prompts(data, tokenizer, tools=tools)
        return cls(
            rows=prompts.rows,
            prompt_ids=prompts.token_ids,
            # The prompt as the model sees it (chat messages rendered once, here), for samples.
            prompt_texts=[
                prompt_text(tokenizer, r[data.prompt_key], tools=tools) for r in prompts.rows
            ],
            order=PromptOrder(len(prompts.rows), seed=data.seed, shuffle=data.shuffle),
            cursor=PromptCursor(),
            dropped=prompts.dropped,
            truncated=prompts.truncated,
        )


@dataclass
class Rollout:
    """A group being generated: its prompt position and row, and which responses are done."""

    position: int
    row: dict[str, Any]
    samples: list[Sample]
    done: list[bool] = field(default_factory=list)
    # Multi-turn: each sample's agent state (``multi_turn.Conversation``); empty otherwise.
    conversations: list[Conversation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.done = self.done or [False] * len(self.samples)


class GroupSampler:
    """Makes the rollouter's groups: prompts in, engine calls, scored samples out."""

    def __init__(
        self,
        config: RLConfig,
        prompts: RolloutPrompts,
        *,
        tokenizer: Any,
        agent: AgentLoop | None,
        scorer: Any,
        engine_for: Callable[[int], Any],
        pool: ReplicaPool,
        lock: threading.Condition,
        should_stop: Callable[[], bool],
    ):
        """``engine_for(lane)``: the engine that replica ``lane`` is called through, asked at
        each call (the rollouter owns its engine and loads the weights into it); ``pool``:
        where the calls are counted; ``should_stop``: asked by the engine before every token
        (a pause or a stop)."""
        self.config = config
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.agent = agent
        self.scorer = scorer
        self.engine_for = engine_for
        self.pool = pool
        self._cond = lock
        self._should_stop = should_stop
        self.group_ids = itertools.count()
        self.counts: dict[str, Any] = {
            "groups_generated": 0,
            "groups_aborted": 0,
            "groups_interrupted": 0,
            "groups_partial": 0,
            "generate_seconds": 0.0,
            "prompts_skipped_too_long": prompts.dropped,  # of data.train_files, at start
            "prompts_truncated": prompts.truncated,  # cut to the limit (data.truncation)
            "tool_calls": 0,  # multi-turn: calls made by finished conversations
            "tool_errors": 0,  # ... and how many of them failed (multi_turn.ERROR_KINDS)
        }

    def new_groups(self, count: int, version: int) -> list[Rollout]:
        """The next ``count`` prompts as groups of ``rollout.n`` empty samples (their prompts
        were tokenized at start: tokenizing per call cost the CPU rollouter ~4% of its time)."""
        if count <= 0:
            return []
        cfg, prompts = self.config, self.prompts
        with self._cond:  # the sender gives stale-rejected positions back to the cursor
            positions = [prompts.cursor.next() for _ in range(count)]
        now = time.time()
        groups = []
        for position in positions:
            index = prompts.order.row(position)
            row, prompt_ids = prompts.rows[index], prompts.prompt_ids[index]
            text = prompts.prompt_texts[index]
            group_id = f"g{next(self.group_ids)}"
            samples = [
                Sample(
                    prompt_token_ids=list(prompt_ids),
                    response_token_ids=[],
                    response_logprobs=[],
                    v_start=version,
                    group_id=group_id,
                    created_at=now,
                    prompt=text,
                    metadata={"prompt_position": position},
                )
                for _ in range(cfg.actor_rollout_ref.rollout.n)
            ]
            conversations = [Conversation() for _ in samples] if self.agent else []
            groups.append(
                Rollout(position=position, row=row, samples=samples, conversations=conversations)
            )
        return groups

    def generate(self, count: int, version: int, lane: int = 0) -> list[list[Sample]] | None:
        """``count`` new groups, called on replica ``lane`` until every response is done, then
        scored (``FullyAsyncRollouter.generate_groups``). None if a pause or stop interrupted
        them; then, as when the replica fails (``ReplicaFailed`` goes on to the caller), every
        prompt goes back to the cursor."""
        groups = self.new_groups(count, version)
        try:
            interrupted = self.sample(groups, version, lane)
            while not interrupted and not all(all(g.done) for g in groups):
                interrupted = self.sample(groups, version, lane)
        except ReplicaFailed:
            self.drop(groups)
            raise
        if interrupted:
            self.drop(groups)
            return None
        return self.finish(groups, lane)

    def sample(self, groups: list[Rollout], version: int, lane: int = 0) -> bool:
        """``call`` once; True if interrupted. Multi-turn without partial rollouts: calls
        until every conversation has ended, so a conversation is made by one version (an
        interrupted one is dropped whole, as a single-turn group is)."""
        interrupted = self.call(groups, version, lane)
        whole = self.agent is not None and not self.config.async_training.partial_rollout
        while whole and not interrupted and not all(all(g.done) for g in groups):
            interrupted = self.call(groups, version, lane)
        return interrupted

    def call(self, groups: list[Rollout], version: int, lane: int = 0) -> bool:
        """One engine call continuing every unfinished response of ``groups`` at ``version``.

        Returns True if a pause or stop interrupted it. The tokens sampled before the
        interruption stay with their sample (with the behaviour log-probs of the version that
        sampled them), so a partial rollout continues where it stopped. Multi-turn: a
        response is one model turn, and the agent loop says whether the conversation goes on
        (then its group stays unfinished and the next call continues it).
        """
        cfg = self.config
        limit = cfg.data.max_response_length
        todo = [(g, i) for g in groups for i in range(len(g.samples)) if not g.done[i]]
        samples = [g.samples[i] for g, i in todo]
        budgets = [limit - s.num_response_tokens for s in samples]
        started = time.time()
        gens = self.engine_for(lane).generate(
            [s.prompt_token_ids + s.response_token_ids for s in samples],
            max_new_tokens=max(budgets),  # rows with less room are cut below
            temperature=cfg.actor_rollout_ref.rollout.temperature,
            should_stop=self._should_stop,
            **sampling_filters(cfg),
        )
        took = time.time() - started
        with self._cond:  # lanes count at once
            self.counts["generate_seconds"] += took
        self.pool.record(lane, tokens=sum(len(g.response_token_ids) for g in gens), seconds=took)
        interrupted = False
        turns: list[tuple[Rollout, int, bool]] = []  # multi-turn: (group, row, ended by EOS)
        for (group, index), sample, budget, gen in zip(todo, samples, budgets, gens):
            tokens = list(gen.response_token_ids[:budget])
            if tokens:
                if sample.num_response_tokens == 0:  # the age of a sample is its first token's
                    sample.v_start = sample.v_end = version
                sample.append_tokens(tokens, list(gen.response_logprobs[:budget]), version)
            if gen.finish_reason == "aborted" and sample.num_response_tokens < limit:
                interrupted = True
            elif self.agent is None:
                group.done[index] = True
            else:
                eos = gen.finish_reason == "stop" and len(gen.response_token_ids) <= budget
                turns.append((group, index, eos))
        if turns:
            assert self.agent is not None
            ended = self.agent.end_turns(
                [(g.samples[i], g.conversations[i], eos) for g, i, eos in turns],
                max_response_length=limit,
            )
            for (group, index, _), over in zip(turns, ended):
                group.done[index] = over
        if interrupted:
            with self._cond:
                self.counts["groups_interrupted"] += sum(1 for g in groups if not all(g.done))
        return interrupted

    def drop(self, groups: list[Rollout]) -> None:
        """Give up on ``groups`` (no partial rollouts): their prompts are issued again."""
        with self._cond:
            self.counts["groups_aborted"] += len(groups)
            for group in groups:
                self.prompts.cursor.give_back(group.position)

    def finish(self, groups: Sequence[Rollout], lane: int = 0) -> list[list[Sample]]:
        """Score complete groups (one scorer call for all: a fast reward function then runs
        them as one pool task, ``RewardScorer``); their samples get rewards and a finishing
        time. The reward function's other numeric fields go to
        ``metadata["reward_metrics"]``, the rest to ``metadata["reward_fields"]``."""
        if not groups:
            return []
        requests = []
        for group in groups:
            for sample in group.samples:
                sample.response = self.tokenizer.decode(
                    sample.response_token_ids, skip_special_tokens=True
                )
            prompt = group.samples[0].prompt
            asked = requests_for(group.row, [s.response for s in group.samples], prompt)
            if group.conversations:  # the reward also sees the calls made (extra_info)
                asked = record_conversations(asked, group.samples, group.conversations)
            requests.extend(asked)
        rewards = self.scorer.score(requests)
        now = time.time()
        start = 0
        for group in groups:
            size = len(group.samples)
            for sample, reward in zip(group.samples, rewards[start : start + size], strict=True):
                if reward.metrics:
                    sample.metadata[REWARD_METRICS_KEY] = dict(reward.metrics)
                if reward.fields:
                    sample.metadata["reward_fields"] = dict(reward.fields)
                sample.finish(reward.score, now=now)
            start += size
            with self._cond:
                self.counts["groups_generated"] += 1
                if any(s.v_end > s.v_start for s in group.samples):
                    self.counts["groups_partial"] += 1
                for conversation in group.conversations:
                    self.counts["tool_calls"] += len(conversation.calls)
                    self.counts["tool_errors"] += sum(conversation.errors.values())
            self.pool.record(lane, groups=1)
        return [group.samples for group in groups]
