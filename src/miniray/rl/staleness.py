"""The invariants of asynchronous RL as named pure functions: versions, sample age, admission.

Vocabulary (DESIGN.md, "The RL vocabulary"):

* parameter version ``v``: an integer the trainer increments once per published weight sync;
* a sample's ``v_start`` (version when its generation began) and ``v_end`` (last version that
  contributed tokens; > v_start only with partial rollouts);
* its age at consumption ``age = v_trainer_now - v_start``; with ``staleness_threshold = k`` a
  sample of ``age > k`` is never trained on, and ``k = 0`` is strictly on-policy.

Everything here is a pure function of its arguments, so the queue, the rollouter, the trainer and
the synchronizer share one definition and each rule has its own unit test. (verl's V1 counts
``global_steps - prompt_steps + 1`` and is off by one against everyone else; one definition in
one place prevents that.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "admission_capacity",
    "check_version",
    "freshness_metrics",
    "in_flight_span",
    "is_too_stale",
    "is_valid_version_bump",
    "max_admissible_samples",
    "sample_age",
    "version_after_sync",
]


def check_version(value: Any, name: str) -> int:
    """``value`` if it is a parameter version (an int >= 0), else a TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name}={value!r} is invalid: a parameter version must be an int, "
            f"got {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"{name}={value!r} is invalid: a parameter version must be >= 0")
    return value


def _check_threshold(staleness_threshold: Any) -> int:
    if isinstance(staleness_threshold, bool) or not isinstance(staleness_threshold, int):
        raise TypeError(
            f"staleness_threshold={staleness_threshold!r} is invalid: must be an integer "
            "version lag (verl's fractional budget is not supported)"
        )
    if staleness_threshold < 0:
        raise ValueError(
            f"staleness_threshold={staleness_threshold!r} is invalid: must be >= 0 "
            "(0 is strictly on-policy)"
        )
    return staleness_threshold


def sample_age(v_trainer_now: int, v_start: int) -> int:
    """Age in versions of a sample the trainer would consume now: ``v_trainer_now - v_start``.

    Negative when the sample was generated with weights newer than the consumer's version
    (the rollouter loaded ``v`` before the trainer asked the queue with ``v``); such a sample
    is fresh, never stale. That is the one behaviour for a negative age, everywhere: the
    queue's version is the trainer's as last reported to it, so it lags the rollouter's by a
    message, and raising there would crash a run on a race that does no harm. Distillation's
    scheduler knows both versions exactly; its tests check that its ages are never negative.
    """
    check_version(v_trainer_now, "v_trainer_now")
    check_version(v_start, "v_start")
    return v_trainer_now - v_start


def is_too_stale(v_start: int, v_trainer_now: int, staleness_threshold: int) -> bool:
    """True when a sample must not be trained on: ``age > staleness_threshold``."""
    return sample_age(v_trainer_now, v_start) > _check_threshold(staleness_threshold)


def in_flight_span(v_start: int, v_end: int) -> int:
    """Versions a sample's generation spanned: ``v_end - v_start`` (0 without partial rollout)."""
    check_version(v_start, "v_start")
    check_version(v_end, "v_end")
    if v_end < v_start:
        raise ValueError(f"v_end={v_end} is invalid: must be >= v_start={v_start}")
    return v_end - v_start


def max_admissible_samples(
    current_version: int, staleness_threshold: int, consumer_batch_size: int
) -> int:
    """Samples that may ever be started up to version ``current_version`` (AReaL's bound).

    The trainer consumes ``consumer_batch_size`` samples per version, oldest first, so the
    sample with global index ``i`` is consumed at version ``i // B``. Admitting it while the
    version is ``v`` keeps its age <= k exactly when ``i < (k + v + 1) * B``.
    """
    check_version(current_version, "current_version")
    k = _check_threshold(staleness_threshold)
    if isinstance(consumer_batch_size, bool) or not isinstance(consumer_batch_size, int):
        raise TypeError(f"consumer_batch_size={consumer_batch_size!r} must be an int")
    if consumer_batch_size < 1:
        raise ValueError(f"consumer_batch_size={consumer_batch_size!r} is invalid: must be >= 1")
    return (k + current_version + 1) * consumer_batch_size


def admission_capacity(
    *,
    current_version: int,
    staleness_threshold: int,
    consumer_batch_size: int,
    max_concurrent: int,
    accepted: int,
    running: int,
    offered: int = 0,
) -> int:
    """How many new generations the rollouter may start now (may be <= 0: start none).

    The minimum of the concurrency room (``max_concurrent - running``) and the staleness room
    (``max_admissible_samples - (accepted + offered + running)``). Throttling the producer this
    way is what keeps the queue's stale rejections rare, so long responses are not
    systematically dropped (tinker-cookbook #822). ``accepted`` counts samples ever accepted by the queue in
    this run (including those already consumed); ``running`` counts generations in flight;
    ``offered`` counts finished ones sent to the queue whose answer is not back yet (they may
    still be accepted, so they take staleness room, but no concurrency room).
    ``consumer_batch_size`` is samples consumed per version (batch size x sync interval).
    """
    for name, value in (
        ("max_concurrent", max_concurrent),
        ("accepted", accepted),
        ("running", running),
        ("offered", offered),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 0")
    concurrency_room = max_concurrent - running
    staleness_room = max_admissible_samples(
        current_version, staleness_threshold, consumer_batch_size
    ) - (accepted + offered + running)
    return min(concurrency_room, staleness_room)


def is_valid_version_bump(current_version: int, new_version: int) -> bool:
    """Versions are monotonic: a sync to ``new_version`` is allowed only if it is newer.

    A duplicate or older version means another caller already published it (or a newer one);
    applying it again would move the rollouter backwards or count one version twice.
    """
    check_version(current_version, "current_version")
    check_version(new_version, "new_version")
    return new_version > current_version


def version_after_sync(current_version: int, new_version: int, *, succeeded: bool) -> int:
    """The rollouter's version after a sync attempt: the new one only if the load succeeded.

    A failed sync keeps the old version, because the rollouter still runs the old weights and
    stamping its samples with the new version would hide their true age.
    """
    if not is_valid_version_bump(current_version, new_version):
        return current_version
    return new_version if succeeded else current_version


def freshness_metrics(
    samples: Iterable[Any], v_trainer_now: int, *, now: float | None = None
) -> dict[str, float]:
    """Freshness of a consumed batch (``async_rl.md`` §10.5), from the samples' stamps.

    Each sample needs ``v_start`` (and optionally ``v_end``, ``created_at``); with ``now``
    given, ages in seconds (``now - created_at``) are included.
    """
    ages: list[int] = []
    spans: list[int] = []
    seconds: list[float] = []
    versions: set[int] = set()
    for sample in samples:
        v_start = sample.v_start
        ages.append(sample_age(v_trainer_now, v_start))
        spans.append(in_flight_span(v_start, getattr(sample, "v_end", v_start)))
        versions.add(v_start)
        created = getattr(sample, "created_at", None)
        if now is not None and created is not None:
            seconds.append(now - created)
    if not ages:
        return {"count": 0.0}
    out = {
        "count": float(len(ages)),
        "age_mean": sum(ages) / len(ages),
        "age_max": float(max(ages)),
        "age_p50": _percentile(ages, 50),
        "age_p95": _percentile(ages, 95),
        "stale_fraction": sum(1 for a in ages if a >= 1) / len(ages),
        "in_flight_span_mean": sum(spans) / len(spans),
        "in_flight_span_max": float(max(spans)),
        "partial_ratio": sum(1 for s in spans if s > 0) / len(spans),
        "version_diversity": float(len(versions)),
    }
    if seconds:
        out["age_seconds_mean"] = sum(seconds) / len(seconds)
        out["age_seconds_max"] = max(seconds)
    return out


def _percentile(values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: ages are whole versions)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])
