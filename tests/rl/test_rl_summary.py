"""summary.build_summary on its own: every field from inputs chosen so each has one right
value, the trainer's placement, the sync-mode fallbacks, bad input, and purity."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest

from miniray.rl.summary import build_summary, sync_phase_ms, trainer_placement

KEYS = {
    "initial_reward",
    "final_reward",
    "wall_s",
    "samples_per_s",
    "steps",
    "mean_age",
    "max_age",
    "rejected_stale",
    "sync_ms_p50",
    "sync_blocking_ms_p50",
    "mode",
    "sync_phase_ms",
    "trainer_idle_ratio",
    "rollouter_idle_ratio",
    "prompts_skipped_too_long",
    "rollout_replicas",
    "replica_failures",
    "trainer_world_size",
    "trainer_device",
    "response_tokens",
    "peak_rss_gib",
}


def inputs(**overrides):
    base = {
        "mode": "async",
        "history": [
            {"samples": 8, "loss": 0.5, "response_length_mean": 2.0, "trainer_peak_rss_gib": 1.5},
            {"samples": 8, "response_length_mean": 1.0, "trainer_peak_rss_gib": 2.5},
            {"samples": 4},
        ],
        "evals": [(0, 0.0, 0.25), (2, 1.5, 0.5), (3, 4.0, 0.75)],
        "ages": [0, 1, 1, 2],
        "wall_s": 4.0,
        "wait_s": 1.0,
        "blocking_ms": [3.0, 1.0, 2.0],
        "sync_stats": {
            "total_s_p50": 0.0125,
            "total_s_p95": 0.02,
            "load_s_p50": 0.005,
            "load_s_p95": None,  # never measured: left out
            "sync_count": 3,  # not a latency: left out
        },
        "rollouter_stats": {
            "groups_rejected_stale": 2,
            "idle_ratio": 0.12345,
            "prompts_skipped_too_long": 5,
            "rollout_replicas": 3,
            "replica_failures": 2,
            "peak_rss_gib": 0.75,
        },
        "placement": {"trainer_world_size": 2, "trainer_device": "cuda:0"},
        "driver_peak_rss_gib": 0.5,
    }
    base.update(overrides)
    return base


def test_every_field_comes_from_its_input():
    summary = build_summary(**inputs())
    assert set(summary) == KEYS
    assert summary == {
        "initial_reward": 0.25,  # the evaluation before training
        "final_reward": 0.75,  # the last one
        "wall_s": 4.0,
        "samples_per_s": 5.0,  # 20 samples in 4 s
        "steps": 3,
        "mean_age": 1.0,
        "max_age": 2,
        "rejected_stale": 2,
        "sync_ms_p50": 12.5,  # the synchronizer's total, in ms
        "sync_blocking_ms_p50": 2.0,  # the median publish's hold on the trainer
        "mode": "async",
        "sync_phase_ms": {"total_p50": 12.5, "total_p95": 20.0, "load_p50": 5.0},
        "trainer_idle_ratio": 0.25,  # 1 s waiting of 4
        "rollouter_idle_ratio": 0.123,
        "prompts_skipped_too_long": 5,
        "rollout_replicas": 3,
        "replica_failures": 2,
        "trainer_world_size": 2,
        "trainer_device": "cuda:0",
        "response_tokens": 24.0,  # 8 x 2 + 8 x 1 + 4 x (no length reported)
        # Each role's own process peak: the trainer's highest step, the rollouter's, the driver's.
        "peak_rss_gib": {"trainer": 2.5, "rollouter": 0.75, "driver": 0.5},
    }


def test_the_trainers_placement_is_in_the_summary():
    group = SimpleNamespace(world_size=4, device="cuda")  # a group of rank actors
    assert trainer_placement(group) == {"trainer_world_size": 4, "trainer_device": "cuda"}
    one = object()  # one trainer in the driver
    assert trainer_placement(one) == {"trainer_world_size": 1, "trainer_device": "cpu"}
    summary = build_summary(**inputs(placement=trainer_placement(group)))
    assert (summary["trainer_world_size"], summary["trainer_device"]) == (4, "cuda")
    with pytest.raises(KeyError, match="trainer_device"):
        build_summary(**inputs(placement={"trainer_world_size": 1}))
    # trainer.device=auto without CUDA: the note that n_gpus_per_node counted CPU ranks.
    noted = SimpleNamespace(world_size=2, device="cpu", placement_note="no CUDA device: ...")
    placement = trainer_placement(noted)
    assert placement["trainer_device_note"] == "no CUDA device: ..."
    assert build_summary(**inputs(placement=placement))["trainer_device_note"] == (
        "no CUDA device: ..."
    )


def test_sync_mode_reports_the_blocking_load_as_the_sync():
    # Sync mode loads inline: the synchronizer measured nothing, the publish's time is the
    # sync; no group ages or rollouter statistics to read either.
    summary = build_summary(
        **inputs(mode="sync", sync_stats={"total_s_p50": None}, rollouter_stats={}, ages=[])
    )
    assert summary["sync_ms_p50"] == summary["sync_blocking_ms_p50"] == 2.0
    assert summary["sync_phase_ms"] == {}
    assert (summary["mean_age"], summary["max_age"]) == (0.0, 0)
    assert summary["rejected_stale"] == summary["prompts_skipped_too_long"] == 0
    assert summary["rollouter_idle_ratio"] == 0.0
    assert (summary["rollout_replicas"], summary["replica_failures"]) == (1, 0)
    nothing = build_summary(**inputs(blocking_ms=[], sync_stats={}))
    assert nothing["sync_ms_p50"] == nothing["sync_blocking_ms_p50"] == 0.0


def test_sync_phase_ms_converts_the_percentiles_to_milliseconds():
    stats = {"pause_s_p50": 0.001234, "pause_s_p95": 0.5, "resume_s_p50": None, "bytes": 10}
    assert sync_phase_ms(stats) == {"pause_p50": 1.23, "pause_p95": 500.0}


def test_bad_input_is_an_error_naming_the_field():
    # No evaluation (no data.val_files, or val_before_train=false and test_freq=-1): NaN,
    # not a reward of 0.
    unevaluated = build_summary(**inputs(evals=[]))
    assert math.isnan(unevaluated["initial_reward"]) and math.isnan(unevaluated["final_reward"])
    for wall_s in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=r"wall_s=.* is invalid: must be > 0"):
            build_summary(**inputs(wall_s=wall_s))


def test_the_summary_is_a_pure_function_of_its_inputs():
    given = inputs()
    kept = copy.deepcopy(given)
    first = build_summary(**given)
    second = build_summary(**given)
    assert first == second and first is not second
    assert given == kept  # nothing it was given was changed
    first["sync_phase_ms"]["total_p50"] = -1.0  # the result shares nothing with a later one
    assert build_summary(**given)["sync_phase_ms"]["total_p50"] == 12.5
