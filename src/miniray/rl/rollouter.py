"""FullyAsyncRollouter: generates groups of responses continuously and puts them in the queue.

    generation thread                           actor methods (other threads)
    loop: wait while paused  <------------------ pause_rollout(): set paused, stop the current
          admit? (staleness room)                  generation at the next token, wait until
          generate groups at version v             the loop is idle; returns True
          score, stamp v_start=v, hand them      resume_rollout(): clear paused, wake the loop
          to the sender ---> sender thread:      load_weights(w, v): only while paused
                             put(v) -> queue (rejects what is already too stale), count
                             the answer (generation goes on meanwhile)
    on error (either thread): record it, close the queue with that error

Admission control (``staleness.admission_capacity``) keeps the rollouter from running more
than ``staleness_threshold`` versions ahead of the trainer, so the queue's stale rejections stay
rare. One engine call samples ``groups_per_call()`` groups at once.

A generation interrupted by a pause (a weight sync) keeps the tokens it has, with their
behaviour log-probs, and continues in the next call with the new weights
(``async_training.partial_rollout``, on by default): then ``v_end > v_start``, no work is
thrown away, and long responses are not starved by frequent syncs. With ``partial_rollout``
off, interrupted groups are dropped and their prompts issued again.

Prompts are read from the ``data.prompt_key`` column (answers from ``data.answer_key``);
prompts longer than ``data.max_prompt_length`` tokens are dropped at start and counted
(``prompts_skipped_too_long``) with ``data.filter_overlong_prompts`` (the default), else
refused or cut as ``data.truncation`` says (``prompts.fit_prompt_lengths``). They come from
``data_position.PromptCursor`` in a fixed seeded order; each group records its prompt position
in ``Sample.metadata["prompt_position"]``. A dropped or stale-rejected group gives its position
back, so the prompt is generated again rather than lost, and a resumed run
(``restore_data_position``) issues exactly the prompts not trained before its checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import miniray
from miniray.config import from_dict
from miniray.rl.compat import actor_constructor
from miniray.rl.config import RLConfig
from miniray.rl.data_position import PromptCursor, PromptOrder, TrainedPositions
from miniray.rl.dynamic_sampling import REWARD_METRICS_KEY
from miniray.rl.endpoints import Pending, call
from miniray.rl.multi_turn import Conversation, agent_loop_of, record_conversations
from miniray.rl.prompts import fit_prompt_lengths, load_prompts, prompt_text, prompt_token_ids
from miniray.rl.replicas import (
    REPLICA_OPTIONS,
    EngineReplica,
    RemoteEngine,
    ReplicaFailed,
    replica_count,
    replica_engine,
)
from miniray.rl.rewards import build_scorer, requests_for
from miniray.rl.staleness import admission_capacity
from miniray.rl.tracking import peak_rss_gib
from miniray.rl.types import Sample

RewardFn = Callable[[str, str], float]
CALL_TIMEOUT_S = 60.0

logger = logging.getLogger(__name__)


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


def as_rl_config(config: Any) -> RLConfig:
    return config if isinstance(config, RLConfig) else from_dict(RLConfig, dict(config))


@dataclass
class _Rollout:
    """A group being generated: its prompt position and row, and which responses are done."""

    position: int
    row: dict[str, Any]
    samples: list[Sample]
    done: list[bool] = field(default_factory=list)
    # Multi-turn: each sample's agent state (``multi_turn.Conversation``); empty otherwise.
    conversations: list[Conversation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.done = self.done or [False] * len(self.samples)


class FullyAsyncRollouter:
    """Generates continuously with a generation engine; answers pause/resume while it does."""

    # Threaded: pause_rollout must run while the generation loop holds another thread.
    remote = actor_constructor(kind="remote", max_concurrency=8)
    options = actor_constructor(kind="options", max_concurrency=8)

    def __init__(
        self,
        config: Any,
        queue: Any = None,
        *,
        engine: Any = None,
        reward_fn: RewardFn | None = None,
        seed: int | None = None,
        engine_factory: Callable[[int], Any] | None = None,
    ):
        """``seed``: the engine's sampling seed; None: ``trainer.seed`` (the same seed samples
        the same tokens). ``engine``: the engine of a one-replica rollouter, in this process;
        ``engine_factory(i)``: builds replica ``i``'s engine, in its own process with several
        replicas (``replicas.replica_count``), instead of the one ``rollout.name`` names."""
        self.config = as_rl_config(config)
        cfg = self.config
        from miniray.rl.models.tiny import load_options, load_tokenizer

        model = cfg.actor_rollout_ref.model
        options = load_options(model, device="cpu")
        self.seed = cfg.trainer.seed if seed is None else seed
        self.num_replicas = replica_count(cfg)
        self._engine_factory = engine_factory
        if self.num_replicas > 1 and engine is not None:
            raise ValueError(
                f"rollout.nnodes x rollout.n_gpus_per_node asks for {self.num_replicas} rollout "
                "replicas, each an actor with its own engine: pass engine_factory (called in "
                "each replica's process), not one engine"
            )
        if engine is None and self.num_replicas == 1:
            engine = replica_engine(cfg, 0, self.seed, engine_factory)
        self.engine = engine  # one replica: called in this process; several: None
        # Several replicas: one RemoteEngine each (started below), its restarts left.
        self._replicas: list[RemoteEngine] = []
        self._restarts_left: list[int] = []
        self._weights_ref: Any = None  # the last weights loaded (a restarted replica's)
        self._weights_version = 0
        self.tokenizer = load_tokenizer(model.path, trust_remote_code=options["trust_remote_code"])
        data = cfg.data
        rows: list[dict[str, Any]] = []
        names: list[str] = []
        for path in data.train_files:
            read = load_prompts(path, prompt_key=data.prompt_key, answer_key=data.answer_key)
            rows.extend(read)
            names.extend(f"{path}: row {i}" for i in range(len(read)))
        if not rows:
            raise ValueError(f"data.train_files={data.train_files} hold no prompts")
        # Multi-turn (actor_rollout_ref.rollout.multi_turn): ends each model turn, running its
        # tool calls; None: a rollout is one response. Its tools' schemas go into the prompts.
        self.agent = agent_loop_of(cfg, self.tokenizer)
        tools = self.agent.registry.schemas if self.agent else None
        # Tokenized once, here: the limit needs every length, and the loop then reuses them.
        ids = prompt_token_ids(self.tokenizer, [row[data.prompt_key] for row in rows], tools=tools)
        fitted = fit_prompt_lengths(ids, data, row_name=names.__getitem__)
        self.rows = [rows[i] for i in fitted.kept]
        self.prompt_ids = fitted.token_ids
        skipped = fitted.dropped
        if not self.rows:
            raise ValueError(
                f"data.max_prompt_length={data.max_prompt_length} is invalid for "
                f"data.train_files={data.train_files}: every one of the {len(rows)} prompts is "
                f"longer (the shortest has {min(len(i) for i in ids)} tokens, BOS included), "
                "and data.filter_overlong_prompts=true drops longer prompts; raise "
                "data.max_prompt_length (or cut them: data.filter_overlong_prompts=false "
                "data.truncation=left|right)"
            )
        if skipped:
            logger.warning(
                "dropped %d of %d prompts longer than data.max_prompt_length=%d tokens "
                "(data.filter_overlong_prompts=true)",
                skipped,
                len(rows),
                data.max_prompt_length,
            )
        if fitted.truncated:
            logger.warning(
                "cut %d of %d prompts to data.max_prompt_length=%d tokens (data.truncation=%s)",
                fitted.truncated,
                len(rows),
                data.max_prompt_length,
                data.truncation,
            )
        self.queue = queue
        # Rewards are scored on the scorer's threads, each call within its deadline.
        self.scorer = build_scorer(cfg, reward_fn, self.rows)
        # The prompt as the model sees it (chat messages rendered once, here), for samples.
        self.prompt_texts = [
            prompt_text(self.tokenizer, r[data.prompt_key], tools=tools) for r in self.rows
        ]
        self.order = PromptOrder(len(self.rows), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.cursor = PromptCursor()
        self._resumed_groups = 0  # groups trained before the checkpoint this run resumed from
        # Groups the trainer consumed and discarded (dynamic sampling): they trained no
        # version, so they give their staleness room back (``discard_groups``).
        self._discarded_groups = 0
        self._unfinished: list[_Rollout] = []  # partial rollouts waiting for the next call
        # Finished groups the sender thread has not put yet, and how many it is putting now.
        self._outbox: list[list[Sample]] = []
        self._sending = 0
        self._sender: threading.Thread | None = None
        self._sender_stop = False
        self._waiting: tuple[str, float] | None = None  # (idle counter, since) while waiting
        self.group_ids = itertools.count()
        self.version = 0
        self._cond = threading.Condition()
        self._paused = False
        self._interrupt_at = 0.0  # monotonic time a pause interrupts the running engine call
        self._generating = 0  # lanes inside an engine call
        self._in_flight = 0  # groups taken by a lane and not yet unfinished or offered
        self._stop = False
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self.stats = {
            "groups_generated": 0,
            "groups_accepted": 0,
            "groups_rejected_stale": 0,
            "groups_rejected_full": 0,
            "groups_aborted": 0,
            "groups_interrupted": 0,
            "groups_partial": 0,
            "generate_seconds": 0.0,
            "idle_seconds": 0.0,  # waiting, for either of the two reasons below
            "idle_paused_seconds": 0.0,  # paused (a weight sync)
            "idle_throttled_seconds": 0.0,  # no admission room (staleness bound)
            "started_at": time.time(),
            "prompts_skipped_too_long": skipped,  # of data.train_files, at start
            "prompts_truncated": fitted.truncated,  # cut to the limit (data.truncation)
            "replica_failures": 0,
            "replica_restarts": 0,
            "tool_calls": 0,  # multi-turn: calls made by finished conversations
            "tool_errors": 0,  # ... and how many of them failed (multi_turn.ERROR_KINDS)
        }
        # Per replica: groups finished, tokens generated, seconds in engine calls, failures;
        # the node it runs on (None: one replica, this process) and the weights version it
        # loaded last (None: none yet, the engine has model.path's).
        self.replica_stats: list[dict[str, Any]] = [
            {
                "groups": 0,
                "tokens": 0,
                "generate_seconds": 0.0,
                "failures": 0,
                "missed_syncs": 0,
                "alive": True,
                "node": None,
                "loaded_version": None,
            }
            for _ in range(self.num_replicas)
        ]
        # Read whatever the count: one replica (this process) has nothing to restart.
        max_restarts = cfg.rollout.max_restarts
        for index in range(self.num_replicas if self.num_replicas > 1 else 0):
            self._replicas.append(self._start_replica(index))
            self._restarts_left.append(max_restarts)
        # Started together above, so they come up in parallel; each then says its node (the
        # answer waits until its engine is built: its start, bounded as a trainer rank's by
        # nccl_timeout, not generation_timeout). One that fails to come up is restarted.
        deadline = time.monotonic() + cfg.actor_rollout_ref.nccl_timeout
        for replica in list(self._replicas):
            try:
                self._record_node(replica, deadline)
            except ReplicaFailed as failure:
                self._replica_failed(replica.index, [], failure)

    def _start_replica(self, index: int) -> RemoteEngine:
        handle = EngineReplica.options(**REPLICA_OPTIONS).remote(
            self.config, index, self.seed + index, self._engine_factory
        )
        return RemoteEngine(index, handle, self.config.async_training.generation_timeout)

    def _record_node(self, replica: RemoteEngine, deadline: float) -> None:
        node = replica.wait(replica.handle.node.remote(), "start", deadline)
        with self._cond:
            self.replica_stats[replica.index]["node"] = node

    # -- generation -------------------------------------------------------------------------
    def groups_per_call(self) -> int:
        """Groups sampled in one engine call: ``max_concurrent_rollouts // rollout.n``, >= 1.

        One call for several prompts amortizes the engine's per-step overhead (on the CPU a
        call for 16 groups costs ~6x less per group than 16 calls); the admission control
        still counts every group, so the staleness bound holds for the whole call.
        """
        cfg = self.config
        return max(1, cfg.async_training.max_concurrent_rollouts // cfg.actor_rollout_ref.rollout.n)

    def generate_group(self, version: int | None = None) -> list[Sample] | None:
        """One prompt, ``rollout.n`` responses, scored and stamped; None if interrupted."""
        groups = self.generate_groups(1, version)
        return None if groups is None else groups[0]

    def generate_groups(
        self, num_groups: int, version: int | None = None, lane: int = 0
    ) -> list[list[Sample]] | None:
        """``num_groups`` prompts, ``rollout.n`` responses each, in one engine call (on replica
        ``lane``); scored and stamped. None if interrupted or the replica failed: then every
        prompt goes back to the cursor. Multi-turn: one call per turn until every conversation
        has ended."""
        v = self.version if version is None else version
        groups = self._new_groups(num_groups, v)
        try:
            interrupted = self._sample(groups, v, lane)
            while not interrupted and not all(all(g.done) for g in groups):
                interrupted = self._sample(groups, v, lane)
        except ReplicaFailed as failure:
            self._drop(groups)
            self._replica_failed(lane, [], failure)
            return None
        if interrupted:
            self._drop(groups)
            return None
        return [self._finish(group, lane) for group in groups]

    def _new_groups(self, count: int, version: int) -> list[_Rollout]:
        """The next ``count`` prompts as groups of ``rollout.n`` empty samples (their prompts
        were tokenized at start: tokenizing per call cost the CPU rollouter ~4% of its time)."""
        if count <= 0:
            return []
        cfg = self.config
        with self._cond:  # the sender gives stale-rejected positions back to the cursor
            positions = [self.cursor.next() for _ in range(count)]
        now = time.time()
        groups = []
        for position in positions:
            index = self.order.row(position)
            row, prompt_ids = self.rows[index], self.prompt_ids[index]
            text = self.prompt_texts[index]
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
                _Rollout(position=position, row=row, samples=samples, conversations=conversations)
            )
        return groups

    def _sample(self, groups: list[_Rollout], version: int, lane: int = 0) -> bool:
        """``_call`` once; True if interrupted. Multi-turn without partial rollouts: calls
        until every conversation has ended, so a conversation is made by one version (an
        interrupted one is dropped whole, as a single-turn group is)."""
        interrupted = self._call(groups, version, lane)
        whole = self.agent is not None and not self.config.async_training.partial_rollout
        while whole and not interrupted and not all(all(g.done) for g in groups):
            interrupted = self._call(groups, version, lane)
        return interrupted

    def _call(self, groups: list[_Rollout], version: int, lane: int = 0) -> bool:
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
        if not todo:
            return False
        samples = [g.samples[i] for g, i in todo]
        budgets = [limit - s.num_response_tokens for s in samples]
        started = time.time()
        engine = self.engine if not self._replicas else self._replicas[lane]
        gens = engine.generate(
            [s.prompt_token_ids + s.response_token_ids for s in samples],
            max_new_tokens=max(budgets),  # rows with less room are cut below
            temperature=cfg.actor_rollout_ref.rollout.temperature,
            should_stop=self._should_stop,
            **sampling_filters(cfg),
        )
        took = time.time() - started
        with self._cond:  # lanes count at once
            self.stats["generate_seconds"] += took
            self.replica_stats[lane]["generate_seconds"] += took
            self.replica_stats[lane]["tokens"] += sum(len(g.response_token_ids) for g in gens)
        interrupted = False
        turns: list[tuple[_Rollout, int, bool]] = []  # multi-turn: (group, row, ended by EOS)
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
                self.stats["groups_interrupted"] += sum(1 for g in groups if not all(g.done))
        return interrupted

    def _should_stop(self) -> bool:
        """Asked by the engine before every token: stop for a stop, or for a pause once its
        grace (``async_training.pause_grace_s``) has passed."""
        return self._stop or (self._paused and time.monotonic() >= self._interrupt_at)

    def _drop(self, groups: list[_Rollout]) -> None:
        """Give up on ``groups`` (no partial rollouts): their prompts are issued again."""
        with self._cond:
            self.stats["groups_aborted"] += len(groups)
            for group in groups:
                self.cursor.give_back(group.position)

    def _finish(self, group: _Rollout, lane: int = 0) -> list[Sample]:
        """Score a complete group; its samples get rewards and a finishing time. The reward
        function's other numeric fields go to ``metadata["reward_metrics"]``, the rest to
        ``metadata["reward_fields"]``."""
        for sample in group.samples:
            sample.response = self.tokenizer.decode(
                sample.response_token_ids, skip_special_tokens=True
            )
        prompt = group.samples[0].prompt
        requests = requests_for(group.row, [s.response for s in group.samples], prompt)
        if group.conversations:  # the reward also sees the calls made (extra_info)
            requests = record_conversations(requests, group.samples, group.conversations)
        rewards = self.scorer.score(requests)
        now = time.time()
        for sample, reward in zip(group.samples, rewards):
            if reward.metrics:
                sample.metadata[REWARD_METRICS_KEY] = dict(reward.metrics)
            if reward.fields:
                sample.metadata["reward_fields"] = dict(reward.fields)
            sample.finish(reward.score, now=now)
        with self._cond:
            self.stats["groups_generated"] += 1
            self.replica_stats[lane]["groups"] += 1
            if any(s.v_end > s.v_start for s in group.samples):
                self.stats["groups_partial"] += 1
            for conversation in group.conversations:
                self.stats["tool_calls"] += len(conversation.calls)
                self.stats["tool_errors"] += sum(conversation.errors.values())
        return group.samples

    def generate_batch(self, num_groups: int, version: int | None = None) -> list[list[Sample]]:
        """The synchronous baseline's call: ``num_groups`` groups now, at this version, in
        engine calls of ``groups_per_call()`` groups as in the asynchronous loop."""
        groups: list[list[Sample]] = []
        errors: list[BaseException] = []  # a lane's, raised here in the caller's thread
        lock = threading.Lock()

        def lane_work(lane: int) -> None:  # pull calls while groups are missing
            while self._replica_alive(lane) and not errors:
                with lock:
                    count = min(self.groups_per_call(), num_groups - len(groups) - pending[0])
                    if count <= 0:
                        return
                    pending[0] += count
                try:
                    made = self.generate_groups(count, version, lane) or []
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    pending[0] -= count
                    groups.extend(made)

        pending = [0]  # groups being generated by a lane
        if not self._replicas:
            lane_work(0)
            if errors:
                raise errors[0]
            return groups
        workers = [
            threading.Thread(target=lane_work, args=(i,), name=f"batch-lane-{i}", daemon=True)
            for i in range(len(self._replicas))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if errors:
            raise errors[0]
        if len(groups) < num_groups:
            raise RuntimeError(
                f"generate_batch({num_groups}): every rollout replica failed "
                f"(rollout.max_restarts={self.config.rollout.max_restarts}) with "
                f"{len(groups)} groups made; look for the cause in the replicas' output"
            )
        return groups

    def _replica_alive(self, lane: int) -> bool:
        return not self._replicas or bool(self._replicas[lane].handle)

    def start(self) -> bool:
        """Start the generation loop and its sender (idempotent)."""
        if self._thread is None:
            self._sender = threading.Thread(target=self._send_loop, name="sender", daemon=True)
            self._sender.start()
            self._thread = threading.Thread(target=self._loop, name="rollouter", daemon=True)
            self._thread.start()
        return True

    def wait_loop_end(self) -> str | None:
        """Block until the generation loop ends; its error (a traceback), None for a stop.

        The driver keeps one call of this in flight for the whole run (``loop._ProducerWatch``):
        when this actor's process dies (SIGKILL, the OOM killer) it cannot close the queue with
        an error, but the runtime fails the call in flight at once, so the trainer learns of
        the death then instead of at the queue's timeout. Only after ``start()``.
        """
        thread = self._thread
        if thread is None:
            raise RuntimeError("wait_loop_end() before start(): no generation loop to wait for")
        thread.join()
        with self._cond:
            return self._error

    def _admission_room(self) -> int:
        cfg = self.config
        accepted = self.stats["groups_accepted"]
        return admission_capacity(
            current_version=self.version,
            staleness_threshold=cfg.async_training.staleness_threshold,
            consumer_batch_size=cfg.data.train_batch_size * cfg.trainer.trigger_parameter_sync_step,
            max_concurrent=self.groups_per_call() * max(1, len(self._replicas)),
            # The trainer can take (and discard) a group before the sender hears that the
            # queue accepted it: the difference may lag below zero for that moment.
            accepted=max(0, int(accepted) + self._resumed_groups - self._discarded_groups),
            running=len(self._unfinished) + self._in_flight,
            offered=len(self._outbox) + self._sending,
        )

    def _loop(self) -> None:
        """Run one lane per replica (this thread is lane 0) until a stop or a crash."""
        lanes = [
            threading.Thread(target=self._lane, args=(i,), name=f"rollouter-lane-{i}", daemon=True)
            for i in range(1, max(1, len(self._replicas)))
        ]
        try:
            for lane in lanes:
                lane.start()
            self._lane(0)
        finally:
            for lane in lanes:
                lane.join()
            self._stop_sender()  # stopped: what was sent is still answered and counted

    def _lane(self, lane: int) -> None:
        """One replica's generation loop: wait for room, take the unfinished groups and new
        prompts within the room, one engine call, then score and offer what finished."""
        partial = self.config.async_training.partial_rollout
        try:
            while True:
                with self._cond:
                    while not self._stop and self._must_wait():
                        why = "idle_paused_seconds" if self._paused else "idle_throttled_seconds"
                        self._waiting = (why, time.time())
                        # Woken by resume, stop and load_weights (a new version makes room);
                        # the timeout only bounds the wait should a wake-up ever be missed.
                        self._cond.wait(1.0)
                        self._count_wait()
                        self._waiting = None
                    if self._stop:
                        break
                    self._generating += 1
                    version = self.version
                    # A call takes up to groups_per_call() groups: unfinished ones first (any
                    # replica continues a partial rollout), then new prompts within the room.
                    per_call = self.groups_per_call()
                    taken = self._unfinished[:per_call]
                    room = max(0, min(per_call - len(taken), self._admission_room()))
                    del self._unfinished[: len(taken)]
                    # Counted at once: another lane's room must not hand out the same room.
                    self._in_flight += len(taken) + room
                groups = taken
                try:
                    # Outside the lock: pause_rollout() is not kept waiting by tokenization.
                    groups = taken + self._new_groups(room, version)
                    interrupted = self._sample(groups, version, lane)
                except ReplicaFailed as failure:
                    self._replica_failed(lane, groups, failure)
                    if not self._replicas[lane].handle:
                        break  # no restarts left: the other lanes go on
                    continue
                finally:
                    with self._cond:
                        self._generating -= 1
                        self._cond.notify_all()
                if interrupted and not partial:
                    with self._cond:
                        self._in_flight -= len(groups)
                    self._drop(groups)
                    continue
                finished = [self._finish(g, lane) for g in groups if all(g.done)]
                # Finished groups go to the sender thread, which puts them in the queue one
                # call at a time (in order, the accounting exact) and waits for the answer;
                # the lane never does (a blocking answer came back late on 2 busy cores, as it
                # goes through the driver: ~5% of the rollouter's time). Waiting or being put,
                # they take staleness room (``staleness.admission_capacity(offered=...)``).
                with self._cond:
                    self._in_flight -= len(groups)
                    self._unfinished.extend(g for g in groups if not all(g.done))
                    self._outbox.extend(finished)
                    self._cond.notify_all()
        except BaseException as exc:
            self._crashed(exc)

    def _replica_failed(self, lane: int, groups: list[_Rollout], failure: ReplicaFailed) -> None:
        """Replica ``lane`` died or hung in a call: its groups go back unchanged (tokens are
        appended only from an answer), and it is restarted with the current weights while
        ``rollout.max_restarts`` allows; the run fails when no replica is left."""
        logger.warning("%s; its %d groups go to the other replicas", failure, len(groups))
        with self._cond:
            self._in_flight -= len(groups)
            self._unfinished.extend(groups)
            self.stats["replica_failures"] += 1
            self.replica_stats[lane]["failures"] += 1
            self._cond.notify_all()
        self._replicas[lane].kill()
        while self._restarts_left[lane] > 0:
            self._restarts_left[lane] -= 1
            replica = self._start_replica(lane)
            loaded = None
            try:  # its start and the current weights, each bounded, before it generates
                self._record_node(
                    replica, time.monotonic() + self.config.actor_rollout_ref.nccl_timeout
                )
                if self._weights_ref is not None:
                    ref = replica.load_weights(self._weights_ref, self._weights_version)
                    deadline = time.monotonic() + self.config.async_training.generation_timeout
                    replica.wait(ref, "load_weights after a restart", deadline)
                    loaded = self._weights_version
            except ReplicaFailed as again:
                logger.warning("restarting it failed: %s", again)
                replica.kill()
                failure = again
                continue
            with self._cond:
                self.replica_stats[lane]["loaded_version"] = loaded
            self._replicas[lane] = replica
            with self._cond:
                self.stats["replica_restarts"] += 1
            return
        self._replicas[lane].handle = None
        self.replica_stats[lane]["alive"] = False
        if not any(r.handle for r in self._replicas):
            raise RuntimeError(
                f"every rollout replica failed and none has restarts left "
                f"(rollout.max_restarts={self.config.rollout.max_restarts}); the last: {failure}. "
                "Look for the cause in the replicas' output (an OOM kill, a crash, a call slower "
                "than async_training.generation_timeout), then raise rollout.max_restarts or "
                "that timeout, and resume from the last checkpoint"
            )

    def _crashed(self, exc: BaseException) -> None:
        """Record a crash of the loop or the sender, stop both, and close the queue with it:
        the trainer then sees the error instead of a clean end."""
        with self._cond:
            if self._error is not None:
                return
            self._error = "".join(traceback.format_exception(exc))
            self._stop = True
            self._cond.notify_all()
        if self.queue is not None:
            _wait(call(self.queue, "close", f"the rollouter crashed:\n{self._error}"))

    def _count_wait(self) -> None:
        """Add the wait in progress, up to now, to the idle counters (under the lock): the
        statistics include a wait that has not ended yet."""
        if self._waiting is not None:
            why, since = self._waiting
            now = time.time()
            self.stats["idle_seconds"] += now - since
            self.stats[why] += now - since
            self._waiting = (why, now)

    def _must_wait(self) -> bool:
        """Paused, or no admission room and nothing unfinished (unfinished groups were admitted
        already: they go on whatever the room)."""
        return self._paused or (self._admission_room() <= 0 and not self._unfinished)

    def _send_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._outbox and not self._sender_stop:
                        self._cond.wait(1.0)
                    if not self._outbox:
                        return
                    groups, self._outbox = self._outbox, []
                    self._sending = len(groups)
                try:
                    # A full queue is retried after its wait for room (backpressure) until
                    # it takes them or the rollouter stops.
                    while groups:
                        answer = _wait(self._start_put(groups))
                        with self._cond:
                            groups = self._account(groups, answer)
                        if self._stop:
                            break
                finally:
                    with self._cond:
                        self._sending = 0
                        self._cond.notify_all()  # accepted groups may make admission room
        except BaseException as exc:
            self._crashed(exc)

    def _stop_sender(self) -> None:
        """Let the sender put what the loop handed it, read the answer, and end."""
        with self._cond:
            self._sender_stop = True
            self._cond.notify_all()
        if self._sender is not None:
            self._sender.join(CALL_TIMEOUT_S + 5)

    def _start_put(self, groups: list[list[Sample]]) -> Pending:
        """Start one ``put_many`` of ``groups``, each at its oldest sample's version; the queue
        waits up to 1 s for room."""
        versions = [min(s.v_start for s in group) for group in groups]
        return call(self.queue, "put_many", groups, versions, timeout=1.0)

    def _account(self, groups: list[list[Sample]], results: list[Any]) -> list[list[Sample]]:
        """Count the queue's answers to a put; returns the groups refused because it was full.
        Under the lock: the generation loop reads the counts and the cursor."""
        retry = []
        for group, result in zip(groups, results):
            name = getattr(result, "name", str(result))
            if name == "ACCEPTED":
                self.stats["groups_accepted"] += 1
            elif name == "REJECTED_STALE":
                self.stats["groups_rejected_stale"] += 1
                self.cursor.give_back(group[0].metadata["prompt_position"])
            elif name == "CLOSED":
                self._stop = True
                return []
            else:
                self.stats["groups_rejected_full"] += 1  # full: try again after the wait
                retry.append(group)
        return retry

    # -- control ----------------------------------------------------------------------------
    def restore_data_position(self, trained: dict[str, Any], discarded: int = 0) -> int:
        """Resume the prompt stream after a checkpoint (``TrainedPositions.to_dict()``): issue
        every position not trained yet, and count the trained groups for admission control as
        if this run had produced them (less ``discarded``: consumed groups that dynamic
        sampling dropped). Only before ``start()``; returns the next position."""
        if self._thread is not None:
            raise RuntimeError("restore_data_position() after start(): call it before start()")
        positions = TrainedPositions.from_dict(trained)
        if not 0 <= discarded <= len(positions):
            raise ValueError(
                f"restore_data_position(): discarded={discarded} must be in [0, "
                f"{len(positions)}] (the groups the checkpoint consumed)"
            )
        self.cursor = PromptCursor(positions)
        self._resumed_groups = len(positions) - discarded
        return positions.watermark

    def discard_groups(self, count: int) -> int:
        """The trainer consumed ``count`` groups and trained on none of them (dynamic
        sampling): they no longer take staleness room, or a batch that needs more groups than
        the admission bound lets through would wait for ever. Returns the total."""
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"discard_groups(): count={count!r} must be an int >= 0")
        with self._cond:
            self._discarded_groups += count
            self._cond.notify_all()  # room for the generation loop waiting on admission
        return self._discarded_groups

    def pause_rollout(self, timeout: float = 30.0) -> bool:
        """Stop generating; True when idle. The running engine call stops at its next token
        once ``async_training.pause_grace_s`` has passed (at once by default)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._paused:
                self._interrupt_at = time.monotonic() + self.config.async_training.pause_grace_s
            self._paused = True
            self._cond.notify_all()  # a waiting loop now counts its wait as paused
            while self._generating:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"pause_rollout(): the generation loop did not stop within {timeout}s"
                    )
                self._cond.wait(remaining)
        return True

    def resume_rollout(self) -> bool:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        return True

    def load_weights(self, weights: Any, version: int) -> bool:
        """Load new weights; only while paused. With ``async_training.resume_on_load`` a
        successful load also resumes (a failed one leaves the rollouter paused).

        The rollouter keeps ``weights``: the engine may adopt the tensors as its parameters
        (``take=True``), so a caller in the same process must pass tensors it will not touch
        again. Through the runtime that always holds: an actor receives private copies (a
        copy-on-write mapping on the local backend), and the trainer publishes a copy of its
        parameters (``PolicyUpdater.state_dict``), so writing into them never reaches it."""
        if not self._paused and self._thread is not None:
            raise RuntimeError("load_weights() while generating: call pause_rollout() first")
        if self._replicas:
            # Put once: every replica then maps the same segments.
            self._load_replicas(miniray.put(weights), int(version))
        else:
            self.engine.load_weights(weights, take=True)
        return self._adopt(version)

    def load_weights_from(self, refs: list[Any], version: int) -> bool:
        """``load_weights`` of the published object ``refs[0]`` itself (in a list, so that the
        runtime hands over the ref, not its value): the replicas load that object as it is, with
        no copy in the rollouter (``load_weights`` of a value puts it once more); one replica
        (this process) takes its value here. The synchronizer calls this when a rollouter
        offers it (``param_sync.load_call``)."""
        (ref,) = refs
        if not self._paused and self._thread is not None:
            raise RuntimeError("load_weights() while generating: call pause_rollout() first")
        if self._replicas:
            self._load_replicas(ref, int(version))
        else:
            timeout = self.config.async_training.generation_timeout
            self.engine.load_weights(miniray.get(ref, timeout=timeout), take=True)
        return self._adopt(version)

    def _adopt(self, version: int) -> bool:
        with self._cond:
            if self.config.async_training.resume_on_load:
                # The sync's resume_rollout is a round trip away and finds us running: that
                # round trip was ~5% of the CPU rollouter's time at one sync per step.
                self._paused = False
            self.version = int(version)
            self._cond.notify_all()
        return True

    def _load_replicas(self, ref: Any, version: int) -> None:
        """Load the object ``ref`` into every replica under one deadline
        (``generation_timeout``), so a sync takes as long as the slowest replica, not the sum.
        A replica that fails or misses it is restarted with these weights
        (``_replica_failed``); the others keep them."""
        self._weights_ref, self._weights_version = ref, version
        deadline = time.monotonic() + self.config.async_training.generation_timeout
        loads = [
            (r, r.load_weights(self._weights_ref, version)) for r in self._replicas if r.handle
        ]
        for replica, load in loads:
            try:
                replica.wait(load, "load_weights", deadline)
                with self._cond:  # the sync reached this replica
                    self.replica_stats[replica.index]["loaded_version"] = version
            except ReplicaFailed as failure:
                with self._cond:
                    self.replica_stats[replica.index]["missed_syncs"] += 1
                self._replica_failed(replica.index, [], failure)

    def stop(self, timeout: float = 30.0) -> bool:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.scorer.close()
        for replica in self._replicas:
            replica.kill()
        return True

    def get_statistics(self) -> dict[str, Any]:
        with self._cond:
            self._count_wait()
            stats: dict[str, Any] = dict(self.stats)
            stats.update(
                version=self.version,
                paused=self._paused,
                error=self._error,
                alive=self._thread is not None and self._thread.is_alive(),
            )
            replicas = [dict(r) for r in self.replica_stats]
        elapsed = max(1e-9, time.time() - stats["started_at"])
        stats["idle_ratio"] = stats["idle_seconds"] / elapsed
        stats["rollout_replicas"] = self.num_replicas
        for replica in replicas:  # tokens/s while generating; idle: the rest of the run
            busy = replica["generate_seconds"]
            replica["tokens_per_s"] = replica["tokens"] / busy if busy else 0.0
            replica["idle_ratio"] = max(0.0, 1.0 - busy / elapsed)
        stats["replicas"] = replicas
        stats["peak_rss_gib"] = peak_rss_gib()  # the generate phase's, in its own process
        return stats


def _wait(pending: Pending) -> Any:
    """The queue's answer, waiting at most CALL_TIMEOUT_S (then ``CallTimeoutError``)."""
    return pending.result(time.monotonic() + CALL_TIMEOUT_S)
