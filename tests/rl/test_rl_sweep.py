"""run_benchmark.sh in its smallest size: every sweep runs and the report, summary and logs
are written with numbers that obey the run's own rules (ages within k, sync never stale)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SWEEPS = ["staleness_threshold", "max_queue_size", "generation_interval", "mode", "cpu_split"]


@pytest.mark.slow
def test_run_benchmark_writes_report_summary_and_logs(tmp_path):
    out = tmp_path / "benchmark_results_test"
    env = {**os.environ, "SIZE": "tiny", "OUT_DIR": str(out)}
    done = subprocess.run(
        ["bash", str(ROOT / "run_benchmark.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "performance_report.md").read_text()
    for sweep in [*SWEEPS, "pause_resume"]:
        assert f"]({sweep}.png)" in report, sweep
        assert (out / f"{sweep}.png").stat().st_size > 1000
    assert "## pause/resume while generating" in report

    summary = (out / "summary.txt").read_text().splitlines()
    rows = {}
    for line in summary:
        sweep, rest = line.split(maxsplit=1)
        rows.setdefault(sweep, []).append(rest)
    assert set(rows) == {*SWEEPS, "pause_resume"}
    assert len(rows["staleness_threshold"]) == 3 and len(rows["pause_resume"]) == 2
    for k, line in zip((0, 1, 3), rows["staleness_threshold"]):
        assert int(re.search(r"max_age=(\d+)", line).group(1)) <= k
    assert "max_age=0" in rows["mode"][0]  # sync: always the current version

    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert "rl_sweep.out" in logs and "pause_resume_fake.log" in logs
    fake_logs = [name for name in logs if name.startswith("fake_")]
    assert len(fake_logs) == 7  # 3 + 2 + 3 + 2 points, 3 of them the shared baseline
    last = json.loads((out / "logs" / fake_logs[0]).read_text().splitlines()[-1])
    assert last["summary"]["steps"] == 3
    pauses = json.loads((out / "logs" / "pause_resume_fake.log").read_text())
    assert len(pauses["pause_ms"]) == 3 and all(ms < 5000 for ms in pauses["pause_ms"])


def test_run_benchmark_refuses_an_unknown_size(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "run_benchmark.sh")],
        cwd=ROOT,
        env={**os.environ, "SIZE": "huge", "OUT_DIR": str(tmp_path / "x")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "SIZE=huge is invalid" in done.stderr
