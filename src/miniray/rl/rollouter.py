"""FullyAsyncRollouter: generates groups of responses continuously and puts them in the queue.

    generation thread (a lane)                  actor methods (other threads)
    loop: wait while paused  <------------------ pause_rollout(): set paused, stop the current
          admit? (staleness room)                  generation at the next token, wait until
          generate groups at version v             the loop is idle; returns True
          score, stamp v_start=v, hand them      resume_rollout(): clear paused, wake the loop
          to the sender ---> sender thread:      load_weights(w, v): only while paused
                             put(v) -> queue (rejects what is already too stale), count
                             the answer (generation goes on meanwhile)
    on error (either thread): record it, close the queue with that error

One lane per replica (``replicas.engine_pool``: a ``replica_pool.ReplicaPool``, which also
pauses, loads, restarts and counts them); the sender is ``rollout_sender.QueueSender``.

Admission control (``staleness.admission_capacity``) keeps the rollouter from running more
than ``staleness_threshold`` versions ahead of the trainer, so the queue's stale rejections stay
rare. One engine call samples ``groups_per_call()`` groups at once.

A generation interrupted by a pause (a weight sync) keeps the tokens it has, with their
behaviour log-probs, and continues in the next call with the new weights
(``async_training.partial_rollout``, on by default): then ``v_end > v_start``, no work is
thrown away, and long responses are not starved by frequent syncs. With ``partial_rollout``
off, interrupted groups are dropped and their prompts issued again.

How a group is made (its prompt, the engine calls, the multi-turn hook, scoring) is
``group_sampler.GroupSampler``'s; the prompts and their cursor are its ``RolloutPrompts``.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import miniray
from miniray.config import from_dict
from miniray.rl.compat import actor_constructor
from miniray.rl.config import RLConfig
from miniray.rl.data_position import PromptCursor, TrainedPositions
from miniray.rl.group_sampler import GroupSampler, Rollout, RolloutPrompts
from miniray.rl.idle_clock import IdleClock
from miniray.rl.multi_turn import agent_loop_of
from miniray.rl.placement import ReplicaPlacement
from miniray.rl.replicas import (
    RemoteEngine,
    ReplicaFailed,
    engine_pool,
    in_process_engine,
    replica_count,
    rollout_placement,
)
from miniray.rl.rewards import build_scorer
from miniray.rl.rollout_sender import QueueSender, queue_answer
from miniray.rl.staleness import admission_capacity
from miniray.rl.tracking import peak_rss_gib
from miniray.rl.types import Sample

RewardFn = Callable[[str, str], float]

logger = logging.getLogger(__name__)


def as_rl_config(config: Any) -> RLConfig:
    return config if isinstance(config, RLConfig) else from_dict(RLConfig, dict(config))


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
        placement: ReplicaPlacement | None = None,
    ):
        """``seed``: the engine's sampling seed; None: ``trainer.seed`` (the same seed samples
        the same tokens). ``engine``: the engine of a one-replica rollouter, in this process;
        ``engine_factory(i)``: builds replica ``i``'s engine, in its own process with several
        replicas (``replicas.replica_count``), instead of the one ``rollout.name`` names.
        ``placement``: each replica's device, as the driver planned it
        (``replicas.rollout_placement``); None plans it here."""
        self.config = as_rl_config(config)
        cfg = self.config
        from miniray.rl.models.tiny import load_tokenizer

        model = cfg.actor_rollout_ref.model
        self.seed = cfg.trainer.seed if seed is None else seed
        self.num_replicas = replica_count(cfg)
        self.placement = rollout_placement(cfg) if placement is None else placement
        # One replica: called in this process; several: None (each builds its own).
        self.engine = in_process_engine(cfg, self.seed, engine, engine_factory, self.placement)
        self.tokenizer = load_tokenizer(model.path, trust_remote_code=model.trust_remote_code)
        # Multi-turn (actor_rollout_ref.rollout.multi_turn): ends each model turn, running its
        # tool calls; None: a rollout is one response. Its tools' schemas go into the prompts.
        agent = agent_loop_of(cfg, self.tokenizer)
        self.prompts = RolloutPrompts.read(
            cfg, self.tokenizer, agent.registry.schemas if agent else None
        )
        self.queue = queue
        # Rewards are scored on the scorer's threads, each call within its deadline.
        self.scorer = build_scorer(cfg, reward_fn, self.prompts.rows)
        self._resumed_groups = 0  # groups trained before the checkpoint this run resumed from
        # Groups the trainer consumed and discarded (dynamic sampling): they trained no
        # version, so they give their staleness room back (``discard_groups``).
        self._discarded_groups = 0
        self._unfinished: list[Rollout] = []  # partial rollouts waiting for the next call
        # Finished groups go to the queue on the sender's thread, which counts the answers.
        self._cond = threading.Condition()
        self.sender = QueueSender(
            queue,
            self._cond,
            give_back=lambda position: self.prompts.cursor.give_back(position),
            closed=self._closed,
            stopped=lambda: self._stop,
            crashed=self._crashed,
        )
        self.version = 0
        # One swap_weights at a time: calls that reach a threaded actor close together (a
        # swap sent ahead runs when its weights are there) would otherwise interleave.
        self._swap_lock = threading.Lock()
        self._in_flight = 0  # groups taken by a lane and not yet unfinished or offered
        self._stop = False
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self.idle = IdleClock()  # the lanes' waits, paused or throttled
        # The replicas and their pause state, under self._cond with the lanes' work.
        self.pool = engine_pool(
            cfg, self.seed, self.engine, engine_factory, lock=self._cond, placement=self.placement
        )
        self.sampler = GroupSampler(
            cfg,
            self.prompts,
            tokenizer=self.tokenizer,
            agent=agent,
            scorer=self.scorer,
            engine_for=self._engine_for,
            pool=self.pool,
            lock=self._cond,
            should_stop=self._should_stop,
        )

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
        try:
            return self.sampler.generate(num_groups, v, lane)
        except ReplicaFailed as failure:
            self._replica_failed(lane, [], failure)
            return None

    def _engine_for(self, lane: int) -> Any:
        """Replica ``lane``'s engine: this process's one, or a call to the replica's actor."""
        if self.pool.in_process:
            return self.engine
        timeout = self.config.async_training.generation_timeout
        return RemoteEngine(lane, self.pool.handle(lane), timeout)

    def _should_stop(self) -> bool:
        """Asked by the engine before every token: stop for a stop, or for a pause once its
        grace (``async_training.pause_grace_s``) has passed."""
        return self._stop or self.pool.should_stop()

    def generate_batch(self, num_groups: int, version: int | None = None) -> list[list[Sample]]:
        """The synchronous baseline's call: ``num_groups`` groups now, at this version, in
        engine calls of ``groups_per_call()`` groups as in the asynchronous loop."""
        return self.pool.gather(
            num_groups,
            self.groups_per_call(),
            lambda lane, count: self.generate_groups(count, version, lane),
        )

    def start(self) -> bool:
        """Start the generation loop and its sender (idempotent)."""
        if self._thread is None:
            self.sender.start()
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
        accepted = self.sender.counts["groups_accepted"]
        return admission_capacity(
            current_version=self.version,
            staleness_threshold=cfg.async_training.staleness_threshold,
            consumer_batch_size=cfg.data.train_batch_size * cfg.trainer.trigger_parameter_sync_step,
            max_concurrent=self.groups_per_call() * self.pool.size,
            # The trainer can take (and discard) a group before the sender hears that the
            # queue accepted it: the difference may lag below zero for that moment.
            accepted=max(0, int(accepted) + self._resumed_groups - self._discarded_groups),
            running=len(self._unfinished) + self._in_flight,
            offered=self.sender.in_hand(),
        )

    def _loop(self) -> None:
        """Run one lane per replica (this thread is lane 0) until a stop or a crash."""
        try:
            self.pool.run_lanes(self._lane, "rollouter-lane")
        finally:
            self.sender.stop()  # stopped: what was sent is still answered and counted

    def _lane(self, lane: int) -> None:
        """One replica's generation loop: wait for room, take the unfinished groups and new
        prompts within the room, one engine call, then score and offer what finished."""
        partial = self.config.async_training.partial_rollout
        try:
            while True:
                with self._cond:
                    while not self._stop and self._must_wait():
                        self.idle.wait(self._cond, "paused" if self.pool.paused else "throttled")
                    if self._stop:
                        break
                    self.pool.begin_call(lane)  # counted with the work: see pause_rollout
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
                    groups = taken + self.sampler.new_groups(room, version)
                    interrupted = self.sampler.sample(groups, version, lane)
                except ReplicaFailed as failure:
                    if not partial:  # a conversation is one version's: a begun one starts over
                        begun = [g for g in groups if any(s.response_token_ids for s in g.samples)]
                        if begun:
                            groups = [g for g in groups if all(g is not b for b in begun)]
                            with self._cond:
                                self._in_flight -= len(begun)
                            self.sampler.drop(begun)
                    self._replica_failed(lane, groups, failure)
                    if not self.pool.alive(lane):
                        break  # no restarts left: the other lanes go on
                    continue
                finally:
                    self.pool.end_call(lane)
                if interrupted and not partial:
                    with self._cond:
                        self._in_flight -= len(groups)
                    self.sampler.drop(groups)
                    continue
                finished = self.sampler.finish([g for g in groups if all(g.done)], lane)
                # To the sender (rollout_sender.py: the lane never waits for the queue);
                # until answered they take staleness room (admission_capacity(offered=...)).
                with self._cond:
                    self._in_flight -= len(groups)
                    self._unfinished.extend(g for g in groups if not all(g.done))
                    self.sender.offer(finished)
        except BaseException as exc:
            self._crashed(exc)

    def _replica_failed(self, lane: int, groups: list[Rollout], failure: ReplicaFailed) -> None:
        """Replica ``lane`` died or hung in a call: its groups go back unchanged (tokens are
        appended only from an answer), and the pool restarts it with the current weights while
        ``rollout.max_restarts`` allows; the run fails when no replica is left."""
        logger.warning("%s; its %d groups go to the other replicas", failure, len(groups))
        with self._cond:
            self._in_flight -= len(groups)
            self._unfinished.extend(groups)
            self._cond.notify_all()
        self.pool.failed(lane, str(failure))

    def _closed(self) -> None:
        self._stop = True  # the queue is closed: nothing more to generate for

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
            queue_answer(self.queue, "close", f"the rollouter crashed:\n{self._error}")

    def _must_wait(self) -> bool:
        """Paused, or no admission room and nothing unfinished (unfinished groups were admitted
        already: they go on whatever the room)."""
        return self.pool.paused or (self._admission_room() <= 0 and not self._unfinished)

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
        self.prompts.cursor = PromptCursor(positions)
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
        self.pool.pause(timeout, self.config.async_training.pause_grace_s)
        return True

    def resume_rollout(self) -> bool:
        self.pool.resume()
        return True

    def load_weights(self, weights: Any, version: int) -> bool:
        """Load new weights; only while paused. With ``async_training.resume_on_load`` a
        successful load also resumes (a failed one leaves the rollouter paused).

        The rollouter keeps ``weights``: the engine may adopt the tensors as its parameters
        (``take=True``), so a caller in the same process must pass tensors it will not touch
        again. Through the runtime that always holds: an actor receives private copies (a
        copy-on-write mapping on the local backend), and the trainer publishes a copy of its
        parameters (``PolicyUpdater.state_dict``), so writing into them never reaches it."""
        # Several replicas: put once, and every replica maps the same segments.
        return self._load(weights if self.pool.in_process else miniray.put(weights), version)

    def load_weights_from(self, refs: list[Any], version: int) -> bool:
        """``load_weights`` of the published object ``refs[0]`` itself (in a list, so that the
        runtime hands over the ref, not its value): the replicas load that object as it is, with
        no copy in the rollouter (``load_weights`` of a value puts it once more); one replica
        (this process) takes its value here. The synchronizer calls this when a rollouter
        offers it (``param_sync.load_call``)."""
        (ref,) = refs
        return self._load(ref, version)

    def _load(self, weights: Any, version: int) -> bool:
        """Into the engine in this process (``weights``: the value, or a ref to get), or
        ``weights`` (a ref) into every replica under one deadline (``generation_timeout``): a
        sync takes as long as the slowest replica, not the sum; one that fails or misses it is
        restarted with these weights, the others keep them."""
        if not self.pool.paused and self._thread is not None:
            raise RuntimeError("load_weights() while generating: call pause_rollout() first")
        if self.pool.in_process:
            if isinstance(weights, miniray.ObjectRef):
                weights = miniray.get(
                    weights, timeout=self.config.async_training.generation_timeout
                )
            self.engine.load_weights(weights, take=True)
            self.pool.loaded(0, int(version))
        else:
            loads = self.pool.load(weights, int(version))
            for lane in loads.missed:
                failure = ReplicaFailed(lane, "load_weights", loads.why(lane))
                self._replica_failed(lane, [], failure)
        return self._adopt(version)

    def swap_weights(
        self,
        version: int,
        *,
        weights: Any = None,
        refs: list[Any] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, float]:
        """``pause_rollout``, ``load_weights(weights)`` (or ``load_weights_from(refs)``) and
        ``resume_rollout`` in one call, the synchronizer's (``param_sync``): the generation
        stops only while the weights load, not for two more round trips through the driver.
        Resumes whether or not the load succeeded, as the synchronizer's own resume does.
        Answers the seconds spent waiting for the generation to stop and loading, and
        ``by_value``: whether the next sync should send the weights themselves rather than a
        ref (one engine, in this process: ``refs=`` would cost a round trip to fetch them,
        1.3 ms of a ~40 ms demo step; replicas load the published object by its ref).

        Swaps run one at a time, and one whose ``version`` is not newer than the version
        running is skipped (answering ``skipped``): versions never go back, whatever order
        two calls sent close together arrive in."""
        if (weights is None) == (refs is None):
            raise TypeError("swap_weights() takes exactly one of weights= or refs=")
        started = time.monotonic()
        if not self._swap_lock.acquire(timeout=timeout):
            raise TimeoutError(
                f"swap_weights(version={version}) waited {timeout:g}s for the swap before it: "
                "a load hung, or one takes longer than async_training.sync_timeout; look for "
                "a stuck engine or raise that timeout"
            )
        try:
            with self._cond:
                if int(version) <= self.version:
                    return {
                        "pause_s": 0.0,
                        "load_s": 0.0,
                        "by_value": self.pool.in_process,
                        "skipped": True,
                    }
            self.pause_rollout(max(0.0, timeout - (time.monotonic() - started)))
            paused = time.monotonic()
            try:
                if refs is not None:
                    self.load_weights_from(refs, version)
                else:
                    self.load_weights(weights, version)
            finally:
                self.resume_rollout()
        finally:
            self._swap_lock.release()
        return {
            "pause_s": paused - started,
            "load_s": time.monotonic() - paused,
            "by_value": self.pool.in_process,
        }

    def _adopt(self, version: int) -> bool:
        with self._cond:
            if self.config.async_training.resume_on_load:
                # The sync's resume_rollout is a round trip away and finds us running: that
                # round trip was ~5% of the CPU rollouter's time at one sync per step.
                self.pool.resume()
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
        self.pool.shutdown()
        return True

    def get_statistics(self) -> dict[str, Any]:
        with self._cond:
            stats: dict[str, Any] = {
                **self.idle.counts(),
                **self.sampler.counts,
                **self.sender.counts,
            }
            stats.update(
                version=self.version,
                paused=self.pool.paused,
                error=self._error,
                alive=self._thread is not None and self._thread.is_alive(),
            )
        elapsed = max(1e-9, time.time() - stats["started_at"])
        stats["idle_ratio"] = stats["idle_seconds"] / elapsed
        stats["rollout_replicas"] = self.num_replicas
        stats["replica_failures"] = self.pool.failures
        stats["replica_restarts"] = self.pool.restarts
        stats["replicas"] = self.pool.statistics(elapsed)  # tokens/s, idle ratio, node, ...
        stats["peak_rss_gib"] = peak_rss_gib()  # the generate phase's, in its own process
        return stats
