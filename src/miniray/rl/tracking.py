"""Where an RL run's per-step metrics go: ``trainer.logger``, a list of sink names.

    console      one line per step on stdout, prefixed ``[project_name/experiment_name]``
    jsonl        ``<run dir>/metrics.jsonl``, one JSON object per step
    tensorboard  ``<run dir>/tensorboard/`` event files (tensorboard is in the ``rl`` extra)
    wandb        an offline Weights & Biases run in ``<run dir>/wandb`` (project_name, name
                 experiment_name); needs ``pip install 'miniray[wandb]'``
    mlflow       an MLflow run (experiment project_name, run experiment_name) in
                 ``$MLFLOW_TRACKING_URI`` if set, else ``<run dir>/mlflow.db`` (SQLite);
                 needs ``pip install 'miniray[mlflow]'``

``build_loggers`` checks every name before any sink is opened: an unknown name or a sink
whose package is missing is an error naming it (and what to install), not a run that quietly
logs less than asked. Only numeric metrics go to tensorboard, wandb and mlflow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["LOGGER_NAMES", "MetricsLogger", "build_loggers", "check_logger_names"]

LOGGER_NAMES = ("console", "jsonl", "tensorboard", "wandb", "mlflow")

# sink -> (module it imports, what to install when it is missing)
_NEEDS = {
    "tensorboard": ("tensorboard", "pip install 'miniray[rl]' (or pip install tensorboard)"),
    "wandb": ("wandb", "pip install 'miniray[wandb]' (or pip install wandb)"),
    "mlflow": ("mlflow", "pip install 'miniray[mlflow]' (or pip install mlflow)"),
}


class MetricsLogger(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def check_logger_names(names: Sequence[str], *, key: str = "trainer.logger") -> None:
    """Raise naming ``key`` for an unknown sink name or one whose package is not installed."""
    for name in names:
        if name not in LOGGER_NAMES:
            raise ValueError(
                f"{key}={list(names)} is invalid: {name!r} is not a logger; the loggers are "
                f"{list(LOGGER_NAMES)}"
            )
        module, install = _NEEDS.get(name, (None, ""))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ImportError(
                f"{key}={list(names)}: the {name!r} logger needs the {module} package, which "
                f"is not installed: {install}; or leave {name!r} out of {key}"
            )


def build_loggers(
    names: Sequence[str],
    *,
    run_dir: str | pathlib.Path,
    project: str,
    experiment: str,
    config: Mapping[str, Any] | None = None,
) -> list[MetricsLogger]:
    """The sinks ``names`` asks for, writing under ``run_dir`` (created); all or none."""
    check_logger_names(names)
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[], MetricsLogger]] = {
        "console": lambda: _Console(f"{project}/{experiment}"),
        "jsonl": lambda: _Jsonl(run_dir / "metrics.jsonl"),
        "tensorboard": lambda: _TensorBoard(run_dir / "tensorboard"),
        "wandb": lambda: _Wandb(run_dir, project, experiment, config),
        "mlflow": lambda: _MLflow(run_dir, project, experiment),
    }
    opened: list[MetricsLogger] = []
    try:
        for name in dict.fromkeys(names):  # a name given twice logs once
            opened.append(makers[name]())
    except BaseException:
        for sink in opened:
            sink.close()
        raise
    return opened


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
    }


class _Console:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        shown = " ".join(
            f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}" for k, v in _numeric(metrics).items()
        )
        print(f"[{self.prefix}] step {step}: {shown}", file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


class _Jsonl:
    def __init__(self, path: pathlib.Path) -> None:
        self.file = path.open("w")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.file.write(json.dumps(dict(metrics)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _TensorBoard:
    def __init__(self, path: pathlib.Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in _numeric(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(
        self,
        run_dir: pathlib.Path,
        project: str,
        experiment: str,
        config: Mapping[str, Any] | None,
    ) -> None:
        import wandb

        # Offline: nothing leaves the machine; `wandb sync <run dir>/wandb` uploads later.
        self.run = wandb.init(
            project=project,
            name=experiment,
            dir=str(run_dir),
            mode="offline",
            config=dict(config or {}),
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log(_numeric(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """An MLflow run in ``$MLFLOW_TRACKING_URI`` when the user set one (a server, a database),
    else in a SQLite store in the run directory. Not MLflow's ``./mlruns`` file store: MLflow 3
    refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set (maintenance mode; found on MLflow 3.18
    the first time this sink ran), and SQLite is what MLflow, and verl's tracking, use instead.
    One ``log_batch`` a step: ``log_metric`` a key at a time is a database transaction each."""

    def __init__(self, run_dir: pathlib.Path, project: str, experiment: str) -> None:
        import mlflow

        run_dir = run_dir.resolve()
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            f"sqlite:///{run_dir / 'mlflow.db'}"
        )
        self.client = mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(project)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                project, artifact_location=(run_dir / "mlartifacts").as_uri()
            )
        )
        self.run_id = self.client.create_run(experiment_id, run_name=experiment).info.run_id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in _numeric(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (``ru_maxrss``: KiB on Linux). Each
    role of a run reports its own (trainer rank, rollouter, driver): each runs one phase."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        kib //= 1024
    return round(kib / 2**20, 3)
