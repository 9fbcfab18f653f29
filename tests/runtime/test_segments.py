"""Reuse of a process's own shared-memory segments (runtime/segments.py)."""

from __future__ import annotations

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
