"""Reuse of a process's own shared-memory segments (runtime/segments.py)."""

from __future__ import annotations

import os

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
    assert shm.list_session(SESSION) == [big]
    assert segments.acquire(SESSION, 8 << 20)[0] == big


def test_pool_evicts_the_oldest_beyond_its_limit(monkeypatch):
    monkeypatch.setattr(segments, "POOL_LIMIT_BYTES", 5 << 20)
    first, _ = segments.acquire(SESSION, 4 << 20)
    second, _ = segments.acquire(SESSION, 4 << 20)
    segments.reclaim(first)
    segments.reclaim(second)
    assert shm.list_session(SESSION) == [second]  # the older one was deleted
    assert segments.pooled_bytes() == 4 << 20


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
    """Every process pools its own segments, and one process cannot evict another's pool: in
    a small directory, a pool beyond half of it would make the next value of another process
    fail."""
    small, _ = segments.acquire(SESSION, 2 << 20)
    segments.reclaim(small)
    assert segments.pooled_bytes() == 2 << 20  # plenty of room: pooled
    live, _ = segments.acquire(SESSION, 7 << 20)
    freed, _ = segments.acquire(SESSION, 2 << 20)  # reuses the pooled one
    assert freed == small
    segments.reclaim(freed)  # 9 of 16 MiB in use: deleted, not pooled
    assert segments.pooled_bytes() == 0
    assert os.listdir(tiny_shm_dir) == [live]
