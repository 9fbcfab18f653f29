"""The demo's artifacts: summary line, report with plots, metrics, TensorBoard events."""

from __future__ import annotations

import json

import pytest

import miniray
from miniray.rl import demo

SUMMARY_KEYS = {
    "initial_reward",
    "final_reward",
    "wall_s",
    "samples_per_s",
    "steps",
    "mean_age",
    "max_age",
    "rejected_stale",
    "sync_ms_p50",
    "mode",
}


@pytest.mark.slow
def test_demo_writes_report_summary_and_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    summary = demo.main(["--steps", "4", "--pretrain-steps", "5", "--no-progress", "--name", "t"])
    assert not miniray.is_initialized()
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == summary
    assert set(summary) >= SUMMARY_KEYS
    assert summary["steps"] == 4 and summary["mode"] == "async"
    out = tmp_path / "runs" / "t"
    report = (out / "report.md").read_text()
    for image in ("reward.png", "age_histogram.png", "queue_utilization.png"):
        assert (out / image).stat().st_size > 1000
        assert f"]({image})" in report
    assert json.loads((out / "summary.json").read_text()) == summary
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_tools_demo_trains_multi_turn_and_reports_tool_use(tmp_path, monkeypatch, capsys):
    """A short ``--task tools`` run: conversations with the calculator go through the whole
    loop, and the report shows reward, tool calls and tool errors over time."""
    monkeypatch.chdir(tmp_path)
    argv = ["--task", "tools", "--steps", "4", "--pretrain-steps", "30", "--no-progress"]
    summary = demo.main([*argv, "--name", "t"])
    assert not miniray.is_initialized()
    assert summary["steps"] == 4 and 0.0 <= summary["final_reward"] <= 1.0
    out = tmp_path / "runs" / "t"
    report = (out / "report.md").read_text()
    assert "| step | wall s | reward | tool calls | tool errors | answered | held-out |" in report
    assert (out / "tools.png").stat().st_size > 1000 and "](tools.png)" in report
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for metrics in lines:
        assert metrics["multi_turn/tool_calls"] >= 0 and "multi_turn/tool_errors" in metrics
        assert metrics["multi_turn/assistant_turns"] >= 1
    assert (out / "tools.yaml").exists()
