"""UnifiedParameterSynchronizer: publishes the trainer's weights to the rollouter(s), versioned.

One sync to version ``v``, and who waits for what::

    caller                                    rollouter(s)                     trainer
    sync(v): refuse unless v > current version; take the sync lock (one sync at a time)
      attempt 1..1+max_sync_retries:
        1. pause_rollout()     ---------->    stop starting work, answer True
        2. get_weights()       ------------------------------------------->    named tensors
        3. load_weights(w, v)  ---------->    load, then adopt version v
         (a failed attempt sleeps sync_retry_delay, then retries; a timeout ends the sync,
          and so does an endpoint whose actor is dead: it cannot come back to answer)
      4. current version := v   (only once every rollouter loaded; a failed sync keeps the old)
      5. finally: resume_rollout() -------->  (always, with its own bounded wait)

A rollouter that offers ``swap_weights`` (``FullyAsyncRollouter``) gets steps 1, 3 and 5 as one
call, after step 2: it pauses, loads and resumes itself, so its generation stops only while it
loads, and the weights reach it two round trips sooner (step 5 then runs only if the swap
failed). The demo's sync, measured on 2 busy cores: the pause's answer and the load's call cost
~1.5-2.5 ms each against ~2.5 ms of loading, once per ~38 ms training step, and with the
staleness bound at 1 the next batch cannot start before the new version is loaded.

Every wait is bounded by one deadline, ``start + sync_timeout``; every call goes through
``rl.endpoints`` (an actor handle or a plain object alike), so a hung call cannot hang the caller
(TRL #6913: a sync that hangs must resume the rollouter and raise).
With actor handles the weights travel trainer -> rollouter as an object ref, not through the
synchronizer.

The protocol the two sides offer (``TrainerEndpoint``, ``RolloutEndpoint`` below) is four
methods. The seed's three ways of use (async, actor and classic mode) and its class names live in
``rl.compat``; they all run the one ``sync`` here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import miniray
from miniray.errors import ActorDiedError
from miniray.rl.compat import SeedSyncModes, actor_constructor
from miniray.rl.config_loading import async_training_config
from miniray.rl.endpoints import Pending, call
from miniray.rl.errors import ParameterSyncError, ParameterSyncTimeoutError
from miniray.rl.staleness import check_version, is_valid_version_bump, version_after_sync
from miniray.rl.types import SyncResult

__all__ = [
    "ParameterSyncError",
    "ParameterSyncTimeoutError",
    "RolloutEndpoint",
    "TrainerEndpoint",
    "UnifiedParameterSynchronizer",
    "load_call",
    "weights_info",
]

logger = logging.getLogger(__name__)

TRAINER_METHODS = ("get_weights",)
ROLLOUT_METHODS = ("pause_rollout", "resume_rollout", "load_weights")
_PHASES = ("pause", "transfer", "load", "resume", "total")
_TIMEOUT_NOTE = "the sync's deadline (async_training.sync_timeout)"


@runtime_checkable
class TrainerEndpoint(Protocol):
    """What the synchronizer needs from a trainer (an object or an actor handle)."""

    def get_weights(self) -> Mapping[str, Any]:
        """The current weights as ``{name: tensor}`` (copies or read-only views)."""
        ...


@runtime_checkable
class RolloutEndpoint(Protocol):
    """What the synchronizer needs from a rollouter (an object or an actor handle)."""

    def pause_rollout(self) -> bool:
        """Stop starting new work; idempotent, safe while idle; ``True`` when paused.

        After a sync timeout, ``resume_rollout`` may arrive while this call is still running;
        the rollouter must let the later call win, or it would stay paused for good.
        """
        ...

    def resume_rollout(self) -> bool:
        """Start generating again; idempotent; ``True``."""
        ...

    def load_weights(self, weights: Mapping[str, Any], version: int) -> Any:
        """Load ``weights``, then adopt ``version`` for new samples. ``False`` means refused."""
        ...


class _PhaseTimeout(TimeoutError):
    """The sync's deadline ran out. Private, so that no endpoint can raise one: catching it
    catches our own deadline only, never a timeout an endpoint's method raised."""


class UnifiedParameterSynchronizer(SeedSyncModes):
    """Versioned weight sync from a trainer to rollouters, with retries and timeouts.

    ``config`` is an ``RLConfig``, its ``async_training`` section, or a plain dict of either.
    ``trainer_actor``/``rollouter_actor`` are endpoints (objects or actor handles) or lists of
    them; the first trainer's weights go to every rollouter. ``as_ray_actor`` adds
    ``is_ready`` to the statistics (``ParameterSyncManager`` sets it). ``clock`` and ``sleep``
    are injectable for tests.
    """

    def __init__(
        self,
        config: Any = None,
        trainer_actor: Any = None,
        rollouter_actor: Any = None,
        as_ray_actor: bool = False,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ):
        self.config = async_training_config(config)
        self.as_ray_actor = bool(as_ray_actor)
        self._clock = clock or time.monotonic
        self._sleep = sleep or time.sleep
        self._trainers = _as_list(trainer_actor)
        self._rollouters = _as_list(rollouter_actor)
        _check_protocol(self._trainers, TRAINER_METHODS, "trainer_actor")
        _check_protocol(self._rollouters, ROLLOUT_METHODS, "rollouter_actor")
        self._group_initialized = bool(self._trainers and self._rollouters)
        self._version = 0
        self._closed = False
        self._sync_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._weights_info: dict[str, dict[str, Any]] | None = None
        # Per rollouter (``_endpoint_key``): whether its swap_weights asked for values.
        self._by_value: dict[Any, bool] = {}
        self._counts = {"sync_count": 0, "sync_failures": 0, "timeouts": 0, "refused": 0}
        self._retries = 0
        self._bytes_total = 0
        self._last_sync_time: float | None = None
        self._last_success_at = self._clock()
        self._last_result: SyncResult | None = None
        self._latencies: dict[str, deque[float]] = {p: deque(maxlen=1000) for p in _PHASES}

    # -- versions and workers ---------------------------------------------------------------
    def get_current_version(self) -> int:
        return self._version

    def restore_version(self, version: int) -> int:
        """Start counting from ``version``: a run resumed from a checkpoint whose weights the
        rollouter already runs. Only before the first sync (versions never go back)."""
        check_version(version, "version")
        with self._sync_lock:
            if self._counts["sync_count"] or self._counts["sync_failures"]:
                raise RuntimeError(
                    f"restore_version({version}) after a sync: versions only move forward "
                    "through sync_to_rollouter"
                )
            self._version = int(version)
        return self._version

    def register_workers(self, actor_workers: Any, rollout_workers: Any) -> bool:
        """Remember the trainer workers (weights come from the first) and rollout workers."""
        trainers, rollouters = _as_list(actor_workers), _as_list(rollout_workers)
        if not trainers:
            raise ValueError("register_workers(): actor_workers is empty; pass at least one")
        if not rollouters:
            raise ValueError("register_workers(): rollout_workers is empty; pass at least one")
        _check_protocol(trainers, TRAINER_METHODS, "actor_workers")
        _check_protocol(rollouters, ROLLOUT_METHODS, "rollout_workers")
        with self._sync_lock:
            self._trainers, self._rollouters = trainers, rollouters
            self._group_initialized = True
            self._closed = False
        return True

    # -- the one sync -----------------------------------------------------------------------
    def sync(
        self,
        version: int | None = None,
        *,
        trainers: Any = (),
        rollouters: Any = (),
        started: Pending | None = None,
    ) -> SyncResult:
        """Run one sync to ``version`` (default: current + 1); never raises for a failed sync,
        the result says what happened. ``trainers``/``rollouters`` (an endpoint or a list;
        default: the registered ones) are for this sync only. ``started``: the first
        attempt's ``swap_weights`` call to the one rollouter, sent already (``swap_call`` with
        the weights' ref before they were there: the runtime delivers it once they are, with
        no round trip through the caller); a failed one is retried as usual."""
        if version is not None:
            check_version(version, "new_version")
        trainers, rollouters = _as_list(trainers), _as_list(rollouters)
        if trainers:
            _check_protocol(trainers, TRAINER_METHODS, "actor_workers")
        if rollouters:
            _check_protocol(rollouters, ROLLOUT_METHODS, "rollout_workers")
        # No timeout on the lock: whoever holds it is bounded by its own deadlines (the sync's
        # and the resume's), so a waiting caller is bounded too.
        with self._sync_lock:
            if self._closed:
                raise RuntimeError(
                    "this synchronizer was cleaned up; register_workers() to use it again"
                )
            trainers = trainers or self._trainers
            rollouters = rollouters or self._rollouters
            if not trainers or not rollouters:
                missing = "trainer" if not trainers else "rollouter"
                raise RuntimeError(
                    f"no {missing} to sync: pass trainer_actor/rollouter_actor to the "
                    "constructor, call register_workers(), or pass workers to sync_weights()"
                )
            current = self._version
            target = current + 1 if version is None else version
            if not is_valid_version_bump(current, target):
                logger.warning(
                    "refused a sync to version %d: the current version is already %d",
                    target,
                    current,
                )
                result = SyncResult("refused", target, current, current, resumed=True)
                result.error = f"version {target} is not newer than the current version {current}"
                self._record(result)
                return result
            result = self._run_sync(trainers, rollouters, current, target, started)
            self._version = result.current_version
            self._record(result)
            return result

    def _run_sync(
        self,
        trainers: list[Any],
        rollouters: list[Any],
        current: int,
        target: int,
        started: Pending | None = None,
    ) -> SyncResult:
        cfg = self.config
        result = SyncResult("failed", target, current, current)
        start = self._clock()
        deadline = start + cfg.sync_timeout
        loaded = resumed = False
        try:
            attempts = 1 + cfg.max_sync_retries
            for attempt in range(1, attempts + 1):
                result.attempts = attempt
                try:
                    if started is not None and attempt == 1:
                        resumed = self._started_swap(rollouters, started, deadline, result)
                    else:
                        resumed = self._attempt(trainers, rollouters, target, deadline, result)
                    loaded = True
                    break
                except _PhaseTimeout:
                    raise
                except Exception as exc:  # a failed attempt: retrying is this class's policy
                    result.error = _describe(exc)
                    if attempt == attempts or is_dead_actor(exc):
                        raise
                    if self._clock() + cfg.sync_retry_delay >= deadline:
                        raise _PhaseTimeout(
                            f"sync to version {target}: no time left for attempt "
                            f"{attempt + 1} within sync_timeout={cfg.sync_timeout}s after: "
                            f"{result.error}"
                        ) from exc
                    logger.warning(
                        "sync to version %d, attempt %d/%d failed (%s); retrying in %.3g s",
                        target,
                        attempt,
                        attempts,
                        result.error,
                        cfg.sync_retry_delay,
                    )
                    self._sleep(cfg.sync_retry_delay)
            result.status = "ok"
            result.error = None
        except _PhaseTimeout as exc:
            result.status = "timeout"
            result.error = str(exc)
        except Exception as exc:  # reported in the result and raised by the public methods
            result.status = "failed"
            result.error = _describe(exc)
        finally:
            # Resume always runs, whatever happened above: a rollouter left paused by a failed
            # sync would stall the whole run silently. It gets its own bounded wait because
            # the sync's deadline may already be spent. A swap that succeeded resumed itself.
            t = self._clock()
            resume_error = (
                None if resumed else self._resume(rollouters, self._clock() + cfg.sync_timeout)
            )
            result.resume_s = self._clock() - t
            result.resumed = resume_error is None
            if resume_error is not None:
                result.error = f"{result.error}; {resume_error}" if result.error else resume_error
                if result.status == "ok":
                    result.status = "failed"
        # The weights were loaded even if resume failed afterwards: the version follows what
        # the rollouter runs.
        result.current_version = version_after_sync(current, target, succeeded=loaded)
        result.total_s = self._clock() - start
        return result

    def _attempt(
        self,
        trainers: list[Any],
        rollouters: list[Any],
        target: int,
        deadline: float,
        result: SyncResult,
    ) -> bool:
        """One attempt; True when the rollouters resumed themselves (``swap_weights``)."""
        if all(_has_method(r, "swap_weights") for r in rollouters):
            self._swap(trainers[0], rollouters, target, deadline, result)
            return True
        t = self._clock()
        calls = [call(r, "pause_rollout") for r in rollouters]
        for r, ok in zip(rollouters, self._wait_all(calls, deadline)):
            if ok is False:
                raise RuntimeError(f"pause_rollout() of {r!r} returned False")
        result.pause_s += self._clock() - t

        weights = self._transfer(trainers[0], rollouters, deadline, result)
        t = self._clock()
        calls = [load_call(r, weights, target) for r in rollouters]
        for r, ok in zip(rollouters, self._wait_all(calls, deadline)):
            if ok is False:
                raise RuntimeError(f"load_weights() of {r!r} returned False")
        result.load_s += self._clock() - t
        return False

    def _swap(
        self, trainer: Any, rollouters: list[Any], target: int, deadline: float, result: SyncResult
    ) -> None:
        """Steps 1, 3 and 5 in one ``swap_weights`` call per rollouter, the weights fetched
        first. Its answer splits the call's time: waiting for the generation to stop is the
        pause phase, the rest the load."""
        weights = self._transfer(trainer, rollouters, deadline, result)
        t = self._clock()
        timeout = max(0.0, deadline - self._clock())
        calls = [
            swap_call(
                r, weights, target, timeout, by_value=self._by_value.get(_endpoint_key(r), False)
            )
            for r in rollouters
        ]
        answers = self._wait_all(calls, deadline)
        took = self._clock() - t
        for r, answer in zip(rollouters, answers):  # how each wants the next sync's weights
            self._by_value[_endpoint_key(r)] = bool(answer.get("by_value", False))
        paused = max((float(a.get("pause_s", 0.0)) for a in answers), default=0.0)
        result.pause_s += min(paused, took)
        result.load_s += took - min(paused, took)

    def _started_swap(
        self, rollouters: list[Any], started: Pending, deadline: float, result: SyncResult
    ) -> bool:
        """Wait for a ``swap_weights`` call sent before the sync (``sync(started=...)``); its
        phases are the rollouter's own (the call waited for the weights before it ran)."""
        if len(rollouters) != 1 or not _has_method(rollouters[0], "swap_weights"):
            raise ValueError("a started swap_weights call needs exactly one rollouter offering it")
        (answer,) = self._wait_all([started], deadline)
        self._by_value[_endpoint_key(rollouters[0])] = bool(answer.get("by_value", False))
        result.pause_s += float(answer.get("pause_s", 0.0))
        result.load_s += float(answer.get("load_s", 0.0))
        return True

    def wants_value(self, rollouter: Any) -> bool:
        """Whether ``rollouter`` asked for its weights by value (``swap_call(by_value=True)``)
        in its last ``swap_weights`` answer: one engine in its own process."""
        return self._by_value.get(_endpoint_key(rollouter), False)

    def _transfer(
        self, trainer: Any, rollouters: list[Any], deadline: float, result: SyncResult
    ) -> Any:
        """Step 2, timed into ``result``: the weights in the form the rollouters take."""
        t = self._clock()
        weights, result.bytes = self._fetch_weights(trainer, rollouters, deadline)
        result.transfer_s += self._clock() - t
        return weights

    def _fetch_weights(
        self, trainer: Any, rollouters: list[Any], deadline: float
    ) -> tuple[Any, int]:
        """The weights in the form the rollouters take, and their size in bytes."""
        any_plain = any(not isinstance(r, miniray.ActorHandle) for r in rollouters)
        pending = call(trainer, "get_weights")
        ref = pending.ref
        if ref is None:
            value = self._result(pending, deadline)
            if not isinstance(value, miniray.ObjectRef):
                self._weights_info = weights_info(value)
                if len(rollouters) > 1 and not any_plain:
                    value = miniray.put(value)  # ship once, not once per rollouter
                return value, _total_bytes(self._weights_info)
            # Already in the object store (a snapshot put while the rollouter generated).
            ref = value
        pending = Pending(ref, pending.what)
        if self._weights_info is None or any_plain:
            value = self._result(pending, deadline)
            self._weights_info = weights_info(value)
            return (value if any_plain else ref), _total_bytes(self._weights_info)
        # Only readiness: the value is not fetched here, it goes from the object store to the
        # rollouters.
        if not pending.wait(deadline, clock=self._clock):
            raise _PhaseTimeout(
                f"get_weights() of {trainer!r} did not finish within the sync deadline "
                f"(sync_timeout={self.config.sync_timeout}s)"
            )
        # The ref goes to every rollouter: the weights move trainer -> rollouter directly.
        return ref, _total_bytes(self._weights_info)

    def _resume(self, rollouters: list[Any], deadline: float) -> str | None:
        errors = []
        calls = []
        for r in rollouters:
            try:
                calls.append((r, call(r, "resume_rollout")))
            except Exception as exc:  # recorded; the other rollouters still get resumed
                errors.append(f"resume_rollout() of {r!r} failed: {_describe(exc)}")
        for r, pending in calls:
            try:
                self._result(pending, deadline)
            except Exception as exc:  # recorded; the other rollouters still get resumed
                errors.append(f"resume_rollout() of {r!r} failed: {_describe(exc)}")
        return "; ".join(errors) if errors else None

    def _wait_all(self, calls: list[Pending], deadline: float) -> list[Any]:
        return [self._result(c, deadline) for c in calls]

    def _result(self, pending: Pending, deadline: float) -> Any:
        """The call's value, its own error re-raised, or ``_PhaseTimeout`` at the deadline."""
        return pending.result(deadline, clock=self._clock, timeout_error=_phase_timeout)

    # -- statistics -------------------------------------------------------------------------
    def _record(self, result: SyncResult) -> None:
        with self._stats_lock:
            self._last_result = result
            if result.status == "refused":
                self._counts["refused"] += 1
                return
            self._retries += max(0, result.attempts - 1)
            if result.status == "ok":
                self._counts["sync_count"] += 1
                self._last_sync_time = time.time()
                self._last_success_at = self._clock()
                self._bytes_total += result.bytes
                for phase in _PHASES:
                    self._latencies[phase].append(getattr(result, f"{phase}_s"))
            else:
                self._counts["sync_failures"] += 1
                if result.status == "timeout":
                    self._counts["timeouts"] += 1
                logger.error("weight sync to version %d failed: %s", result.version, result.error)

    def get_statistics(self) -> dict[str, Any]:
        with self._stats_lock:
            since = self._clock() - self._last_success_at
            stats: dict[str, Any] = {
                "sync_count": self._counts["sync_count"],
                "sync_failures": self._counts["sync_failures"],
                "last_sync_time": self._last_sync_time,
                "sync_group_initialized": self._group_initialized,
                "current_param_version": self._version,
                "current_version": self._version,
                "sync_timeouts": self._counts["timeouts"],
                "sync_refused": self._counts["refused"],
                "sync_retries": self._retries,
                "bytes_total": self._bytes_total,
                "seconds_since_last_sync": since,
                "sync_overdue": since > self.config.sync_monitor_interval,
                "last_result": None if self._last_result is None else self._last_result.to_dict(),
            }
            for phase in _PHASES:
                values = list(self._latencies[phase])
                stats[f"{phase}_s_p50"] = _percentile(values, 50)
                stats[f"{phase}_s_p95"] = _percentile(values, 95)
                stats[f"{phase}_s_max"] = max(values) if values else None
            if self.as_ray_actor:
                stats["is_ready"] = self.is_ready()
            return stats

    def is_ready(self) -> bool:
        """True when a trainer and a rollouter are known and the synchronizer is usable."""
        return bool(self._trainers and self._rollouters) and not self._closed

    def get_weights_info(self) -> dict[str, dict[str, Any]]:
        """``{name: {"shape", "dtype", "nbytes"}}`` of the published weights (asks the trainer
        when no sync has run yet)."""
        if self._weights_info is None:
            if not self._trainers:
                raise RuntimeError(
                    "get_weights_info(): no trainer registered; pass trainer_actor or call "
                    "register_workers() first"
                )
            deadline = self._clock() + self.config.sync_timeout
            trainer = self._trainers[0]
            weights = self._result(call(trainer, "get_weights"), deadline)
            self._weights_info = weights_info(weights)
        return dict(self._weights_info)

    def cleanup(self) -> None:
        """Forget the workers; later syncs raise until ``register_workers`` is called again."""
        with self._sync_lock:
            self._trainers, self._rollouters = [], []
            self._group_initialized = False
            self._closed = True


class ParameterSynchronizerActor(UnifiedParameterSynchronizer):
    """The form that runs as an actor (``ParameterSyncManager.remote(config)``)."""

    def __init__(
        self,
        config: Any = None,
        trainer_actor: Any = None,
        rollouter_actor: Any = None,
        as_ray_actor: bool = True,
        **kwargs: Any,
    ):
        super().__init__(config, trainer_actor, rollouter_actor, as_ray_actor, **kwargs)


# A threaded actor: get_statistics() answers while a sync is in progress.
_ACTOR_OPTIONS = {"max_concurrency": 8}
UnifiedParameterSynchronizer.remote = actor_constructor(  # type: ignore[attr-defined]
    kind="remote", actor_class=ParameterSynchronizerActor, **_ACTOR_OPTIONS
)
UnifiedParameterSynchronizer.options = actor_constructor(  # type: ignore[attr-defined]
    kind="options", actor_class=ParameterSynchronizerActor, **_ACTOR_OPTIONS
)


# -- helpers ------------------------------------------------------------------------------------
def is_dead_actor(exc: BaseException) -> bool:
    """True when ``exc`` says an endpoint's actor is dead for good (killed, out of restarts):
    retrying it only spends ``sync_retry_delay`` and the sync's deadline before the same
    answer. A restarting actor (``ActorUnavailableError``) may answer a retry, so it is not."""
    return isinstance(exc, ActorDiedError)


def weights_info(weights: Any) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "dtype", "nbytes"}}`` of a mapping (or pairs) of named tensors."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    info = {}
    try:
        for name, tensor in items:
            shape = getattr(tensor, "shape", None)
            info[str(name)] = {
                "shape": tuple(shape) if shape is not None else None,
                "dtype": str(getattr(tensor, "dtype", type(tensor).__name__)),
                "nbytes": _nbytes(tensor),
            }
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "get_weights() must return a mapping {name: tensor} or (name, tensor) pairs, "
            f"got {type(weights).__name__}"
        ) from exc
    return info


def _nbytes(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.element_size() * value.numel())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return 0


def _total_bytes(info: Mapping[str, Mapping[str, Any]] | None) -> int:
    return sum(entry["nbytes"] for entry in info.values()) if info else 0


def _as_list(workers: Any) -> list[Any]:
    if workers is None:
        return []
    if isinstance(workers, (list, tuple)):
        return list(workers)
    return [workers]


def _check_protocol(endpoints: list[Any], methods: tuple[str, ...], what: str) -> None:
    for endpoint in endpoints:
        missing = [m for m in methods if not _has_method(endpoint, m)]
        if missing:
            raise TypeError(
                f"{what}={endpoint!r} does not offer {missing}: a synchronizer needs "
                f"{list(methods)} on every {what.split('_')[0]} endpoint"
            )


def load_call(rollouter: Any, weights: Any, version: int) -> Pending:
    """Start loading ``weights`` into ``rollouter`` as ``version``. Weights already in the
    object store go to a rollouter that offers ``load_weights_from`` as the ref itself, in a
    list (the runtime resolves only top-level refs): ``FullyAsyncRollouter`` hands that one
    object to its replicas, where ``load_weights`` of the value would put a second copy."""
    if isinstance(weights, miniray.ObjectRef) and (
        isinstance(rollouter, miniray.ActorHandle) and _has_method(rollouter, "load_weights_from")
    ):
        return call(rollouter, "load_weights_from", [weights], version)
    return call(rollouter, "load_weights", weights, version)


def swap_call(
    rollouter: Any, weights: Any, version: int, timeout: float, *, by_value: bool = False
) -> Pending:
    """Start ``rollouter.swap_weights``: a ref goes in a list (``refs=``), so the rollouter hands
    that one object to its replicas; a value goes as ``weights=``, and so does a ref when
    ``by_value`` (the runtime then delivers the value with the call: a rollouter whose engine
    is in its own process saves the round trip of fetching it)."""
    if (
        not by_value
        and isinstance(weights, miniray.ObjectRef)
        and isinstance(rollouter, miniray.ActorHandle)
    ):
        return call(rollouter, "swap_weights", version, refs=[weights], timeout=timeout)
    return call(rollouter, "swap_weights", version, weights=weights, timeout=timeout)


def _endpoint_key(endpoint: Any) -> Any:
    """An actor by its id (a handle made again for it is the same endpoint), else the object."""
    if isinstance(endpoint, miniray.ActorHandle):
        return ("actor", endpoint.actor_id)
    return ("object", id(endpoint))


def _has_method(endpoint: Any, name: str) -> bool:
    if isinstance(endpoint, miniray.ActorHandle):
        try:
            getattr(endpoint, name)
        except AttributeError:
            return False
        return True
    return callable(getattr(endpoint, name, None))


def _phase_timeout(what: str) -> _PhaseTimeout:
    return _PhaseTimeout(f"{what} did not answer within {_TIMEOUT_NOTE}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]
