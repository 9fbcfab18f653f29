"""Parameter-server checkpoints: one directory, written whole or not at all, its parts checked.

    <checkpoint>/
      tensors.safetensors   global weights ``weight.<i>``, each shard's strategy and
                            server-optimizer state ``shard<s>.<key>``, buffered pushes
                            ``pending<j>.<i>``
      state.json            version, counters, worker weights, shard layout (small JSON)
      manifest.json         written last: format_version, version, each file's size and sha256

Tensors go to safetensors: no pickle, so loading a checkpoint cannot run code. ``save`` fills
a temporary sibling directory and renames it into place (``atomic_dir``): a crash mid-save
leaves the previous checkpoint or the new one, never a mix, and the next save removes what
the killed one left. ``load`` checks every file against the manifest and refuses a checkpoint
whose parts disagree (assembled from two saves, copied half-way, truncated) with
``CheckpointMismatchError`` naming the file and what differs.

Format 1, before the manifest, renamed its two files into place one after the other. It is
still read, with a warning that its parts cannot be checked: every trainer checkpoint written
until now holds one in ``ps/`` (there the trainer's own rename made it whole), and refusing
them would strand those runs. The torn state its writer could leave, killed between its two
renames, is recognised by the leftover ``state.json.tmp`` and refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

import torch

from miniray import atomic_dir

log = logging.getLogger(__name__)

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (TENSORS_FILE, STATE_FILE, MANIFEST_FILE)
FORMAT_VERSION = 2
_FORMAT_1 = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint's files do not belong together (or one is missing or damaged)."""


def is_checkpoint(path: str) -> bool:
    """Whether directory ``path`` is a parameter-server checkpoint (of any format)."""
    return os.path.isfile(os.path.join(path, MANIFEST_FILE)) or os.path.isfile(
        os.path.join(path, STATE_FILE)
    )


def save(path: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write a checkpoint at ``path``, replacing one there (or an empty directory)."""
    from safetensors.torch import save_file

    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    atomic_dir.clean_stale(parent, is_checkpoint)
    _check_replaceable(path)
    # safetensors refuses views that share storage; contiguous clones make every entry its own.
    owned = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    tmp = atomic_dir.make_temp(path)
    try:
        save_file(owned, os.path.join(tmp, TENSORS_FILE))
        state_bytes = json.dumps(
            {"format_version": FORMAT_VERSION, **state}, indent=2, sort_keys=True
        ).encode("utf-8")
        with open(os.path.join(tmp, STATE_FILE), "wb") as f:
            f.write(state_bytes)
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": state.get("version"),
            "files": {
                TENSORS_FILE: _describe_file(os.path.join(tmp, TENSORS_FILE)),
                STATE_FILE: _describe(state_bytes),
            },
        }
        with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        atomic_dir.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` of the checkpoint at ``path``, once its parts are known to agree."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        previous = atomic_dir.find_previous(path, is_checkpoint)
        if previous is None:
            raise FileNotFoundError(
                f"load_checkpoint: {path} does not exist; is {path!r} a checkpoint?"
            )
        log.warning(
            "load_checkpoint: %s is missing (a save was killed while replacing it); loading "
            "the previous checkpoint, which that save had moved to %s",
            path,
            previous,
        )
        path = previous
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return _load_checked(path)
    return _load_format_1(path)


def _check_replaceable(path: str) -> None:
    # A save replaces the whole directory: one holding anything but a checkpoint is not ours.
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(
            f"save_checkpoint: {path} exists and is not a directory; a checkpoint is a "
            "directory, so the path must be absent, an empty directory, or a checkpoint"
        )
    entries = sorted(os.listdir(path))
    if entries and not is_checkpoint(path):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"save_checkpoint: {path} holds {shown} and is not a parameter-server checkpoint "
            f"(no {MANIFEST_FILE} or {STATE_FILE}); a save replaces the whole directory, so "
            "the path must be absent, an empty directory, or a checkpoint"
        )


def _describe(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _describe_file(file: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": os.path.getsize(file), "sha256": digest.hexdigest()}


def _read_files(path: str, names: list[str]) -> dict[str, bytes | None]:
    """The bytes of ``names`` in ``path`` (None: missing), all read through one open directory:
    a save that replaces ``path`` meanwhile cannot hand us files of two checkpoints."""
    if os.open not in os.supports_dir_fd:  # no openat here: by name, the manifest still checks
        return {n: _read_or_none(os.path.join(path, n)) for n in names}
    dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        out: dict[str, bytes | None] = {}
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:
                out[name] = None
                continue
            with os.fdopen(fd, "rb") as f:
                out[name] = f.read()
        return out
    finally:
        os.close(dir_fd)


def _read_or_none(file: str) -> bytes | None:
    try:
        with open(file, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _load_checked(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load as load_bytes

    manifest_path = os.path.join(path, MANIFEST_FILE)
    # The manifest and the files it lists are read through the same open directory.
    blobs = _read_files(path, [MANIFEST_FILE, TENSORS_FILE, STATE_FILE])
    manifest_bytes = blobs[MANIFEST_FILE]
    if manifest_bytes is None:
        raise FileNotFoundError(f"load_checkpoint: {manifest_path} vanished while loading")
    manifest = json.loads(manifest_bytes)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_checkpoint: {manifest_path} has format_version="
            f"{manifest.get('format_version')!r}; this miniray reads {FORMAT_VERSION}"
        )
    files = manifest.get("files", {})
    for name in (TENSORS_FILE, STATE_FILE):
        file = os.path.join(path, name)
        want = files.get(name)
        if want is None:
            raise CheckpointMismatchError(
                f"load_checkpoint: {manifest_path} does not list {name}; every checkpoint has "
                f"{TENSORS_FILE} and {STATE_FILE}"
            )
        data = blobs[name]
        if data is None:
            raise CheckpointMismatchError(
                f"load_checkpoint: {file} is missing, but {manifest_path} lists it "
                f"({want['size']} bytes)"
            )
        got = _describe(data)
        if got["size"] != want["size"]:
            raise CheckpointMismatchError(
                f"load_checkpoint: {file} has {got['size']} bytes, {manifest_path} records "
                f"{want['size']}: the file is truncated or from another save"
            )
        if got["sha256"] != want["sha256"]:
            raise CheckpointMismatchError(
                f"load_checkpoint: {file} has sha256 {got['sha256']}, {manifest_path} records "
                f"{want['sha256']}: the file is from another save, or damaged"
            )
    state_path = os.path.join(path, STATE_FILE)
    state = json.loads(blobs[STATE_FILE])  # type: ignore[arg-type]
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"load_checkpoint: {state_path} has format_version={state.get('format_version')!r}"
            f", {manifest_path} has {FORMAT_VERSION}; the files are from different saves"
        )
    if state.get("version") != manifest.get("version"):
        raise CheckpointMismatchError(
            f"load_checkpoint: {state_path} has version={state.get('version')!r}, "
            f"{manifest_path} records version={manifest.get('version')!r}; the files are from "
            "different saves"
        )
    return load_bytes(blobs[TENSORS_FILE]), state  # type: ignore[arg-type]


def _load_format_1(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    tensors_path = os.path.join(path, TENSORS_FILE)
    state_path = os.path.join(path, STATE_FILE)
    # The format-1 writer wrote both .tmp files, then renamed the tensors, then the state: a
    # state.json.tmp without a tensors.safetensors.tmp means it was killed between the renames.
    if os.path.isfile(state_path + ".tmp") and not os.path.exists(tensors_path + ".tmp"):
        raise CheckpointMismatchError(
            f"load_checkpoint: {path} is a format_version 1 checkpoint whose save was killed "
            f"half-way: {TENSORS_FILE} is from the newer save and {STATE_FILE} from the older; "
            f"the newer state is in {state_path}.tmp: rename it to {STATE_FILE} to load the "
            "newer save"
        )
    for p in (tensors_path, state_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"load_checkpoint: {p} does not exist; is {path!r} a checkpoint?"
            )
    with open(state_path) as f:
        state = json.load(f)
    if state.get("format_version") != _FORMAT_1:
        raise ValueError(
            f"load_checkpoint: {state_path} has format_version={state.get('format_version')!r}"
            f" and {path} has no {MANIFEST_FILE}; this miniray reads format_version "
            f"{FORMAT_VERSION} (with a manifest) and {_FORMAT_1}"
        )
    log.warning(
        "load_checkpoint: %s is a format_version 1 checkpoint (no %s): its files cannot be "
        "checked against each other; saving it again writes format_version %d",
        path,
        MANIFEST_FILE,
        FORMAT_VERSION,
    )
    return load_file(tensors_path), state


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix.`` with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def weight_list(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    weights = split_prefix(tensors, "weight")
    if not weights:
        return None
    return [weights[str(i)] for i in range(len(weights))]
