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

A reader may keep its copy-on-write mapping of a segment after the last view over it is gone and
read the next value its creator writes into that segment through it (runtime/segments.py keeps
such mappings), because of two facts about Linux. A page of a MAP_PRIVATE file mapping that this
process has never written maps the file's own page (the page cache, here tmpfs), so the
creator's later writes through its shared mapping are what the reader sees: nothing stale is
cached. A page it has written is a private copy, and stays one: such a mapping would show the old
bytes it wrote, so it must not be reused. ``written`` tells the two apart from
/proc/self/pagemap. And the file must still be the one mapped: ``file_id`` (device and inode)
tells, and while this process maps the file its inode cannot be freed and its number reused.
Because such idle mappings hold a file's pages, a segment that nobody maps for a value any more
is removed with ``delete`` (truncated, then unlinked), which takes the pages back from them too.
"""

from __future__ import annotations

import ctypes
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
    return map_private_identified(name, size)[0]


class FileId(NamedTuple):
    """Which file a mapping maps (a name can be unlinked and made again by a new process)."""

    device: int
    inode: int


def map_private_identified(name: str, size: int) -> tuple[mmap.mmap, FileId]:
    """``map_private``, and the identity of the file it mapped."""
    fd = os.open(path_of(name), os.O_RDONLY)
    try:
        stat = os.fstat(fd)
        mapping = mmap.mmap(
            fd,
            size,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        return mapping, FileId(stat.st_dev, stat.st_ino)
    finally:
        os.close(fd)


def file_id(name: str, *, pooled: bool = False) -> FileId | None:
    """The identity of segment ``name``'s file; with ``pooled``, also found as ``<name>.free``.
    None if there is none (deleted, or being evicted: its pages are going)."""
    for path in (path_of(name), path_of(name + FREE_SUFFIX)) if pooled else (path_of(name),):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        return FileId(stat.st_dev, stat.st_ino)
    return None


PAGE = mmap.PAGESIZE
# The top byte of a /proc/self/pagemap entry (little-endian: byte 7 of 8) holds bit 63 (present),
# 62 (swapped) and 61 (a file page or shared anonymous). A present page that is not the file's
# is a private copy, and a swapped page of a file mapping is one too (the file's own pages are
# dropped from the page table, not swapped there). So, per top byte: 1 if written.
_WRITTEN_BY_TOP_BYTE = bytes(1 if (b & 0x40) or (b & 0xA0) == 0x80 else 0 for b in range(256))


def written(mapping: mmap.mmap, size: int) -> bool:
    """Has this process written into the first ``size`` bytes of the copy-on-write ``mapping``
    (does it hold private copies of pages)? If pagemap cannot be read, assume it has.

    Reads one 8-byte pagemap entry per page and tests their top bytes at C speed: ~4 ms for
    256 MiB of present pages, under 1 ms when few pages are present (measured on the 2-core
    development machine; the kernel's walk of the page table is most of it).
    """
    probe = ctypes.c_char.from_buffer(mapping)  # only for the address; released at once
    start = ctypes.addressof(probe) // PAGE
    del probe
    raw = bytearray(8 * ((size + PAGE - 1) // PAGE))
    got = 0
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(start * 8)
            with memoryview(raw) as view:
                while got < len(raw):
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
    except OSError:
        return True
    return got != len(raw) or 1 in raw[7::8].translate(_WRITTEN_BY_TOP_BYTE)


def unlink(name: str) -> None:
    try:
        os.unlink(path_of(name))
    except FileNotFoundError:
        pass


def delete(name: str) -> None:
    """Delete a segment that no process maps for a value any more, and give its pages back now:
    readers may keep idle mappings of it (runtime/segments.py), and tmpfs keeps a file's pages
    while any process maps it, so the file is truncated first, as an evictor does."""
    _empty_then_unlink(name)


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
    _empty_then_unlink(name + EVICTING_SUFFIX)  # gone already: the head swept it (dead creator)
    return True


def _empty_then_unlink(name: str) -> None:
    """Truncate segment file ``name`` (that frees its pages in every mapping at once; unlinking
    alone would wait for them to be unmapped), then unlink it; nothing if it is gone."""
    try:
        fd = os.open(path_of(name), os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    unlink(name)


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
