"""examples/distill_demo.py --quick, run the way a user runs it: artifacts and summary line."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

DEMO = pathlib.Path(__file__).resolve().parents[3] / "examples" / "distill_demo.py"


@pytest.mark.slow
def test_demo_quick_writes_report_plot_metrics_and_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--name", "t"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    out = tmp_path / "runs" / "t"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["max_staleness"] == 1
    assert summary["on_policy_batches"] == 6
    # the student moves towards the teacher even in six steps of a smoke test
    assert summary["final_reverse_kl"] < summary["initial_reverse_kl"]
    assert 0.0 <= summary["teacher_accuracy"] <= 1.0
    assert (out / "distill.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "![distill.png](distill.png)" in report and "reverse KL" in report
    assert (out / "metrics.jsonl").read_text().count("\n") == 6
    # seed 003's log lines: one_step_off syncs before generating batches 2..5 (batch 1 is
    # generated before the first step, with the weights the workers started with)
    log = (out / "train.log").read_text()
    assert log.count("Starting rollout weight synchronization...") == 4
    assert log.count("Rollout weight sync completed in ") == 4
