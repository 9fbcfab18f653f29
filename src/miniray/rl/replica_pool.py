"""ReplicaPool: a run's rollout replicas, started, restarted, called together and counted, once
for both of its users: the RL rollouter's ``EngineReplica`` actors (``rl/replicas.py``) and
distillation's ``RolloutWorker`` actors (``rl/distill``).

    user (rollouter / GKD driver)         ReplicaPool                         replica i (actor)
    ReplicaPool.start(n, start_one) --->  start_one(i) for every i, then     --> ready(): node()
                                          every ready() under ONE deadline
    pool.fan_out("m", *args) -----------> call() every live replica, then    --> m(*args)
                                          wait for the answers under ONE
                                          deadline (fail_fast: the first
                                          failure ends the wait) <-- FanOut(values, failures, late)
    pool.load(ref, v) ------------------> fan_out("load_weights", ref, v); records each
                                          replica's loaded_version or missed_syncs
    pool.pause(timeout) ----------------> paused: each lane aborts its replica's call at the
                                          next token; returns when no call is in flight, or
                                          raises naming the replicas still generating
    pool.failed(i, cause) --------------> kill i; start_one(i), ready(), the last weights
                                          loaded, each bounded, while max_restarts allows;
                                          RuntimeError when no replica is left
    pool.run_lanes(lane)                  lane(i) on a thread per replica, until all return
    pool.gather(n, per_call, make)        n items from calls routed by pull (least loaded)
    pool.record(i, ...)                   the user's counts per replica (groups, tokens, seconds)

What a failure means is the user's to say: the rollouter and distillation's generation
(``distill/dispatch.py``) restart the replica and go on (their lanes hand its groups or its
chunk to the others), distillation's weight sync raises naming the worker (the run stops).
Every wait is an ``endpoints.Pending`` under the caller's deadline; ``clock`` is that deadline's
clock (tests pass a fake one). A replica is an actor handle; an in-process engine (the
rollouter's one replica) is a pool of ``in_process`` size 1: counted, never called through the
pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import miniray
from miniray.errors import RayActorError, RayTaskError
from miniray.rl.endpoints import Pending, call

__all__ = ["FanOut", "ReplicaPool", "describe_error"]

logger = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """``Type: first line`` of an error, the remote cause's for a ``RayTaskError``."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


@dataclass
class FanOut:
    """One call fanned out: ``values`` of the replicas that answered in time; ``failures``
    (replica -> why: ``died (...)``, ``raised ...``, or the user's check); ``late``: still running
    at the deadline; ``abandoned``: still running when a ``fail_fast`` failure ended the wait
    before the deadline (not missed: they were not given the time)."""

    values: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    late: list[int] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)

    @property
    def missed(self) -> list[int]:
        """Every replica that did not answer in time with a value: failed or late."""
        return sorted([*self.failures, *self.late])

    def why(self, replica: int) -> str:
        return self.failures.get(replica, "no answer before the deadline")


def _new_stats() -> dict[str, Any]:
    # groups finished, tokens generated, seconds in engine calls; the node it runs on (None:
    # in this process) and the weights version it loaded last (None: none yet, its start's).
    return {
        "groups": 0,
        "tokens": 0,
        "generate_seconds": 0.0,
        "failures": 0,
        "missed_syncs": 0,
        "alive": True,
        "node": None,
        "loaded_version": None,
    }


class ReplicaPool:
    """N replicas by index; ``handle(i)`` is None once replica ``i`` is gone for good."""

    def __init__(
        self,
        handles: Sequence[Any],
        *,
        start_one: Callable[[int], Any] | None = None,
        ready: str = "node",
        max_restarts: int = 0,
        start_timeout: float = 60.0,
        load_timeout: float = 60.0,
        names: Sequence[str] | None = None,
        in_process: bool = False,
        clock: Callable[[], float] = time.monotonic,
        lock: threading.Condition | None = None,
    ):
        """``handles``: the replicas (actor handles), already started. ``start_one(i)`` starts
        replica ``i`` again (None: no restarts); ``ready`` the method a started replica answers
        once it is up (its value is its ``node``); ``start_timeout`` bounds that answer,
        ``load_timeout`` a load. ``names`` label replicas in logs (default ``replica <i>``).
        ``lock``: the user's condition, which the pause state and the calls in flight are under
        (the rollouter's lanes check for a pause and count their call in one critical section,
        or a pause could return while a lane starts a call)."""
        if max_restarts < 0:
            raise ValueError(f"rollout.max_restarts={max_restarts} is invalid: must be >= 0")
        if max_restarts and start_one is None:
            raise ValueError("ReplicaPool: max_restarts > 0 needs start_one to restart a replica")
        self._handles: list[Any] = list(handles)
        self.names = list(names) if names is not None else [f"replica {i}" for i in self.indices]
        if len(self.names) != len(self._handles):
            raise ValueError(
                f"names has {len(self.names)} entries for {len(self._handles)} replicas: "
                "must be one name per replica"
            )
        self.in_process = in_process
        self.max_restarts = max_restarts
        self._start_one = start_one
        self._ready = ready
        self.start_timeout = start_timeout
        self.load_timeout = load_timeout
        self.clock = clock
        self._restarts_left = [max_restarts] * len(self._handles)
        self._weights: tuple[Any, int] | None = None  # the last load: a restart's weights
        self._lock = threading.Lock()  # the statistics'
        self.cond = lock if lock is not None else threading.Condition()
        self.paused = False  # under cond, as the rest of the pause state
        self._interrupt_at = 0.0  # clock() time a pause stops the calls in flight
        self._in_call = [0] * len(self._handles)  # the user's calls in flight, per replica
        self.failures = 0  # replicas that died, hung or missed a load
        self.restarts = 0
        self.stats = [_new_stats() for _ in self._handles]

    @classmethod
    def start(
        cls,
        count: int,
        start_one: Callable[[int], Any],
        *,
        require_all: bool = False,
        **options: Any,
    ) -> ReplicaPool:
        """Start ``count`` replicas together (so they come up in parallel), then wait for each
        one's ``ready()`` under one ``start_timeout`` deadline. One that does not come up is
        restarted as a failure is (``failed``); with no restarts left it stays gone.
        ``require_all``: one that does not come up kills them all and raises, naming it."""
        pool = cls([start_one(i) for i in range(count)], start_one=start_one, **options)
        up = pool.fan_out(pool._ready, deadline=pool.clock() + pool.start_timeout)
        for index, node in up.values.items():
            pool.stats[index]["node"] = node
        if require_all and up.missed:
            pool.shutdown()
            raise RuntimeError(
                "; ".join(f"{pool.names[i]} did not start: {up.why(i)}" for i in up.missed)
                + f" (waited {pool.start_timeout:g}s for its {pool._ready}()); look in that "
                "process's output for the cause (out of memory, an import error, a bad model "
                "path), or raise the start timeout if it was only slow"
            )
        for index in up.missed:
            pool.failed(index, f"{pool._ready}() at its start: {up.why(index)}")
        return pool

    @property
    def indices(self) -> range:
        return range(len(self._handles))

    @property
    def size(self) -> int:
        return len(self._handles)

    def handle(self, index: int) -> Any:
        return self._handles[index]

    def alive(self, index: int) -> bool:
        return self.in_process or self._handles[index] is not None

    def live(self) -> list[int]:
        return [i for i in self.indices if self.alive(i)]

    def run_lanes(self, lane: Callable[[int], None], name: str) -> None:
        """``lane(i)`` for every replica at once until each returns: replica 0's on the calling
        thread, the others' on a thread each (a lane is its replica's one caller: each replica
        has at most one call in flight, so a free replica is the least loaded one)."""
        threads = [
            threading.Thread(target=lane, args=(i,), name=f"{name}-{i}", daemon=True)
            for i in self.indices[1:]
        ]
        try:
            for thread in threads:
                thread.start()
            lane(0)
        finally:
            for thread in threads:
                thread.join()

    def gather(self, total: int, per_call: int, make: Callable[[int, int], list | None]) -> list:
        """``total`` items from calls ``make(replica, count)`` of at most ``per_call``, routed by
        pull: each replica's lane asks for the next call as soon as its last returned, so a
        fast replica makes more (least loaded: none has more than one call in flight). A call
        may make fewer (None: none, its items are the user's to give back); a lane whose
        replica is gone stops, and the others make the rest. A lane's error is raised here."""
        made: list = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        pending = [0]  # items being made by a lane

        def lane(index: int) -> None:
            while self.alive(index) and not errors:
                with lock:
                    count = min(per_call, total - len(made) - pending[0])
                    if count <= 0:
                        return
                    pending[0] += count
                try:
                    items = make(index, count) or []
                except BaseException as exc:  # raised in the caller's thread, below
                    errors.append(exc)
                    return
                with lock:
                    pending[0] -= count
                    made.extend(items)

        self.run_lanes(lane, "gather-lane")
        if errors:
            raise errors[0]
        if len(made) < total:  # every lane stopped: no replica is left
            raise RuntimeError(
                f"every rollout replica failed (rollout.max_restarts={self.max_restarts}) with "
                f"{len(made)} of {total} made; look for the cause in the replicas' output"
            )
        return made

    # -- calls -------------------------------------------------------------------------------
    def fan_out(
        self,
        method: str,
        *args: Any,
        deadline: float,
        fail_fast: bool = False,
        replicas: Sequence[int] | None = None,
    ) -> FanOut:
        """``method(*args)`` on every live replica (or on ``replicas``) at once, each answer
        waited for under the one ``deadline`` (``clock()`` seconds), so the whole takes as long
        as the slowest replica, not the sum. ``fail_fast``: the first failure ends the wait
        (the rest are ``abandoned``). Whatever has finished when the wait ends counts."""
        out = FanOut()
        pending: dict[int, Pending] = {}
        for index in self.live() if replicas is None else replicas:
            try:
                pending[index] = call(self._handles[index], method, *args)
            except Exception as exc:  # a dead handle can refuse the submission
                out.failures[index] = f"died ({describe_error(exc)})"
        expired = False
        while pending and not expired and not (fail_fast and out.failures):
            for index in self._finished(pending, deadline):
                try:
                    out.values[index] = pending.pop(index).result(deadline, clock=self.clock)
                except RayActorError as exc:
                    out.failures[index] = f"died ({describe_error(exc)})"
                except Exception as exc:  # the replica's own error, reported by the user
                    out.failures[index] = f"raised {describe_error(exc)}"
            expired = self.clock() >= deadline
        if expired:
            out.late = sorted(pending)
        else:
            out.abandoned = sorted(pending)
        return out

    def _finished(self, pending: dict[int, Pending], deadline: float) -> list[int]:
        """Every replica whose call has finished, once one has (or at ``deadline``)."""
        refs = {p.ref: i for i, p in pending.items() if p.ref is not None}
        remaining = max(0.0, deadline - self.clock())
        if len(refs) == len(pending):
            ready, _ = miniray.wait(list(refs), num_returns=1, timeout=remaining)
            if ready:  # with every other one finished by now
                ready, _ = miniray.wait(list(refs), num_returns=len(refs), timeout=0)
            return [refs[r] for r in ready]
        # Not actors (a test's plain objects): wait on the first, in order.
        next(iter(pending.values())).wait(deadline, clock=self.clock)
        return [i for i, p in pending.items() if p.done()]

    def load(
        self,
        weights: Any,
        version: int,
        *,
        fail_fast: bool = False,
        timeout: float | None = None,
    ) -> FanOut:
        """``load_weights(weights, version)`` on every live replica under one deadline,
        ``timeout`` (default ``load_timeout``) from now; ``weights`` should be one object ref, which every replica then maps. A replica
        that answers another version fails. Records ``loaded_version``, and ``missed_syncs`` of
        each replica that missed it; the user decides what a miss means (``failed``)."""
        self._weights = (weights, version)
        out = self.fan_out(
            "load_weights",
            weights,
            version,
            deadline=self.clock() + (self.load_timeout if timeout is None else timeout),
            fail_fast=fail_fast,
        )
        for index, loaded in list(out.values.items()):
            if loaded != version:
                out.failures[index] = f"loaded version {loaded!r}, expected {version}"
                del out.values[index]
        with self._lock:
            for index in out.values:
                self.stats[index]["loaded_version"] = version
            for index in out.missed:
                self.stats[index]["missed_syncs"] += 1
        return out

    def loaded(self, index: int, version: int) -> None:
        """The user loaded ``version`` into an in-process replica itself."""
        with self._lock:
            self.stats[index]["loaded_version"] = version

    # -- pause -------------------------------------------------------------------------------
    def begin_call(self, index: int) -> None:
        """A lane starts a call on replica ``index`` (the caller holds ``cond``)."""
        self._in_call[index] += 1

    def end_call(self, index: int) -> None:
        with self.cond:
            self._in_call[index] -= 1
            self.cond.notify_all()

    def in_call(self) -> list[int]:
        """The replicas with a call in flight (the caller holds ``cond``)."""
        return [i for i in self.indices if self._in_call[i]]

    def should_stop(self) -> bool:
        """Asked by a lane before every token: paused, and the pause's grace has passed."""
        return self.paused and self.clock() >= self._interrupt_at

    def pause(self, timeout: float, grace_s: float = 0.0) -> None:
        """Stop every replica's call in flight at its next token once ``grace_s`` has passed
        (each lane turns ``should_stop()`` into its replica's abort) and return when none is in
        flight; TimeoutError naming those still generating ``timeout`` s from now."""
        deadline = self.clock() + timeout
        with self.cond:
            if not self.paused:
                self._interrupt_at = self.clock() + grace_s
            self.paused = True
            self.cond.notify_all()  # a waiting lane now counts its wait as paused
            while self.in_call():
                remaining = deadline - self.clock()
                if remaining <= 0:
                    busy = ", ".join(self.names[i] for i in self.in_call())
                    raise TimeoutError(
                        f"pause_rollout(): the generation loop did not stop within {timeout}s "
                        f"({busy} still generating)"
                    )
                self.cond.wait(remaining)

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    # -- failures ----------------------------------------------------------------------------
    def failed(self, index: int, cause: str) -> None:
        """Replica ``index`` died, hung or missed a load: it is killed and started again with
        the last weights loaded while ``max_restarts`` allows (its start and its load each
        bounded), else left gone; RuntimeError when no replica is left."""
        with self._lock:
            self.failures += 1
            self.stats[index]["failures"] += 1
        self.kill(index)
        while self._restarts_left[index] > 0 and self._start_one is not None:
            self._restarts_left[index] -= 1
            try:
                self._restart(index)
                return
            except RuntimeError as again:
                logger.warning("restarting %s failed: %s", self.names[index], again)
                self.kill(index)
                cause = str(again)
        with self._lock:
            self._handles[index] = None
            self.stats[index]["alive"] = False
        if not self.live():
            raise RuntimeError(
                f"every rollout replica failed and none has restarts left "
                f"(rollout.max_restarts={self.max_restarts}); the last: {self.names[index]}: "
                f"{cause}. Look for the cause in the replicas' output (an OOM kill, a crash, a "
                "call slower than async_training.generation_timeout), then raise "
                "rollout.max_restarts or that timeout, and resume from the last checkpoint"
            )

    def _restart(self, index: int) -> None:
        assert self._start_one is not None
        handle = self._start_one(index)
        self._handles[index] = handle
        node = self._answer(index, self._ready, (), self.start_timeout)
        loaded = None
        if self._weights is not None:
            weights, version = self._weights
            loaded = self._answer(index, "load_weights", (weights, version), self.load_timeout)
        with self._lock:
            self.stats[index].update(node=node, loaded_version=loaded)
            self.restarts += 1

    def _answer(self, index: int, method: str, args: tuple, timeout: float) -> Any:
        deadline = self.clock() + timeout
        out = self.fan_out(method, *args, deadline=deadline, replicas=[index])
        if index not in out.values:
            raise RuntimeError(f"{self.names[index]}: {method}() after a restart: {out.why(index)}")
        return out.values[index]

    def kill(self, index: int) -> None:
        handle = self._handles[index]
        if handle is None or self.in_process:
            return
        try:
            miniray.kill(handle)
        except Exception as exc:  # already gone
            logger.debug("%s already gone: %s", self.names[index], exc)

    def shutdown(self) -> None:
        """Kill every replica (idempotent): none outlives its run."""
        for index in self.indices:
            self.kill(index)

    # -- statistics --------------------------------------------------------------------------
    def record(self, index: int, *, groups: int = 0, tokens: int = 0, seconds: float = 0.0) -> None:
        """Count work replica ``index`` did (lanes count at once)."""
        with self._lock:
            stats = self.stats[index]
            stats["groups"] += groups
            stats["tokens"] += tokens
            stats["generate_seconds"] += seconds

    def statistics(self, elapsed: float) -> list[dict[str, Any]]:
        """Per replica, with tokens/s while generating and the idle ratio over ``elapsed`` s."""
        with self._lock:
            replicas = [dict(s) for s in self.stats]
        for replica in replicas:
            busy = replica["generate_seconds"]
            replica["tokens_per_s"] = replica["tokens"] / busy if busy else 0.0
            replica["idle_ratio"] = max(0.0, 1.0 - busy / max(1e-9, elapsed))
        return replicas
