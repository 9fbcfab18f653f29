"""Directories written whole or not at all, and what writers that were killed leave behind.

The parameter server's checkpoints (``ps/checkpoint.py``), the trainer's (``train/checkpoint.py``)
and the RL loop's (``rl/checkpoint.py``) are written this way; the module imports nothing of
miniray, so every layer may use it:

    make_temp(path)      a fresh ``<name>.tmp-<host>-<pid>-<hex>`` beside ``path``; fill it
    replace(tmp, path)   fsync it, rename it to ``path``

Renaming onto an existing directory is not possible and POSIX has no portable atomic swap, so
replacing a checkpoint takes two renames: the old one goes to
``<name>.old-<host>-<pid>-<hex>/previous``, then the new one into place, then the old one is
deleted. A writer killed between the two leaves ``path`` missing and the previous checkpoint,
complete, aside: ``find_previous`` lets a reader load it, and ``clean_stale`` puts it back.

``clean_stale`` (the next save or resume runs it) removes the temporary and old directories of
writers that are dead. Their pid is in the name: a live pid may be a save in progress in
another process or thread, so those are kept; a name from another host (a shared file system)
cannot be checked from here, so those are kept too.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

PREVIOUS = "previous"
# The host part of the names: the characters of a file name that cannot be confused with the
# name's separators ("-").
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"
_LEFTOVER = re.compile(
    r"^(?P<target>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$"
)


def temp_name(path: str, kind: str, *, pid: int | None = None) -> str:
    """``<path>.<kind>-<host>-<pid>-<random>``: a name beside ``path`` (not created)."""
    if kind not in ("tmp", "old"):
        raise ValueError(f"temp_name: kind={kind!r}; it is 'tmp' or 'old'")
    pid = os.getpid() if pid is None else pid
    return f"{path}.{kind}-{HOST}-{pid}-{secrets.token_hex(4)}"


def owner(name: str) -> tuple[str, str, str, int] | None:
    """``(target, kind, host, pid)`` of a name ``temp_name`` made, else None."""
    match = _LEFTOVER.match(name)
    if match is None:
        return None
    return match["target"], match["kind"], match["host"], int(match["pid"])


def make_temp(path: str, kind: str = "tmp") -> str:
    """Create and return a fresh directory ``temp_name(path, kind)``."""
    while True:
        name = temp_name(path, kind)
        try:
            os.mkdir(name)
            return name
        except FileExistsError:  # 32 random bits taken: draw again
            continue


def replace(tmp: str, path: str) -> None:
    """Put the directory ``tmp`` at ``path``; one already there is moved aside, then deleted."""
    _fsync_tree(tmp)  # on disk before a rename makes it visible
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
        old = make_temp(path, "old")
        os.rename(path, os.path.join(old, PREVIOUS))
        os.rename(tmp, path)
        _fsync_dir(parent)
        # The new directory is in place: failing to delete the old one must not make the save
        # look failed. What stays behind, clean_stale removes once this process has exited.
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
        _fsync_dir(parent)


def find_previous(path: str, is_complete: Callable[[str], bool]) -> str | None:
    """The complete directory a killed ``replace`` of ``path`` moved aside, if any (the newest).

    Only reads: a reader may use it whoever the writer was, even one still running.
    """
    candidates = [c for c in _old_dirs(path) if is_complete(os.path.join(c, PREVIOUS))]
    if not candidates:
        return None
    return os.path.join(max(candidates, key=_mtime), PREVIOUS)


def clean_stale(directory: str, is_complete: Callable[[str], bool]) -> list[str]:
    """Remove dead writers' ``*.tmp-*``/``*.old-*`` directories in ``directory``; returns them.

    A previous directory that a killed ``replace`` moved aside is first put back at its name
    when nothing is there: a save that never finished must not cost the checkpoint before it.
    """
    if not os.path.isdir(directory):
        return []
    stale = []
    for name in os.listdir(directory):
        match = _LEFTOVER.match(name)
        full = os.path.join(directory, name)
        if match is None or match["host"] != HOST or not os.path.isdir(full):
            continue
        if not _alive(int(match["pid"])):
            stale.append((match["kind"], match["target"], full))
    # Newest old directory first: if several hold a previous version, the newest is restored.
    stale.sort(key=lambda s: (s[0] != "old", -_mtime(s[2])))
    removed = []
    for kind, target, full in stale:
        target_path = os.path.join(directory, target)
        previous = os.path.join(full, PREVIOUS)
        if kind == "old" and not os.path.lexists(target_path) and is_complete(previous):
            os.rename(previous, target_path)
            log.warning(
                "restored %s from %s: a save killed while replacing it had moved it there",
                target_path,
                previous,
            )
        shutil.rmtree(full, ignore_errors=True)
        if not os.path.lexists(full):
            removed.append(full)
            log.info("removed %s, left by a save whose process has exited", full)
    return removed


def _old_dirs(path: str) -> list[str]:
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    if not os.path.isdir(parent):
        return []
    found = []
    for name in os.listdir(parent):
        match = _LEFTOVER.match(name)
        if match and match["kind"] == "old" and match["target"] == base:
            found.append(os.path.join(parent, name))
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (of this host) may still be writing; unsure means yes."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A killed process that its parent has not reaped yet is a zombie: it writes nothing more.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _fsync_tree(directory: str) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
