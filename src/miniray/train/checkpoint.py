"""Trainer checkpoints: one directory per checkpoint, written whole or not at all.

    <checkpoint>/
      trainer.json     epochs completed, history, number of workers, what the worker files hold
      worker_<i>.pt    worker i's ``state_dict()`` (model, optimizer, RNG...) or its weights
      ps/              the parameter server's own checkpoint (DataParallelTrainer)

Everything is written into a temporary sibling directory which is then renamed
(``miniray.atomic_dir``), so a run killed mid-save leaves the previous checkpoint intact and
never a half-written one under the final name. ``trainer.json`` is written last: a directory
without it is not a checkpoint. A killed save leaves its ``<name>.tmp-<host>-<pid>-<hex>``
directory (and, killed while replacing a checkpoint, the previous one aside in
``<name>.old-...``): the next ``save`` or ``resolve`` (a resume) in that directory puts a
previous checkpoint aside back and deletes the leftovers of processes that have exited, never
those of a live one, whose save may be in progress.

Worker files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only (what ``state_dict()`` of modules and optimizers return), so loading a
checkpoint cannot run code. Periodic checkpoints go to ``<checkpoint_dir>/epoch_<k>`` and the
file ``<checkpoint_dir>/latest`` names the newest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch

from miniray import atomic_dir

TRAINER_FILE = "trainer.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
_PERIODIC = re.compile(r"^epoch_(\d+)$")


def worker_file(path: str, worker_id: int) -> str:
    return os.path.join(path, f"worker_{worker_id}.pt")


def save(
    path: str,
    *,
    state: dict[str, Any],
    worker_states: list[Any],
    write_extra: Callable[[str], None] | None = None,
) -> str:
    """Write a checkpoint to ``path`` (replacing one already there) and return ``path``."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    atomic_dir.clean_stale(parent, is_checkpoint)
    _check_replaceable(path)
    tmp = atomic_dir.make_temp(path)
    try:
        for i, worker_state in enumerate(worker_states):
            torch.save(worker_state, worker_file(tmp, i))
        if write_extra is not None:
            write_extra(tmp)
        with open(os.path.join(tmp, TRAINER_FILE), "w", encoding="utf-8") as f:
            json.dump({"format_version": FORMAT_VERSION, **state}, f, indent=1, sort_keys=True)
        atomic_dir.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_FILE))


def _check_replaceable(path: str) -> None:
    # Replacing means deleting what is there: only a checkpoint (or nothing) may be.
    if not os.path.lexists(path):
        return
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else None
    if entries is None or (entries and not is_checkpoint(path)):
        what = "a file" if entries is None else ", ".join(entries[:5])
        raise ValueError(
            f"save_checkpoint: {path} holds {what} and is not a checkpoint (no {TRAINER_FILE})"
            "; a save replaces the whole directory, so the path must be absent, an empty "
            "directory, or a checkpoint"
        )


def load(path: str) -> tuple[dict[str, Any], list[Any]]:
    """``(state, worker_states)`` of the checkpoint at ``path`` (resolved with ``resolve``)."""
    state = read_state(path)
    worker_states = [
        torch.load(worker_file(path, i), map_location="cpu", weights_only=True)
        for i in range(state["num_workers"])
    ]
    return state, worker_states


def read_state(path: str) -> dict[str, Any]:
    state_path = os.path.join(path, TRAINER_FILE)
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {state_path} has format_version={state.get('format_version')!r}; "
            f"this miniray reads format_version={FORMAT_VERSION}"
        )
    return state


def resolve(path: str | os.PathLike[str]) -> str:
    """The checkpoint ``path`` means: itself, the one ``latest`` names, or its newest epoch_<k>."""
    path = os.path.abspath(os.fspath(path))
    # A resume is the next run after a killed one: clean up what its saves left, here (the
    # epoch_<k> saves into a checkpoint_dir) and beside (a save_checkpoint(path) onto path).
    atomic_dir.clean_stale(os.path.dirname(path), is_checkpoint)
    atomic_dir.clean_stale(path, is_checkpoint)
    if os.path.isfile(os.path.join(path, TRAINER_FILE)):
        return path
    if not os.path.exists(path):
        # Killed while replacing it, by a writer that may still be alive: the previous one.
        previous = atomic_dir.find_previous(path, is_checkpoint)
        if previous is not None:
            return previous
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
        target = os.path.join(path, name)
        if os.path.isfile(os.path.join(target, TRAINER_FILE)):
            return target
    periodic = list_periodic(path)
    if periodic:
        return periodic[-1][1]
    raise FileNotFoundError(
        f"resume_from: {path!r} is not a checkpoint (no {TRAINER_FILE}) and holds no "
        f"{LATEST_FILE} file or epoch_<k> checkpoints"
    )


def periodic_path(checkpoint_dir: str, epochs_done: int) -> str:
    return os.path.join(os.path.abspath(checkpoint_dir), f"epoch_{epochs_done:06d}")


def list_periodic(checkpoint_dir: str) -> list[tuple[int, str]]:
    """Complete ``epoch_<k>`` checkpoints in ``checkpoint_dir``, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = _PERIODIC.match(name)
        full = os.path.join(checkpoint_dir, name)
        if match and os.path.isfile(os.path.join(full, TRAINER_FILE)):
            found.append((int(match.group(1)), full))
    return sorted(found)


def mark_latest(checkpoint_dir: str, path: str) -> None:
    """Point ``<checkpoint_dir>/latest`` at ``path`` (atomically: write a temp file, rename)."""
    tmp = os.path.join(checkpoint_dir, LATEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(os.path.basename(path) + "\n")
    os.replace(tmp, os.path.join(checkpoint_dir, LATEST_FILE))


def prune(checkpoint_dir: str, keep: int | None) -> None:
    """Delete all but the ``keep`` newest periodic checkpoints (None keeps every one)."""
    if keep is None:
        return
    for _, full in list_periodic(checkpoint_dir)[:-keep]:
        shutil.rmtree(full)
