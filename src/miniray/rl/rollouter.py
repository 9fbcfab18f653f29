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

from miniray.config import from_dict
from miniray.rl.compat import actor_constructor
from miniray.rl.config import RLConfig
from miniray.rl.data_position import PromptCursor, PromptOrder, TrainedPositions
from miniray.rl.dynamic_sampling import REWARD_METRICS_KEY
from miniray.rl.endpoints import Pending, call
from miniray.rl.prompts import fit_prompt_lengths, load_prompts, prompt_text, prompt_token_ids
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
    ):
        """``seed``: the engine's sampling seed; None: ``trainer.seed`` (the same seed samples
        the same tokens)."""
        self.config = as_rl_config(config)
        cfg = self.config
        from miniray.rl.models.tiny import load_options, load_tokenizer

        model = cfg.actor_rollout_ref.model
        options = load_options(model, device="cpu")
        if engine is None:
            from miniray.rl.engines import build_engine

            engine = build_engine(
                cfg.actor_rollout_ref.rollout.name,
                model_path=model.path,
                seed=cfg.trainer.seed if seed is None else seed,
                **options,
            )
        self.engine = engine
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
        # Tokenized once, here: the limit needs every length, and the loop then reuses them.
        ids = prompt_token_ids(self.tokenizer, [row[data.prompt_key] for row in rows])
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
        self.prompt_texts = [prompt_text(self.tokenizer, r[data.prompt_key]) for r in self.rows]
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
        self._generating = False
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
        }

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
        self, num_groups: int, version: int | None = None
    ) -> list[list[Sample]] | None:
        """``num_groups`` prompts, ``rollout.n`` responses each, in one engine call; scored and
        stamped. None if interrupted: then every prompt goes back to the cursor."""
        v = self.version if version is None else version
        groups = self._new_groups(num_groups, v)
        if self._sample(groups, v):
            self._drop(groups)
            return None
        return [self._finish(group) for group in groups]

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
            groups.append(_Rollout(position=position, row=row, samples=samples))
        return groups

    def _sample(self, groups: list[_Rollout], version: int) -> bool:
        """One engine call continuing every unfinished response of ``groups`` at ``version``.

        Returns True if a pause or stop interrupted it. The tokens sampled before the
        interruption stay with their sample (with the behaviour log-probs of the version that
        sampled them), so a partial rollout continues where it stopped.
        """
        cfg = self.config
        limit = cfg.data.max_response_length
        todo = [(g, i) for g in groups for i in range(len(g.samples)) if not g.done[i]]
        if not todo:
            return False
        samples = [g.samples[i] for g, i in todo]
        budgets = [limit - s.num_response_tokens for s in samples]
        started = time.time()
        gens = self.engine.generate(
            [s.prompt_token_ids + s.response_token_ids for s in samples],
            max_new_tokens=max(budgets),  # rows with less room are cut below
            temperature=cfg.actor_rollout_ref.rollout.temperature,
            should_stop=self._should_stop,
            **sampling_filters(cfg),
        )
        self.stats["generate_seconds"] += time.time() - started
        interrupted = False
        for (group, index), sample, budget, gen in zip(todo, samples, budgets, gens):
            tokens = list(gen.response_token_ids[:budget])
            if tokens:
                if sample.num_response_tokens == 0:  # the age of a sample is its first token's
                    sample.v_start = sample.v_end = version
                sample.append_tokens(tokens, list(gen.response_logprobs[:budget]), version)
            if gen.finish_reason == "aborted" and sample.num_response_tokens < limit:
                interrupted = True
            else:
                group.done[index] = True
        if interrupted:
            self.stats["groups_interrupted"] += sum(1 for g in groups if not all(g.done))
        return interrupted

    def _should_stop(self) -> bool:
        """Asked by the engine before every token: stop for a stop, or for a pause once its
        grace (``async_training.pause_grace_s``) has passed."""
        return self._stop or (self._paused and time.monotonic() >= self._interrupt_at)

    def _drop(self, groups: list[_Rollout]) -> None:
        """Give up on ``groups`` (no partial rollouts): their prompts are issued again."""
        self.stats["groups_aborted"] += len(groups)
        for group in groups:
            self.cursor.give_back(group.position)

    def _finish(self, group: _Rollout) -> list[Sample]:
        """Score a complete group; its samples get rewards and a finishing time. The reward
        function's other numeric fields go to ``metadata["reward_metrics"]``, the rest to
        ``metadata["reward_fields"]``."""
        for sample in group.samples:
            sample.response = self.tokenizer.decode(
                sample.response_token_ids, skip_special_tokens=True
            )
        prompt = group.samples[0].prompt
        rewards = self.scorer.score(
            requests_for(group.row, [s.response for s in group.samples], prompt)
        )
        now = time.time()
        for sample, reward in zip(group.samples, rewards):
            if reward.metrics:
                sample.metadata[REWARD_METRICS_KEY] = dict(reward.metrics)
            if reward.fields:
                sample.metadata["reward_fields"] = dict(reward.fields)
            sample.finish(reward.score, now=now)
        self.stats["groups_generated"] += 1
        if any(s.v_end > s.v_start for s in group.samples):
            self.stats["groups_partial"] += 1
        return group.samples

    def generate_batch(self, num_groups: int, version: int | None = None) -> list[list[Sample]]:
        """The synchronous baseline's call: ``num_groups`` groups now, at this version, in
        engine calls of ``groups_per_call()`` groups as in the asynchronous loop."""
        groups: list[list[Sample]] = []
        while len(groups) < num_groups:
            count = min(self.groups_per_call(), num_groups - len(groups))
            groups.extend(self.generate_groups(count, version) or [])
        return groups

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
            max_concurrent=self.groups_per_call(),
            # The trainer can take (and discard) a group before the sender hears that the
            # queue accepted it: the difference may lag below zero for that moment.
            accepted=max(0, int(accepted) + self._resumed_groups - self._discarded_groups),
            running=len(self._unfinished),
            offered=len(self._outbox) + self._sending,
        )

    def _loop(self) -> None:
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
                    self._generating = True
                    version = self.version
                    room = max(0, self._admission_room())
                try:
                    # Outside the lock: pause_rollout() is not kept waiting by tokenization.
                    groups = self._unfinished + self._new_groups(room, version)
                    self._unfinished = []
                    interrupted = self._sample(groups, version)
                finally:
                    with self._cond:
                        self._generating = False
                        self._cond.notify_all()
                if interrupted and not partial:
                    self._drop(groups)
                    continue
                self._unfinished = [g for g in groups if not all(g.done)]
                self._offer([self._finish(g) for g in groups if all(g.done)])
        except BaseException as exc:
            self._crashed(exc)
        finally:
            self._stop_sender()  # stopped: what was sent is still answered and counted

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

    def _offer(self, groups: list[list[Sample]]) -> None:
        """Hand finished groups to the sender thread and go on generating.

        The sender puts them in the queue in one call per batch of groups and waits for the
        answer; the generation loop never does (a blocking answer came back late on 2 busy
        cores, as it goes through the driver: ~5% of the rollouter's time). One put at a time
        keeps the groups in order and the accounting exact; groups waiting or being put take
        staleness room (``staleness.admission_capacity(offered=...)``).
        """
        if groups:
            with self._cond:
                self._outbox.extend(groups)
                self._cond.notify_all()

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
        self.engine.load_weights(weights, take=True)
        with self._cond:
            if self.config.async_training.resume_on_load:
                # The sync's resume_rollout is a round trip away and finds us running: that
                # round trip was ~5% of the CPU rollouter's time at one sync per step.
                self._paused = False
            self.version = int(version)
            self._cond.notify_all()
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.scorer.close()
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
        elapsed = max(1e-9, time.time() - stats["started_at"])
        stats["idle_ratio"] = stats["idle_seconds"] / elapsed
        stats["peak_rss_gib"] = peak_rss_gib()  # the generate phase's, in its own process
        return stats


def _wait(pending: Pending) -> Any:
    """The queue's answer, waiting at most CALL_TIMEOUT_S (then ``CallTimeoutError``)."""
    return pending.result(time.monotonic() + CALL_TIMEOUT_S)
