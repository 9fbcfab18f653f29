"""``run_e2e_test.sh`` (seed 001) runs a short training on the CPU and checks it worked."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_run_e2e_test_script_passes_on_the_cpu(tmp_path):
    env = {
        **os.environ,
        "STEPS": "3",
        "NUM_GPUS": "0",
        "PYTHON": sys.executable,
        "WORK_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "run_e2e_test.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "E2E PASSED" in proc.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
