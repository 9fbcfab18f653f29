"""Call one method on many worker actors and collect what arrives before a deadline.

    server --method.remote()--> worker 0..K-1
       |
       +-- miniray.wait(all, timeout=deadline - now) --> ready | not_ready
              ready + value      -> results[i]
              ready + error      -> excluded[i] = 'died: ...' / 'error: ...'
              not_ready          -> excluded[i] = 'timeout after X s'

A dead or hung worker therefore costs at most the deadline, never a hang. Late results are
abandoned: the round goes on with the workers that answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import miniray
from miniray.exceptions import RayActorError, WorkerCrashedError

log = logging.getLogger(__name__)


def call_all(
    workers: dict[int, Any], method: str, deadline: float, *args: Any
) -> tuple[dict[int, Any], dict[int, miniray.ObjectRef], dict[int, str]]:
    """``(values, refs, excluded)`` keyed by worker id; see the module docstring."""
    calls = {wid: _caller(getattr(handle, method), args) for wid, handle in workers.items()}
    return call_each(calls, deadline, f"{method} round")


def call_each(
    calls: dict[int, Callable[[], miniray.ObjectRef]],
    deadline: float,
    what: str,
    who: str = "worker",
) -> tuple[dict[int, Any], dict[int, miniray.ObjectRef], dict[int, str]]:
    """Start each call (``calls[key]()`` returns its ref) and ``collect`` them."""
    return finish_each(start_each(calls, what, who), deadline, what, who)


Started = tuple[dict[int, miniray.ObjectRef], dict[int, str]]  # refs, and calls refused


def start_each(calls: dict[int, Callable[[], miniray.ObjectRef]], what: str, who: str) -> Started:
    """Start each call; one to an actor already known dead fails as 'died: ...'."""
    refs: dict[int, miniray.ObjectRef] = {}
    refused: dict[int, str] = {}
    for key, start in calls.items():
        try:
            refs[key] = start()
        except RayActorError as exc:  # some backends refuse calls to a known-dead actor at once
            refused[key] = f"died: {_first_line(exc)}"
            log.warning("%s %s left out of %s: %s", who, key, what, refused[key])
    return refs, refused


def finish_each(
    started: Started, deadline: float, what: str, who: str
) -> tuple[dict[int, Any], dict[int, miniray.ObjectRef], dict[int, str]]:
    """``collect`` what ``start_each`` started; the refused calls count as failed."""
    refs, refused = started
    values, ready_refs, failed = collect(refs, deadline, what, who)
    return values, ready_refs, {**refused, **failed}


def _caller(method: Any, args: tuple) -> Callable[[], miniray.ObjectRef]:
    return lambda: method.remote(*args)


def collect(
    refs: dict[int, miniray.ObjectRef], deadline: float, what: str, who: str
) -> tuple[dict[int, Any], dict[int, miniray.ObjectRef], dict[int, str]]:
    """Wait for ``refs`` until ``deadline``: ``(values, ready refs, failed)`` keyed like ``refs``.

    ``failed`` says 'timeout', 'died: ...' or 'error: ...'; each failure is logged as
    "<who> <key> left out of <what>".
    """
    excluded: dict[int, str] = {}
    pending = list(refs.values())
    ready_ids: set[str] = set()
    if pending:
        ready, _ = miniray.wait(
            pending, num_returns=len(pending), timeout=max(0.0, deadline - time.monotonic())
        )
        ready_ids = {r.id for r in ready}
    ready_refs = {wid: ref for wid, ref in refs.items() if ref.id in ready_ids}
    excluded.update({wid: "timeout" for wid in refs if wid not in ready_refs})
    values, ready_refs = _get_each(ready_refs, deadline, excluded)
    for wid, why in excluded.items():
        log.warning("%s %s left out of %s: %s", who, wid, what, why)
    return values, ready_refs, excluded


def _get_each(
    refs: dict[int, miniray.ObjectRef], deadline: float, excluded: dict[int, str]
) -> tuple[dict[int, Any], dict[int, miniray.ObjectRef]]:
    """The values of ready refs, one ``get`` each: a batched get that raises for one failed
    result would leave the others' deliveries unread, and their segments never reused."""
    values: dict[int, Any] = {}
    good: dict[int, miniray.ObjectRef] = {}
    for wid, ref in refs.items():
        try:
            values[wid] = miniray.get(ref, timeout=_remaining(deadline))
            good[wid] = ref
        except (RayActorError, WorkerCrashedError) as exc:
            excluded[wid] = f"died: {_first_line(exc)}"
        except miniray.exceptions.RayTaskError as exc:
            excluded[wid] = f"error: {_first_line(exc)}"
    return values, good


def _remaining(deadline: float) -> float:
    # The results are ready (wait said so): the extra second covers only the transfer.
    return max(0.0, deadline - time.monotonic()) + 1.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
