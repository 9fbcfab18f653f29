"""The metrics sinks that write outside the run (wandb offline, MLflow) round-trip real values.

Each sink runs in a child Python: wandb starts a service process of its own that lives until
the interpreter exits, and the suite checks that no test leaves a child behind. The values are
read back with the tools' own formats (wandb's record file and protobuf, MLflow's client), so a
sink that opens but logs nothing, or logs under the wrong step or name, fails here.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from miniray.rl.tracking import build_loggers, check_logger_names

# Two steps; the NaN is an evaluation that did not run (the loop logs NaN, not 0).
LOG_TWO_STEPS = """
from miniray.rl.tracking import build_loggers
sinks = build_loggers([{name!r}], run_dir={run_dir!r}, project="proj", experiment="exp",
                      config={{"lr": 0.001}})
for sink in sinks:
    sink.log({{"step": 1, "loss": 0.5, "eval/reward": float("nan"), "note": "text"}}, 1)
    sink.log({{"step": 2, "loss": 0.25}}, 2)
    sink.close()
"""


def log_two_steps(name: str, run_dir: pathlib.Path, env: dict[str, str] | None = None) -> None:
    code = textwrap.dedent(LOG_TWO_STEPS.format(name=name, run_dir=str(run_dir)))
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def wandb_records(path: pathlib.Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of
    records, each with a 7-byte header (crc32, little-endian length, type: 1 whole, 2 first,
    3 middle, 4 last piece); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pieces = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block if pos % block else 0
            continue
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def test_wandb_logs_offline_what_the_run_logged(tmp_path):
    pytest.importorskip("wandb")
    log_two_steps("wandb", tmp_path)
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # offline: nothing left the machine
    history, runs = [], []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "run":
            runs.append(record.run)
    assert [(run.project, run.display_name) for run in runs[:1]] == [("proj", "exp")]
    assert [(h["_step"], h["loss"]) for h in history] == [(1, 0.5), (2, 0.25)]
    assert "note" not in history[0]  # only numbers go to wandb
    assert math.isnan(history[0]["eval/reward"])  # NaN is kept, not dropped or turned into 0


def mlflow_metrics(tracking_uri: str) -> tuple[str, str, dict[str, list[tuple[int, float]]]]:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    keys = ("loss", "eval/reward")
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in keys
    }
    return run.info.run_name, run.info.status, history


def test_mlflow_logs_each_step_to_a_sqlite_store_in_the_run_directory(tmp_path):
    pytest.importorskip("mlflow")
    log_two_steps("mlflow", tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    name, status, history = mlflow_metrics(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (name, status) == ("exp", "FINISHED")
    assert history["loss"] == [(1, 0.5), (2, 0.25)]
    ((step, value),) = history["eval/reward"]
    assert step == 1 and math.isnan(value)  # NaN is kept, not dropped or turned into 0


def test_mlflow_honours_the_users_tracking_uri(tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "elsewhere.db"
    log_two_steps("mlflow", tmp_path / "run", env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert not (tmp_path / "run" / "mlflow.db").exists()
    assert mlflow_metrics(f"sqlite:///{store}")[2]["loss"] == [(1, 0.5), (2, 0.25)]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_an_uninstalled_logger_says_what_to_install_before_any_sink_opens(
    name, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a)
    )
    with pytest.raises(ImportError, match=rf"pip install 'miniray\[{name}\]'"):
        check_logger_names(["console", name])
    with pytest.raises(ImportError, match=rf"trainer\.logger=.*{name}"):
        build_loggers(["jsonl", name], run_dir=tmp_path, project="p", experiment="e")
    assert not (tmp_path / "metrics.jsonl").exists()  # all or none: jsonl was not opened
