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

Space is reserved when a segment is created (``posix_fallocate``), not when its pages are first
written: a file in a full tmpfs maps fine, and the write that finds no page kills the process
with SIGBUS. Docker gives a container 64 MB of /dev/shm, so that is an ordinary failure; here it
is an ``ObjectStoreFullError`` that names the way out: a larger ``--shm-size``, or
``$MINIRAY_SHM_DIR``, a directory on another file system where the segments go instead (set it
before ``miniray.init()``; children inherit it, and the sweeps at shutdown and after a crash
look there as they look in /dev/shm).

A freed segment that its creator keeps for reuse (runtime/segments.py) is renamed
``<name>.free``, so that any process that finds the directory full can see it and take it back.
Whoever removes or reuses a ``.free`` file first renames it (``<name>.evicting`` to remove, back
to ``<name>`` to reuse): a rename of one path succeeds for one process only, so an evictor and the
creator never both think they have it. Unlinking alone would free nothing: the creator keeps its
writable mapping of a pooled segment open, and tmpfs keeps a file's pages while any process maps
it, so the evictor truncates the file first, which takes the pages back from every mapping.
"""

from __future__ import annotations

import errno
import glob
import itertools
import mmap
import os
from typing import NamedTuple

from miniray.errors import ObjectStoreFullError

ENV_SHM_DIR = "MINIRAY_SHM_DIR"
DEFAULT_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
NAME_PREFIX = "miniray_"
FREE_SUFFIX = ".free"  # pooled by its creator, unmapped by everyone else: anyone may evict it
EVICTING_SUFFIX = ".evicting"  # claimed by one process, which is deleting it
ALIGN = 64

_counter = itertools.count()


def directory() -> str:
    """Where segments live: ``$MINIRAY_SHM_DIR`` if set, else /dev/shm.

    Read at every use rather than at import, so that setting it in a script before
    ``miniray.init()`` works; a child gets its driver's value in its environment.
    """
    return os.environ.get(ENV_SHM_DIR) or DEFAULT_SHM_DIR


def session_prefix(session_id: str) -> str:
    return f"{NAME_PREFIX}{session_id}_"


def path_of(name: str) -> str:
    return os.path.join(directory(), name)


class SegmentName(NamedTuple):
    """The parts of a segment's name, ``miniray_<session>_<creator pid>_<serial>``: the one
    place that knows the format (the head asks who created a segment to hand it back)."""

    session_id: str
    creator_pid: int
    serial: int

    def __str__(self) -> str:
        return f"{session_prefix(self.session_id)}{self.creator_pid}_{self.serial}"


def new_name(session_id: str) -> str:
    return str(SegmentName(session_id, os.getpid(), next(_counter)))


def parse_name(name: str) -> SegmentName | None:
    """The parts of a name ``new_name`` made, pooled or being evicted (``.free``,
    ``.evicting``: the suffix is dropped); None for any other name."""
    if not name.startswith(NAME_PREFIX):
        return None
    parts = name[len(NAME_PREFIX) :].split("_")
    if len(parts) != 3:
        return None
    serial, dot, suffix = parts[2].partition(".")
    if dot and "." + suffix not in (FREE_SUFFIX, EVICTING_SUFFIX):
        return None
    if not parts[1].isdigit() or not serial.isdigit():
        return None
    return SegmentName(parts[0], int(parts[1]), int(serial))


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def create(name: str, size: int) -> mmap.mmap:
    """Create a segment of ``size`` bytes and return a writable shared mapping of it
    (the caller closes it). ``ObjectStoreFullError`` if the directory has no room for it."""
    try:
        fd = os.open(path_of(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the shared-memory directory {directory()} does not exist"
            + (f" ({ENV_SHM_DIR}={os.environ[ENV_SHM_DIR]})" if os.environ.get(ENV_SHM_DIR) else "")
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # out of inodes
            raise _full_error(size) from None
        raise
    try:
        _reserve(fd, size)
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


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's pages now, so that writing through a mapping cannot SIGBUS later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _full_error(size) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # A file system that cannot reserve (glibc emulates it on most): size the file only.
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)


def space() -> tuple[int, int] | None:
    """(size, free bytes) of the segment directory's file system; None if it cannot tell."""
    try:
        stat = os.statvfs(directory())
    except OSError:
        return None
    return stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize


def _full_error(size: int) -> ObjectStoreFullError:
    where = directory()
    known = space()
    room = "" if known is None else f" ({_mib(known[0])} in all, {_mib(known[1])} free)"
    return ObjectStoreFullError(
        f"the shared-memory directory {where} is full: a {_mib(size)} segment for a large "
        f"value does not fit in it{room}. Free large objects still referenced (del the "
        f"ObjectRefs), or make room: in Docker, /dev/shm is 64 MiB unless the container is "
        f"started with a larger --shm-size (e.g. docker run --shm-size=8g); or set "
        f"{ENV_SHM_DIR} to a directory on a larger file system (a tmpfs is fastest, a disk "
        f"works) before miniray.init(), and large values go there instead."
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def open_shared(name: str, size: int) -> mmap.mmap:
    """A writable shared mapping of the first ``size`` bytes of an existing segment."""
    fd = os.open(path_of(name), os.O_RDWR)
    try:
        if os.fstat(fd).st_size < size:
            _reserve(fd, size)
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


def mark_free(name: str) -> None:
    """Show that segment ``name`` is pooled: from now on any process may evict it."""
    os.rename(path_of(name), path_of(name + FREE_SUFFIX))


def claim_free(name: str) -> bool:
    """Take pooled segment ``name`` back for reuse; False if another process evicted it first
    (then its pages are gone, and a mapping of it must never be written: that would SIGBUS)."""
    try:
        os.rename(path_of(name + FREE_SUFFIX), path_of(name))
    except FileNotFoundError:
        return False
    return True


def evict_free(name: str) -> bool:
    """Delete pooled segment ``name`` and give its pages back now, even though its creator still
    maps it; False if another process claimed it first (for reuse or to evict it)."""
    evicting = path_of(name + EVICTING_SUFFIX)
    try:
        os.rename(path_of(name + FREE_SUFFIX), evicting)
    except FileNotFoundError:
        return False
    try:
        fd = os.open(evicting, os.O_RDWR)
    except FileNotFoundError:  # the head swept it meanwhile (its creator died)
        return True
    try:
        os.ftruncate(fd, 0)  # frees the pages in every mapping; unlinking would wait for them
    finally:
        os.close(fd)
    unlink(name + EVICTING_SUFFIX)
    return True


def list_free(session_id: str) -> list[str]:
    """Names (without the suffix) of the session's pooled segments, whichever process made them."""
    pattern = glob.escape(path_of(session_prefix(session_id))) + "*" + glob.escape(FREE_SUFFIX)
    return [os.path.basename(p)[: -len(FREE_SUFFIX)] for p in glob.glob(pattern)]


def list_session(session_id: str) -> list[str]:
    return [os.path.basename(p) for p in glob.glob(path_of(session_prefix(session_id)) + "*")]


def unlink_session(session_id: str) -> int:
    """Remove every segment of a session, pooled and half-evicted ones included (their names
    only add a suffix); returns how many were removed."""
    names = list_session(session_id)
    for name in names:
        unlink(name)
    return len(names)
