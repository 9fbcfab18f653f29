"""The one-line summary of an RL run, built from what the loop recorded: ``build_summary``.

A pure function of the run's curves and statistics (no actors, no clock), so every field's
arithmetic is tested on its own (``tests/rl/test_rl_summary.py``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["build_summary", "sync_phase_ms", "trainer_placement"]


def trainer_placement(trainer: Any) -> dict[str, Any]:
    """``trainer_world_size`` and ``trainer_device`` of a trainer (a group of rank actors
    offers ``world_size`` and ``device``; one trainer in the driver is 1 on the CPU)."""
    placement = {
        "trainer_world_size": int(getattr(trainer, "world_size", 1)),
        "trainer_device": str(getattr(trainer, "device", "cpu")),
    }
    note = getattr(trainer, "placement_note", None)
    if note:  # trainer.device=auto without CUDA: n_gpus_per_node counted CPU ranks
        placement["trainer_device_note"] = str(note)
    return placement


def sync_phase_ms(sync_stats: Mapping[str, Any]) -> dict[str, float]:
    """The synchronizer's ``<phase>_s_p50``/``_p95`` latencies as ``<phase>_p50``/``_p95`` in
    milliseconds; phases never measured (None) are left out."""
    return {
        key[: -len("_s_p50")] + ("_p50" if key.endswith("p50") else "_p95"): round(value * 1e3, 2)
        for key, value in sync_stats.items()
        if (key.endswith("_s_p50") or key.endswith("_s_p95")) and value is not None
    }


def build_summary(
    *,
    mode: str,
    history: Sequence[Mapping[str, Any]],
    evals: Sequence[tuple[int, float, float]],
    ages: Sequence[int],
    wall_s: float,
    wait_s: float,
    blocking_ms: Sequence[float],
    sync_stats: Mapping[str, Any],
    rollouter_stats: Mapping[str, Any],
    placement: Mapping[str, Any],
    driver_peak_rss_gib: float | None = None,
) -> dict[str, Any]:
    """The run's summary.

    ``history``: the per-step metrics (each with ``samples``); ``evals``: (step, wall_s,
    held-out reward), the first before training with ``val_before_train``; ``ages``: every trained group's age;
    ``wall_s``: the run's time from the first evaluation on; ``wait_s``: the loop's time
    waiting for batches (a step sent ahead waits for its batch on the ranks too, from the
    end of the step before, a few ms before the loop starts waiting); ``blocking_ms``: each
    publish's hold on the trainer;
    ``sync_stats``/``rollouter_stats``: the synchronizer's and rollouter's statistics;
    ``placement``: ``trainer_placement(trainer)``; ``driver_peak_rss_gib``: the driver's
    peak memory (``tracking.peak_rss_gib``), beside the trainer's (its steps'
    ``trainer_peak_rss_gib``) and the rollouter's (its statistics' ``peak_rss_gib``).
    """
    if not wall_s > 0:
        raise ValueError(f"build_summary(): wall_s={wall_s!r} is invalid: must be > 0")
    samples = sum(m["samples"] for m in history)
    phases = sync_phase_ms(sync_stats)
    blocking_p50 = round(statistics.median(blocking_ms), 2) if blocking_ms else 0.0
    return {
        # NaN without evaluations (no data.val_files, or none asked for): not a reward of 0.
        "initial_reward": evals[0][2] if evals else math.nan,
        "final_reward": evals[-1][2] if evals else math.nan,
        "wall_s": round(wall_s, 2),
        "samples_per_s": round(samples / wall_s, 2),
        "steps": len(history),
        "mean_age": round(statistics.mean(ages), 3) if ages else 0.0,
        "max_age": max(ages) if ages else 0,
        "rejected_stale": int(rollouter_stats.get("groups_rejected_stale", 0)),
        # The sync's own latency; in async mode the trainer waits only for a snapshot of
        # its weights (``sync_blocking_ms_p50``), the rest overlaps its next step. Sync mode
        # loads inline: the synchronizer measures nothing, the blocking time is the sync.
        "sync_ms_p50": phases.get("total_p50") or blocking_p50,
        "sync_blocking_ms_p50": blocking_p50,
        "mode": mode,
        "sync_phase_ms": phases,
        "trainer_idle_ratio": round(wait_s / wall_s, 3),
        "rollouter_idle_ratio": round(rollouter_stats.get("idle_ratio", 0.0), 3),
        "prompts_skipped_too_long": int(rollouter_stats.get("prompts_skipped_too_long", 0)),
        "rollout_replicas": int(rollouter_stats.get("rollout_replicas", 1)),
        "replica_failures": int(rollouter_stats.get("replica_failures", 0)),
        "trainer_world_size": int(placement["trainer_world_size"]),
        "trainer_device": str(placement["trainer_device"]),
        **(
            {"trainer_device_note": str(placement["trainer_device_note"])}
            if placement.get("trainer_device_note")
            else {}
        ),
        # Generated tokens trained on: the throughput's numerator at any scale.
        "response_tokens": round(
            sum(m["samples"] * m.get("response_length_mean", 0.0) for m in history), 1
        ),
        "peak_rss_gib": {
            "trainer": max(
                (m["trainer_peak_rss_gib"] for m in history if "trainer_peak_rss_gib" in m),
                default=None,
            ),
            "rollouter": rollouter_stats.get("peak_rss_gib"),
            "driver": driver_peak_rss_gib,
        },
    }
