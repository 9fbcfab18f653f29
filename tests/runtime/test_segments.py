"""Reuse of a process's own shared-memory segments (runtime/segments.py), and eviction of any
process's pooled segments when the directory is full."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time

import pytest

from miniray.runtime import segments, shm

SESSION = "segtest"


@pytest.fixture(autouse=True)
def clean():
    segments.reset()
    yield
    segments.reset()
    shm.unlink_session(SESSION)


def test_reclaimed_segment_is_reused_for_a_value_of_similar_size():
    name, _ = segments.acquire(SESSION, 4 << 20)
    segments.reclaim(name)
    again, mapping = segments.acquire(SESSION, 3 << 20)
    assert again == name and len(mapping) >= 3 << 20
    other, _ = segments.acquire(SESSION, 1 << 20)  # far smaller: a new segment
    assert other != name


def test_one_segment_larger_than_the_pool_limit_is_still_kept(monkeypatch):
    monkeypatch.setattr(segments, "POOL_LIMIT_BYTES", 2 << 20)
    big, _ = segments.acquire(SESSION, 8 << 20)
    segments.reclaim(big)
    assert shm.list_session(SESSION) == [big + shm.FREE_SUFFIX]
    assert segments.acquire(SESSION, 8 << 20)[0] == big


def test_pool_evicts_the_oldest_beyond_its_limit(monkeypatch):
    monkeypatch.setattr(segments, "POOL_LIMIT_BYTES", 5 << 20)
    first, _ = segments.acquire(SESSION, 4 << 20)
    second, _ = segments.acquire(SESSION, 4 << 20)
    segments.reclaim(first)
    segments.reclaim(second)
    assert shm.list_session(SESSION) == [second + shm.FREE_SUFFIX]  # the older one was deleted
    assert segments.pooled_bytes() == 4 << 20


def test_a_pooled_segment_is_marked_free_and_its_owner_claims_it_back_for_reuse():
    name, _ = segments.acquire(SESSION, 4 << 20)
    assert shm.list_session(SESSION) == [name]
    segments.reclaim(name)
    # Pooled: visible to every process as one it may evict when the directory is full.
    assert shm.list_session(SESSION) == [name + shm.FREE_SUFFIX]
    assert shm.list_free(SESSION) == [name]
    again, _ = segments.acquire(SESSION, 4 << 20)
    assert again == name
    assert shm.list_session(SESSION) == [name]  # claimed: no longer anyone's to evict


def test_a_pooled_segment_goes_to_whichever_of_evictor_and_owner_claims_it_first():
    name, _ = segments.acquire(SESSION, 4 << 20)
    segments.reclaim(name)
    assert shm.evict_free(name)  # as another process that needs the room does
    assert not shm.evict_free(name) and not shm.claim_free(name)  # taken: nobody else gets it
    assert shm.list_session(SESSION) == []
    assert segments.pooled_bytes() == 0  # the owner sees that its pooled segment is gone
    # The owner's mapping of it has no pages any more: reuse gets a new segment instead.
    again, mapping = segments.acquire(SESSION, 4 << 20)
    assert again != name and len(mapping) == 4 << 20
    mapping[:] = b"\x02" * len(mapping)
    assert shm.list_session(SESSION) == [again]


def test_the_owner_claims_before_reuse_so_the_evictor_loses_the_race():
    name, _ = segments.acquire(SESSION, 4 << 20)
    segments.reclaim(name)
    assert segments.acquire(SESSION, 4 << 20)[0] == name
    assert not shm.evict_free(name)  # in use again: not evictable
    assert shm.list_session(SESSION) == [name]


def test_session_sweep_removes_live_pooled_and_half_evicted_segments():
    live, pooled, stuck = (segments.acquire(SESSION, 2 << 20)[0] for _ in range(3))
    segments.reclaim(pooled)
    segments.reclaim(stuck)
    # An evictor killed between its claim and its unlink leaves a <name>.evicting file.
    os.rename(shm.path_of(stuck + shm.FREE_SUFFIX), shm.path_of(stuck + shm.EVICTING_SUFFIX))
    assert sorted(shm.list_session(SESSION)) == sorted(
        [live, pooled + shm.FREE_SUFFIX, stuck + shm.EVICTING_SUFFIX]
    )
    segments.reset()  # as shutdown does, before the sweep
    assert shm.unlink_session(SESSION) == 3
    assert shm.list_session(SESSION) == []


def test_small_segments_are_deleted_not_pooled():
    name, _ = segments.acquire(SESSION, 4096)
    segments.reclaim(name)
    assert shm.list_session(SESSION) == []


@pytest.fixture
def tiny_shm_dir(monkeypatch):
    """Segments go to a private 16 MB tmpfs, as in a container with a small /dev/shm."""
    from tmpfs_support import small_tmpfs

    with small_tmpfs(16) as path:
        monkeypatch.setenv(shm.ENV_SHM_DIR, path)
        yield path
        segments.reset()
        shm.unlink_session(SESSION)


def test_segment_directory_comes_from_the_environment(tiny_shm_dir):
    name, _ = segments.acquire(SESSION, 2 << 20)
    assert os.listdir(tiny_shm_dir) == [name]
    assert shm.list_session(SESSION) == [name]
    assert shm.unlink_session(SESSION) == 1
    assert os.listdir(tiny_shm_dir) == []


def test_a_segment_larger_than_the_free_space_is_a_clear_error_not_sigbus(tiny_shm_dir):
    from miniray.errors import ObjectStoreFullError

    with pytest.raises(ObjectStoreFullError) as info:
        segments.acquire(SESSION, 100 << 20)
    message = str(info.value)
    assert tiny_shm_dir in message and "is full" in message
    assert "100.0 MiB" in message and "16.0 MiB" in message  # what was asked, what there is
    assert "--shm-size" in message and shm.ENV_SHM_DIR in message
    assert os.listdir(tiny_shm_dir) == []  # the refused segment is not left behind
    # The space was reserved, so what fits is really there: writing all of it cannot SIGBUS.
    name, mapping = segments.acquire(SESSION, 8 << 20)
    mapping[:] = b"\x01" * len(mapping)
    assert os.listdir(tiny_shm_dir) == [name]


def test_a_missing_segment_directory_is_named_in_the_error(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-such-dir")
    monkeypatch.setenv(shm.ENV_SHM_DIR, missing)
    with pytest.raises(FileNotFoundError, match=f"{shm.ENV_SHM_DIR}={missing}"):
        segments.acquire(SESSION, 1 << 20)


def test_a_full_directory_evicts_our_pooled_segments_before_giving_up(tiny_shm_dir):
    """Freed segments stay pooled for reuse; in a small /dev/shm they must not crowd out a new
    value of another size."""
    pooled, _ = segments.acquire(SESSION, 3 << 20)
    segments.reclaim(pooled)
    assert segments.pooled_bytes() == 3 << 20
    name, mapping = segments.acquire(SESSION, 14 << 20)  # does not fit next to the pooled one
    assert name != pooled and len(mapping) == 14 << 20
    assert os.listdir(tiny_shm_dir) == [name]
    assert segments.pooled_bytes() == 0


def test_a_half_full_directory_deletes_freed_segments_instead_of_pooling(tiny_shm_dir):
    """Past half full, pooled pages are given back at once: most creations then find room
    without first evicting some process's pool."""
    small, _ = segments.acquire(SESSION, 2 << 20)
    segments.reclaim(small)
    assert segments.pooled_bytes() == 2 << 20  # plenty of room: pooled
    live, _ = segments.acquire(SESSION, 7 << 20)
    freed, _ = segments.acquire(SESSION, 2 << 20)  # reuses the pooled one
    assert freed == small
    segments.reclaim(freed)  # 9 of 16 MiB in use: deleted, not pooled
    assert segments.pooled_bytes() == 0
    assert os.listdir(tiny_shm_dir) == [live]


OWNER = """
    import sys
    from miniray.runtime import segments

    MIB = 1 << 20
    name, mapping = segments.acquire(sys.argv[1], 7 * MIB)
    mapping[:] = b"\\x01" * len(mapping)
    segments.reclaim(name)  # pooled: 7 of 16 MiB in use, so kept, with our mapping open
    print(name, segments.pooled_bytes(), flush=True)
    sys.stdin.readline()
    again, mapping = segments.acquire(sys.argv[1], 7 * MIB)
    mapping[:] = b"\\x02" * len(mapping)  # into an evicted segment's mapping: SIGBUS
    print(again, segments.pooled_bytes(), flush=True)
    sys.stdin.readline()
"""


def read_line(proc, timeout):
    """One line of ``proc``'s stdout, or an AssertionError after ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no line from the owner process in {timeout}s: {data!r}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"the owner process exited ({proc.wait(timeout=10)}): {data!r}")
        data += chunk
    return data.decode().split()


def test_a_full_directory_evicts_a_segment_another_process_pooled(tiny_shm_dir, tmp_path):
    """The driver's pool must not make a worker's value fail: a process that finds the directory
    full evicts any process's pooled segments, and their owner, which still maps them, then
    gets a new segment instead of writing into pages that are gone (SIGBUS)."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(OWNER))
    owner = subprocess.Popen(
        [sys.executable, str(script), SESSION],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        pooled, pooled_bytes = read_line(owner, 30)
        assert int(pooled_bytes) == 7 << 20
        # 9 MiB are free: 12 fit only if the other process's pooled segment goes, and its
        # pages with it, though the owner still maps them.
        mine, mapping = segments.acquire(SESSION, 12 << 20)
        mapping[:] = b"\x03" * len(mapping)
        assert os.listdir(tiny_shm_dir) == [mine]
        segments.forget(mine)
        owner.stdin.write(b"go\n")
        owner.stdin.flush()
        again, pooled_bytes = read_line(owner, 30)
        assert again != pooled and int(pooled_bytes) == 0
        assert os.listdir(tiny_shm_dir) == [again]
        owner.stdin.write(b"done\n")
        owner.stdin.flush()
        assert owner.wait(timeout=30) == 0
    finally:
        owner.kill()
        owner.wait(timeout=10)
        owner.stdin.close()
        owner.stdout.close()
    assert shm.unlink_session(SESSION) == 1  # the owner's segment, which it never freed
    assert os.listdir(tiny_shm_dir) == []


# -- readers' kept mappings --------------------------------------------------------------------
KEPT = 20 << 20  # above MIN_KEPT_BYTES


def written_segment(fill: int, size: int = KEPT) -> str:
    name, mapping = segments.acquire(SESSION, size)
    mapping[:size] = bytes([fill]) * size
    return name


def read_and_release(name: str, size: int = KEPT) -> int:
    """Map a delivery of ``name``, touch every page, drop it; returns its first byte."""
    view = segments.map_delivery(name, size)
    first = view[0]
    assert bytes(view[:: shm.PAGE]) == bytes([first]) * (size // shm.PAGE)
    del view
    return first


def test_kept_mappings_are_bounded_and_the_least_recently_released_goes_first(monkeypatch):
    monkeypatch.setattr(segments, "KEPT_LIMIT_BYTES", 2 * KEPT - 1)
    older, newer = written_segment(1), written_segment(2)
    read_and_release(older)
    assert segments.kept_bytes() == KEPT
    read_and_release(newer)
    assert segments.kept_bytes() == KEPT  # the older one went
    held = segments.map_delivery(newer, KEPT)
    assert segments.POOL.kept.reused == 1
    also = segments.map_delivery(older, KEPT)
    assert segments.POOL.kept.reused == 1  # mapped afresh
    assert held[0] == 2 and also[0] == 1


def test_a_kept_mapping_of_a_pooled_segment_stays_and_one_of_an_evicted_segment_goes():
    pooled, other = written_segment(1), written_segment(2)
    read_and_release(pooled)
    segments.reclaim(pooled)  # renamed <name>.free: still the same file, still worth keeping
    read_and_release(other)  # a release notices gone segments
    assert segments.kept_bytes() == 2 * KEPT
    assert shm.evict_free(pooled)  # as a process that needs the room does
    read_and_release(other)
    assert segments.kept_bytes() == KEPT
    assert segments.POOL.kept.reused == 1  # ``other``, the second time


@pytest.mark.parametrize("prune", [True, False])
def test_a_kept_mapping_is_not_used_for_a_new_file_of_the_same_name(monkeypatch, prune):
    # A name comes back when a new process gets a dead creator's pid: another file. prune()
    # drops the old mapping first; the file can also change between prune() and take()'s own
    # look at it, so take() checks the inode too (prune disabled: only that check stands
    # between us and stale data).
    name = written_segment(1)
    assert read_and_release(name) == 1
    if not prune:
        monkeypatch.setattr(segments.POOL.kept, "prune", lambda: None)
    segments.forget(name)
    remade = shm.create(name, KEPT)
    remade[:] = b"\x03" * KEPT
    remade.close()
    assert read_and_release(name) == 3
    assert segments.POOL.kept.reused == 0


def test_reset_drops_kept_mappings_and_keeps_none_mapped_before_it():
    kept, held = written_segment(1), written_segment(2)
    read_and_release(kept)
    view = segments.map_delivery(held, KEPT)
    assert segments.kept_bytes() == KEPT
    segments.reset()
    assert segments.kept_bytes() == 0
    del view
    assert segments.kept_bytes() == 0


def test_a_deleted_segment_gives_its_pages_back_though_a_reader_keeps_a_mapping(
    tiny_shm_dir, monkeypatch
):
    monkeypatch.setattr(segments, "MIN_KEPT_BYTES", 1 << 20)
    size = 4 << 20
    name = written_segment(1, size)
    read_and_release(name, size)
    assert segments.kept_bytes() == size
    free = shm.space()[1]
    # Its creator deletes a freed segment when room is short: a reader's idle mapping must not
    # keep the pages, or the next value would not fit.
    segments.forget(name)
    assert shm.space()[1] >= free + size
    assert segments.kept_bytes() == size  # noticed at the next delivery or release
    held = segments.map_delivery(written_segment(2, size), size)
    assert segments.kept_bytes() == 0 and held[0] == 2


def test_a_limit_of_zero_keeps_no_mapping(monkeypatch):
    monkeypatch.setattr(segments, "KEPT_LIMIT_BYTES", 0)
    name = written_segment(1)
    read_and_release(name)
    assert segments.kept_bytes() == 0
    read_and_release(name)
    assert segments.POOL.kept.reused == 0


def test_a_bad_mapping_limit_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("MINIRAY_SHM_KEEP_MB", "1g")
    with pytest.raises(ValueError, match=r"MINIRAY_SHM_KEEP_MB='1g'.*whole number of MiB"):
        segments._env_mib("MINIRAY_SHM_KEEP_MB", 1024)
    monkeypatch.setenv("MINIRAY_SHM_KEEP_MB", "3")
    assert segments._env_mib("MINIRAY_SHM_KEEP_MB", 1024) == 3 << 20
