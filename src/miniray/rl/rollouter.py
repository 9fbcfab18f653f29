"""FullyAsyncRollouter: generates groups of responses continuously and puts them in the queue.

    generation thread                           actor methods (other threads)
    loop: wait while paused  <------------------ pause_rollout(): set paused, stop the current
          admit? (staleness room)                  generation at the next token, wait until
          generate a group at version v            the loop is idle; returns True
          score, stamp v_start=v, put(v) ------> queue (rejects what is already too stale)
          on error: record it, close the queue   resume_rollout(): clear paused, wake the loop
                    with that error              load_weights(w, v): only while paused

Admission control (``staleness.admission_capacity``) keeps the rollouter from running more
than ``staleness_threshold`` versions ahead of the trainer, so the queue's stale rejections stay
rare. A generation interrupted by a pause is dropped, not put: its tokens came from weights that
are about to change (partial rollouts that continue with the new weights are future work).

Prompts come from ``data_position.PromptCursor`` in a fixed seeded order; each group records its
prompt position in ``Sample.metadata["prompt_position"]``. A dropped or stale-rejected group
gives its position back, so the prompt is generated again rather than lost, and a resumed run
(``restore_data_position``) issues exactly the prompts not trained before its checkpoint.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import miniray
from miniray.config import from_dict
from miniray.rl._remote import actor_constructor
from miniray.rl.config import RLConfig
from miniray.rl.data_position import PromptCursor, PromptOrder, TrainedPositions
from miniray.rl.staleness import admission_capacity
from miniray.rl.tasks import exact_match_reward, load_prompts
from miniray.rl.types import Sample

RewardFn = Callable[[str, str], float]
CALL_TIMEOUT_S = 60.0


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
        seed: int = 0,
    ):
        self.config = as_rl_config(config)
        cfg = self.config
        if engine is None:
            from miniray.rl.engines import build_engine

            engine = build_engine(
                cfg.actor_rollout_ref.rollout.name,
                model_path=cfg.actor_rollout_ref.model.path,
                seed=seed,
            )
        self.engine = engine
        from miniray.rl.models.tiny import load_tokenizer

        self.tokenizer = load_tokenizer(cfg.actor_rollout_ref.model.path)
        self.rows = [row for path in cfg.data.train_files for row in load_prompts(path)]
        if not self.rows:
            raise ValueError(f"data.train_files={cfg.data.train_files} hold no prompts")
        self.queue = queue
        self.reward_fn = reward_fn or exact_match_reward
        self.order = PromptOrder(len(self.rows), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.cursor = PromptCursor()
        self._resumed_groups = 0  # groups trained before the checkpoint this run resumed from
        self.group_ids = itertools.count()
        self.version = 0
        self._cond = threading.Condition()
        self._paused = False
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
            "generate_seconds": 0.0,
            "idle_seconds": 0.0,
            "started_at": time.time(),
        }

    # -- generation -------------------------------------------------------------------------
    def generate_group(self, version: int | None = None) -> list[Sample] | None:
        """One prompt, ``rollout.n`` responses, scored and stamped; None if interrupted."""
        cfg = self.config
        rollout = cfg.actor_rollout_ref.rollout
        position = self.cursor.next()
        row = self.rows[self.order.row(position)]
        prompt_key = cfg.data.prompt_key if cfg.data.prompt_key in row else "prompt"
        prompt_ids = [self.tokenizer.bos_token_id, *self.tokenizer(row[prompt_key])["input_ids"]]
        prompt_ids = [t for t in prompt_ids if t is not None][: cfg.data.max_prompt_length]
        v = self.version if version is None else version
        started = time.time()
        gens = self.engine.generate(
            [prompt_ids] * rollout.n,
            max_new_tokens=cfg.data.max_response_length,
            temperature=rollout.temperature,
            should_stop=lambda: self._paused or self._stop,
        )
        self.stats["generate_seconds"] += time.time() - started
        if any(g.finish_reason == "aborted" for g in gens):
            self.stats["groups_aborted"] += 1
            self.cursor.give_back(position)
            return None
        group_id = f"g{next(self.group_ids)}"
        truth = str(row.get("ground_truth", row.get(cfg.data.answer_key, "")))
        samples = []
        for gen in gens:
            text = self.tokenizer.decode(gen.response_token_ids, skip_special_tokens=True)
            samples.append(
                Sample(
                    prompt_token_ids=gen.prompt_token_ids,
                    response_token_ids=gen.response_token_ids,
                    response_logprobs=gen.response_logprobs,
                    reward=float(self.reward_fn(text, truth)),
                    group_id=group_id,
                    v_start=v,
                    created_at=started,
                    finished_at=time.time(),
                    prompt=row[prompt_key],
                    response=text,
                    metadata={"prompt_position": position},
                )
            )
        self.stats["groups_generated"] += 1
        return samples

    def generate_batch(self, num_groups: int, version: int | None = None) -> list[list[Sample]]:
        """The synchronous baseline's call: ``num_groups`` groups now, at this version."""
        groups = []
        while len(groups) < num_groups:
            group = self.generate_group(version)
            if group is not None:
                groups.append(group)
        return groups

    def start(self) -> bool:
        """Start the generation loop (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rollouter", daemon=True)
            self._thread.start()
        return True

    def _admission_room(self) -> int:
        cfg = self.config
        accepted = self.stats["groups_accepted"]
        return admission_capacity(
            current_version=self.version,
            staleness_threshold=cfg.async_training.staleness_threshold,
            consumer_batch_size=cfg.data.train_batch_size * cfg.trainer.trigger_parameter_sync_step,
            max_concurrent=1,
            accepted=int(accepted) + self._resumed_groups,
            running=0,
        )

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    waited = time.time()
                    while not self._stop and (self._paused or self._admission_room() <= 0):
                        # Woken by resume, stop and load_weights (a new version makes room);
                        # the timeout only bounds the wait should a wake-up ever be missed.
                        self._cond.wait(1.0)
                    self.stats["idle_seconds"] += time.time() - waited
                    if self._stop:
                        return
                    self._generating = True
                    version = self.version
                try:
                    group = self.generate_group(version)
                finally:
                    with self._cond:
                        self._generating = False
                        self._cond.notify_all()
                if group is not None:
                    self._put(group, version)
        except BaseException as exc:
            self._error = "".join(traceback.format_exception(exc))
            if self.queue is not None:
                _call(self.queue, "close", f"the rollouter crashed:\n{self._error}")

    def _put(self, group: list[Sample], version: int) -> None:
        while not self._stop:
            result = _call(self.queue, "put_samples", group, version, timeout=1.0)
            name = getattr(result, "name", str(result))
            if name == "ACCEPTED":
                self.stats["groups_accepted"] += 1
                return
            if name == "REJECTED_STALE":
                self.stats["groups_rejected_stale"] += 1
                self.cursor.give_back(group[0].metadata["prompt_position"])
                return
            if name == "CLOSED":
                self._stop = True
                return
            self.stats["groups_rejected_full"] += 1  # full: try again after the wait

    # -- control ----------------------------------------------------------------------------
    def restore_data_position(self, trained: dict[str, Any]) -> int:
        """Resume the prompt stream after a checkpoint (``TrainedPositions.to_dict()``): issue
        every position not trained yet, and count the trained groups for admission control as
        if this run had produced them. Only before ``start()``; returns the next position."""
        if self._thread is not None:
            raise RuntimeError("restore_data_position() after start(): call it before start()")
        positions = TrainedPositions.from_dict(trained)
        self.cursor = PromptCursor(positions)
        self._resumed_groups = len(positions)
        return positions.watermark

    def pause_rollout(self, timeout: float = 30.0) -> bool:
        """Stop generating (the current generation stops at its next token); True when idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._paused = True
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
        if not self._paused and self._thread is not None:
            raise RuntimeError("load_weights() while generating: call pause_rollout() first")
        self.engine.load_weights(weights)
        with self._cond:
            self.version = int(version)
            self._cond.notify_all()
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return True

    def get_statistics(self) -> dict[str, Any]:
        with self._cond:
            stats = dict(self.stats)
            stats.update(
                version=self.version,
                paused=self._paused,
                error=self._error,
                alive=self._thread is not None and self._thread.is_alive(),
            )
        elapsed = max(1e-9, time.time() - stats["started_at"])
        stats["idle_ratio"] = stats["idle_seconds"] / elapsed
        return stats


def _call(target: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a method on a local object or an actor handle, waiting at most CALL_TIMEOUT_S."""
    if isinstance(target, miniray.ActorHandle):
        return miniray.get(getattr(target, method).remote(*args, **kwargs), timeout=CALL_TIMEOUT_S)
    return getattr(target, method)(*args, **kwargs)
