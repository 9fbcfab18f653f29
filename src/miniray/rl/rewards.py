"""Rewards: a user's ``compute_score`` file (verl's ``custom_reward_function``), run off the
generation thread with a per-call deadline.

This module owns three things:

* ``load_reward_function(path, name)``: import a Python file by path and return the function
  named ``name``, checked to accept verl's keywords ``data_source, solution_str, ground_truth,
  extra_info``. Every way that can fail is an error naming the file and the function.
* ``Reward``: what one call returns, normalised. verl's functions return a number or a dict with
  a ``score`` and other fields (``acc``, ``pred``, ...); the score trains, numeric fields are
  logged as ``reward_extra/<field>``, other fields ride along on the sample's metadata.
* ``RewardScorer``: scores the responses of one group on a small thread pool, so a slow or hung
  function meets a deadline instead of stalling generation silently. A function that raises,
  returns no number, a non-finite one, or does not return in ``timeout_s`` is a
  ``RewardFunctionError`` naming the function and the prompt: never a silent 0. A fast
  function (its calls have averaged under ``BATCH_CALLS_BELOW_S``) scores a whole group in one
  pool task, each call still under its own deadline: a task per response cost the demo's
  rollouter ~0.28 ms a group (thread hand-offs) for calls of ~0.4 us.

Who waits for whom::

    rollouter generation thread --submit(group)--> pool thread(s): compute_score(...)
              |  waits <= timeout_s for every sample of the group
              v
    Reward per sample, or RewardFunctionError (the rollouter closes its queue with it and the
    loop raises ProducerCrashedError naming the function and the prompt)

A hung call cannot be stopped from Python: its thread is abandoned (a daemon thread, so it
does not keep the process alive) and the scorer refuses further work, since the function
evidently cannot be trusted to return.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import inspect
import math
import numbers
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from miniray.rl.prompts import row_extra_info, short_repr

__all__ = [
    "BUILT_IN_DATA_SOURCES",
    "VERL_SCORE_KEYWORDS",
    "Reward",
    "RewardFunctionError",
    "RewardRequest",
    "RewardScorer",
    "build_scorer",
    "load_reward_function",
    "pair_reward",
    "requests_for",
    "reward_of",
]

VERL_SCORE_KEYWORDS = ("data_source", "solution_str", "ground_truth", "extra_info")
# Rows the built-in exact-match reward knows how to score ("" or null: no data_source given).
BUILT_IN_DATA_SOURCES = ("", "arithmetic")


class RewardFunctionError(RuntimeError):
    """The reward function failed for a prompt; the message names the function and the prompt."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


@dataclass(frozen=True, kw_only=True)
class RewardRequest:
    """One response to score, with the row fields verl's ``compute_score`` receives."""

    solution_str: str
    ground_truth: str
    data_source: str = ""
    extra_info: Mapping[str, Any] = field(default_factory=dict)
    prompt: str = ""  # for error messages only


@dataclass(frozen=True)
class Reward:
    """A normalised reward: ``score`` trains; ``metrics`` (numeric fields) are logged;
    ``fields`` (the rest) are kept on the sample."""

    score: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    fields: Mapping[str, Any] = field(default_factory=dict)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real)  # int, float, bool and numpy's scalars


def reward_of(value: Any, *, where: str) -> Reward:
    """``value`` as a ``Reward``: a finite number, or a dict with a finite number under
    ``score``. ``where`` names the function and the prompt in errors."""
    if isinstance(value, Mapping):
        if "score" not in value:
            raise RewardFunctionError(
                f"{where} returned a dict without 'score' (keys {sorted(map(str, value))}); "
                "return a number or a dict with a numeric 'score'"
            )
        score = value["score"]
        extras = {str(k): v for k, v in value.items() if k != "score"}
    else:
        score, extras = value, {}
    if not _is_number(score) or not math.isfinite(float(score)):
        raise RewardFunctionError(
            f"{where} returned the score {score!r} ({type(score).__name__}); a reward must be a "
            "finite int, float or bool"
        )
    metrics = {k: float(v) for k, v in extras.items() if _is_number(v) and math.isfinite(v)}
    fields = {k: v for k, v in extras.items() if k not in metrics}
    return Reward(float(score), metrics, fields)


def load_reward_function(path: str | pathlib.Path, name: str = "compute_score") -> Callable:
    """The function ``name`` from the Python file ``path`` (verl's ``custom_reward_function``).

    It must accept ``data_source, solution_str, ground_truth, extra_info`` by keyword (extra
    parameters need defaults); the file is imported once under a private module name."""
    path = pathlib.Path(path)
    label = f"custom_reward_function.path={str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{label} is not a file")
    module_name = f"_miniray_reward_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{label} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ImportError(f"{label} failed to import: {type(e).__name__}: {e}") from e
        sys.modules[module_name] = module
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AttributeError(
            f"{label} has no function custom_reward_function.name={name!r}; it defines {found}"
        )
    _check_signature(fn, f"{label} function {name!r}")
    return fn


def _check_signature(fn: Callable, label: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to check
    try:
        signature.bind(**dict.fromkeys(VERL_SCORE_KEYWORDS))
    except TypeError as e:
        raise TypeError(
            f"{label} must accept the keywords {', '.join(VERL_SCORE_KEYWORDS)} as verl's "
            f"compute_score does; its signature is {name_of(fn)}{signature} ({e})"
        ) from None


def name_of(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def pair_reward(fn: Callable[[str, str], float]) -> Callable[..., float]:
    """Adapt a ``(response, ground_truth) -> float`` function (the built-in tasks' form) to
    verl's keyword form."""

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return fn(solution_str, ground_truth)

    compute_score.__qualname__ = name_of(fn)
    return compute_score


# A group whose calls are expected to take less than this in all (the function's mean call
# time x the group's size) runs as one pool task, one call after another; a slower function
# keeps a task per call, so that max_workers of them run at once.
BATCH_CALLS_BELOW_S = 0.002


class RewardScorer:
    """Scores responses with ``fn(data_source=, solution_str=, ground_truth=, extra_info=)`` on
    ``max_workers`` daemon threads; each call must return within ``timeout_s`` of starting."""

    def __init__(self, fn: Callable, *, timeout_s: float = 60.0, max_workers: int = 4):
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(
                f"custom_reward_function.timeout_s={timeout_s!r} must be a finite number > 0"
            )
        if not (isinstance(max_workers, int) and max_workers >= 1):
            raise ValueError(f"RewardScorer.max_workers={max_workers!r} must be an int >= 1")
        self.fn = fn
        self.name = name_of(fn)
        self.timeout_s = float(timeout_s)
        self._pool = _DaemonPool(max_workers, f"reward:{self.name}")
        self._broken: str | None = None
        self.mean_call_s: float | None = None  # a moving average over the calls so far
        self.batched_groups = 0  # groups scored as one pool task (``BATCH_CALLS_BELOW_S``)

    def score(self, requests: Sequence[RewardRequest]) -> list[Reward]:
        """One ``Reward`` per request, in order, or ``RewardFunctionError``."""
        if self._broken is not None:
            raise RewardFunctionError(self._broken)
        mean = self.mean_call_s
        together = (
            len(requests) > 1 and mean is not None and mean * len(requests) < BATCH_CALLS_BELOW_S
        )
        if together:
            self.batched_groups += 1
        chunks = [list(requests)] if together else [[r] for r in requests]
        tasks = [self._pool.submit(self._call_each, chunk) for chunk in chunks]
        late = self._first_late(tasks)
        if late is not None:
            first = 0 if together else tasks.index(late)  # the chunk's first request
            self._broken = (
                f"{self._where(requests[first + (late.running_index or 0)])} did not return "
                f"within custom_reward_function.timeout_s={self.timeout_s:g} s; its thread is "
                "abandoned and the scorer refuses further work (make the function return, or "
                "raise the timeout)"
            )
            raise RewardFunctionError(self._broken)
        outcomes = [o for task, chunk in zip(tasks, chunks) for o in _outcomes(task, len(chunk))]
        rewards = []
        for request, (ok, value) in zip(requests, outcomes):
            if not ok:
                raise RewardFunctionError(
                    f"{self._where(request)} raised {type(value).__name__}: {value}"
                ) from value
            rewards.append(reward_of(value, where=self._where(request)))
        return rewards

    def _first_late(self, futures: list[_Call]) -> _Call | None:
        """Wait until every call returned (None) or one ran past ``timeout_s`` (that one).
        A call's clock starts when a thread picks it up, not when it was queued."""
        pending = set(futures)
        while pending:
            now = time.monotonic()
            running = [f.started_at for f in pending if f.started_at is not None]
            wake = min(running) + self.timeout_s if running else now + self.timeout_s
            done, _ = concurrent.futures.wait(
                pending, timeout=max(0.0, wake - now), return_when="FIRST_COMPLETED"
            )
            pending -= done
            now = time.monotonic()
            for f in futures:
                if f in pending and f.started_at is not None:
                    if now >= f.started_at + self.timeout_s:
                        return f
        return None

    def _where(self, request: RewardRequest) -> str:
        return f"reward function {self.name} for the prompt {short_repr(request.prompt, 80)}"

    def _call_each(self, future: _Call, requests: list[RewardRequest]) -> list[tuple[bool, Any]]:
        """A chunk's calls one after another (one call, or a fast function's whole group);
        each restarts the task's clock, so the deadline stays per call, and ``running_index``
        says whose it is."""
        out: list[tuple[bool, Any]] = []
        for index, request in enumerate(requests):
            future.running_index = index
            future.started_at = time.monotonic()
            try:
                out.append((True, self._call(request)))
            except Exception as exc:  # named by score(), in request order
                out.append((False, exc))
        return out

    def _call(self, request: RewardRequest) -> Any:
        start = time.monotonic()
        result = self.fn(
            data_source=request.data_source,
            solution_str=request.solution_str,
            ground_truth=request.ground_truth,
            extra_info=dict(request.extra_info),
        )
        took = time.monotonic() - start
        mean = self.mean_call_s
        self.mean_call_s = took if mean is None else 0.8 * mean + 0.2 * took
        return result

    def close(self) -> None:
        self._pool.close()


def _outcomes(task: _Call, size: int) -> list[tuple[bool, Any]]:
    """(returned, its value or exception) of each of the ``size`` calls of ``task`` (done);
    an exception that escaped the task (not an ``Exception``) is every call's."""
    error = task.exception()
    return [(False, error)] * size if error is not None else task.result()


class _Call(concurrent.futures.Future):
    """A future that knows when a pool thread started running it (for a group's calls run as
    one task: when it started the call it runs now, ``running_index``)."""

    started_at: float | None = None
    running_index: int | None = None


class _DaemonPool:
    """A fixed pool of daemon threads: ``concurrent.futures.ThreadPoolExecutor`` joins its
    threads at interpreter exit, so one hung reward call would keep a finished run alive."""

    def __init__(self, workers: int, name: str):
        self._tasks: list[tuple[_Call, Callable, tuple]] = []
        self._cond = threading.Condition()
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable, *args: Any) -> _Call:
        future = _Call()
        with self._cond:
            if self._closed:
                raise RuntimeError("the reward scorer is closed")
            self._tasks.append((future, fn, args))
            self._cond.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._closed:
                    self._cond.wait()
                if not self._tasks:
                    return
                future, fn, args = self._tasks.pop(0)
            if not future.set_running_or_notify_cancel():
                continue
            future.started_at = time.monotonic()
            try:
                future.set_result(fn(future, *args))
            except BaseException as e:  # the caller re-raises it, named
                future.set_exception(e)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for future, _, _ in self._tasks:
                future.cancel()
            self._tasks.clear()
            self._cond.notify_all()


def build_scorer(
    config: Any, reward_fn: Callable[[str, str], float] | None = None, rows: Sequence[Any] = ()
) -> RewardScorer:
    """The scorer a run uses: ``reward_fn`` (a ``(response, ground_truth)`` function passed in
    code), else ``custom_reward_function.path``/``.name``, else the built-in exact match, which
    only rows of the built-in tasks may use: verl scores other data sources with rules we do
    not have, so a row of one is an error saying to name a reward function."""
    custom = config.custom_reward_function
    path, name, timeout_s = custom.path, custom.name, custom.timeout_s
    workers = max(1, min(8, config.actor_rollout_ref.rollout.n))
    if reward_fn is not None:
        if path:
            raise ValueError(
                f"custom_reward_function.path={path!r} and a reward_fn passed in code "
                "both name the reward: keep one"
            )
        return RewardScorer(pair_reward(reward_fn), timeout_s=timeout_s, max_workers=workers)
    if path:
        fn = load_reward_function(path, name)
        return RewardScorer(fn, timeout_s=timeout_s, max_workers=workers)
    from miniray.rl.tasks import exact_match_reward

    for i, row in enumerate(rows):
        source = row.get("data_source") or ""
        if source not in BUILT_IN_DATA_SOURCES:
            raise ValueError(
                f"prompt row {i} has data_source={source!r}, which the built-in exact-match "
                "reward does not score: set custom_reward_function.path to a file with "
                "compute_score(data_source, solution_str, ground_truth, extra_info)"
            )
    return RewardScorer(pair_reward(exact_match_reward), timeout_s=timeout_s, max_workers=workers)


def requests_for(
    row: Mapping[str, Any], responses: Sequence[str], prompt: str
) -> list[RewardRequest]:
    """One request per response to the prompt of ``row`` (``load_prompts`` stored its answer
    as ``ground_truth``)."""
    return [
        RewardRequest(
            solution_str=response,
            ground_truth=str(row["ground_truth"]),
            data_source=row.get("data_source") or "",
            extra_info=row_extra_info(row),
            prompt=prompt,
        )
        for response in responses
    ]
