"""Where RL checkpoints live, which one a run resumes from, and how old ones are pruned.

    <trainer.default_local_dir>/<trainer.experiment_name>/checkpoints/
      global_step_<N>/   one checkpoint, written whole or not at all (``write``)
        state.json       step, version, data position (``data_position.TrainedPositions``), ...
        trainer.pt       model, optimizer and RNG states (tensors and plain containers only)
        huggingface/     with ``hf_model`` in ``actor.checkpoint.save_contents``: the model's
                         ``save_pretrained`` weights (safetensors) and its tokenizer, loadable
                         by ``AutoModelForCausalLM.from_pretrained`` as verl's export is
      latest             names the newest complete checkpoint

``write`` fills a temporary sibling directory and switches it into place with
``miniray.atomic_dir`` (fsynced, one rename; the trainer's and the parameter server's
checkpoints are written the same way), writing ``state.json`` last: a crash mid-write leaves
only a ``global_step_<N>.tmp-<host>-<pid>-*`` directory, which is never taken for a checkpoint,
and ``latest`` still names the previous one. The next save or resume removes what a killed
writer left (``remove_stale_temporaries``): only directories whose writing process of this host
is gone, so a save still running in another process keeps its directory; a checkpoint a killed
replacement had moved aside is put back first. ``trainer`` objects provide
``save_checkpoint(path, extra)`` and ``load_checkpoint(path) -> extra``. (rl sits beside
``miniray.train``, not above it, so it has its own small writer.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from miniray import atomic_dir

__all__ = [
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "read",
    "remove_stale_temporaries",
    "resume_path",
    "save_step",
    "write",
]

STATE_FILE = "state.json"
TENSORS_FILE = "trainer.pt"
HF_DIR = "huggingface"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def write(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    tensors: dict[str, Any],
    *,
    hf_model: tuple[Any, Any] | None = None,
) -> Path:
    """Write one checkpoint directory at ``path`` atomically (replacing one already there);
    ``hf_model=(model, tokenizer)`` adds a Hugging Face export under ``huggingface/``, inside
    the same atomic write, so an export never outlives or precedes its checkpoint."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(atomic_dir.make_temp(str(path)))
    try:
        torch.save(tensors, tmp / TENSORS_FILE)
        if hf_model is not None:
            model, tokenizer = hf_model
            model.save_pretrained(tmp / HF_DIR, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / HF_DIR)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump({"format_version": FORMAT_VERSION, **state}, f, indent=1, sort_keys=True)
        atomic_dir.replace(str(tmp), str(path))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a whole checkpoint (``write`` puts ``state.json`` in last)."""
    return (Path(path) / STATE_FILE).is_file()


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed ``write`` calls left in ``directory``; returns what it removed
    (``atomic_dir.clean_stale``: dead writers of this host only)."""
    return [Path(p) for p in atomic_dir.clean_stale(str(directory), is_complete)]


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, tensors)`` of the checkpoint at ``path``; tensors load with weights_only, so
    reading a checkpoint cannot run code."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a checkpoint: it has no {STATE_FILE}")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(state_file)!r} has format_version={state.get('format_version')!r};"
            f" this miniray reads format_version={FORMAT_VERSION}"
        )
    tensors = torch.load(path / TENSORS_FILE, map_location="cpu", weights_only=True)
    return state, tensors


def mark_latest(directory: Path, path: Path) -> None:
    """Point ``directory/latest`` at ``path`` (a temporary file renamed over it: atomic)."""
    tmp = directory / (LATEST_FILE + ".tmp")
    tmp.write_text(path.name + "\n", encoding="utf-8")
    os.replace(tmp, directory / LATEST_FILE)


def checkpoint_dir(config: Any) -> Path:
    trainer = config.trainer
    return Path(trainer.default_local_dir) / trainer.experiment_name / "checkpoints"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete ``global_step_<N>`` checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` names, else the highest complete step, else None."""
    directory = Path(directory)
    pointer = directory / LATEST_FILE
    if pointer.is_file():
        target = directory / pointer.read_text(encoding="utf-8").strip()
        if (target / STATE_FILE).is_file():
            return target
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resume_path(config: Any) -> Path | None:
    """The checkpoint this run starts from, by ``trainer.resume_mode``:

    * ``disable``: none;
    * ``auto``: the newest one in ``checkpoint_dir(config)``, or none when there is none;
    * ``resume_path``: ``trainer.resume_from_path`` (a ``global_step_<N>`` directory, or a
      checkpoints directory meaning its newest); an error when it holds no checkpoint.
    """
    trainer = config.trainer
    if trainer.resume_mode == "disable":
        return None
    if trainer.resume_mode == "auto":
        return latest_checkpoint(checkpoint_dir(config))
    path = Path(trainer.resume_from_path)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"trainer.resume_from_path={str(path)!r} is not a checkpoint (no {STATE_FILE}) "
            "and holds no global_step_<N> checkpoint"
        )
    return found


def save_step(trainer: Any, config: Any, step: int, extra: dict[str, Any]) -> Path:
    """Checkpoint ``trainer`` as ``global_step_<step>``, point ``latest`` at it, prune."""
    if not callable(getattr(trainer, "save_checkpoint", None)):
        raise TypeError(
            f"trainer.save_freq={config.trainer.save_freq} asks for checkpoints, but the "
            f"trainer {type(trainer).__name__} has no save_checkpoint(path, extra)"
        )
    directory = checkpoint_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    path = Path(trainer.save_checkpoint(directory / f"global_step_{step}", extra))
    mark_latest(directory, path)
    keep = config.trainer.max_actor_ckpt_to_keep
    if keep is not None:
        for _, old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    return path
