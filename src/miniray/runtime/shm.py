"""Shared-memory segments: files in /dev/shm that hold the large buffers of one object.

Who creates, who maps, who deletes:

    producer process            head (driver)                consumer process
    create() + write buffers -> registers the name      ->   map_private(): zero-copy,
                                unlink() when the object      copy-on-write view
                                is freed or at shutdown

Every segment name starts with ``miniray_<session>_`` so that a crashed session can be swept
with one glob (``unlink_session``). We use plain files in /dev/shm rather than
``multiprocessing.shared_memory`` because the latter starts a resource-tracker process and
unlinks segments behind our back when the creating process exits.

Consumers map with MAP_PRIVATE: reading costs no copy, and a consumer that writes into a tensor
it received gets private pages instead of corrupting the object for everyone else (Ray gives
read-only arrays for the same reason; we give writable ones that do not leak).
"""

from __future__ import annotations

import glob
import itertools
import mmap
import os

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
NAME_PREFIX = "miniray_"
ALIGN = 64

_counter = itertools.count()


def session_prefix(session_id: str) -> str:
    return f"{NAME_PREFIX}{session_id}_"


def path_of(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def new_name(session_id: str) -> str:
    return f"{session_prefix(session_id)}{os.getpid()}_{next(_counter)}"


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def create(name: str, size: int) -> mmap.mmap:
    """Create a segment of ``size`` bytes and return a writable shared mapping of it
    (the caller closes it)."""
    fd = os.open(path_of(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        # MAP_POPULATE faults every page in one syscall instead of one trap per 4 KiB page.
        return mmap.mmap(
            fd,
            size,
            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def open_shared(name: str, size: int) -> mmap.mmap:
    """A writable shared mapping of the first ``size`` bytes of an existing segment."""
    fd = os.open(path_of(name), os.O_RDWR)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return mmap.mmap(
            fd,
            size,
            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    finally:
        os.close(fd)


def map_private(name: str, size: int) -> mmap.mmap:
    """Map a segment copy-on-write: reads are zero-copy, writes stay in this process."""
    fd = os.open(path_of(name), os.O_RDONLY)
    try:
        return mmap.mmap(
            fd,
            size,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    try:
        os.unlink(path_of(name))
    except FileNotFoundError:
        pass


def list_session(session_id: str) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(path_of(session_prefix(session_id)) + "*")]


def unlink_session(session_id: str) -> int:
    """Remove every segment of a session; returns how many were removed."""
    names = list_session(session_id)
    for name in names:
        unlink(name)
    return len(names)
