"""The local head's object table (runtime/local/objects.py): counting and freeing, no processes."""

from __future__ import annotations

import pytest

from miniray.errors import ObjectLostError
from miniray.runtime.local.objects import ObjectTable
from miniray.runtime.serialization import Serialized


def stored(text: str = "v", error: bool = False):
    return (error, Serialized(text.encode()))


@pytest.fixture
def freed():
    return []


@pytest.fixture
def table(freed):
    return ObjectTable(freed.append)


def test_driver_object_is_freed_when_its_last_ref_is_released(table, freed):
    table.new("o1", "put()", owner=None)
    value = stored()
    table.maybe_free("o1", table.store("o1", value))
    assert "o1" in table and not freed  # the driver's ref counts it
    table.queue_release("o1")
    assert "o1" in table  # counted only when drained (release may run inside the GC)
    table.drain_releases()
    assert "o1" not in table and freed == [value]


def test_an_object_is_not_freed_before_it_is_stored(table, freed):
    table.new("o1", "task f()", owner=None)
    table.queue_release("o1")
    table.drain_releases()
    assert "o1" in table and not freed
    value = stored()
    entry = table.store("o1", value)
    assert entry is not None
    table.maybe_free("o1", entry)
    assert "o1" not in table and freed == [value]


def test_storing_an_object_nobody_knows_frees_the_value(table, freed):
    value = stored()
    assert table.store("gone", value) is None
    assert freed == [value]


def test_child_refs_count_per_child(table, freed):
    table.new("o1", "put()", owner=7)
    entry = table.store("o1", stored())
    entry.holders[8] = 2
    table.release_held(7, ["o1"])
    table.release_held(9, ["o1"])  # a child that holds none changes nothing
    assert "o1" in table
    table.release_held(8, ["o1", "o1"])
    assert "o1" not in table and len(freed) == 1


def test_a_dead_child_holds_nothing_and_the_next_count_frees(table, freed):
    table.new("o1", "put()", owner=7)
    entry = table.store("o1", stored())
    entry.uses = 1
    table.forget_holder(7)
    assert "o1" in table
    table.release_uses(["o1"])
    assert "o1" not in table and len(freed) == 1


def test_pinned_object_is_never_freed(table, freed):
    table.new("o1", "put()", owner=None)
    table.store("o1", stored())
    table.pin(["o1", "unknown"])
    table.queue_release("o1")
    table.drain_releases()
    assert "o1" in table and not freed


def test_uses_of_arguments_keep_them_and_report_missing_ones(table, freed):
    table.new("ready", "put()", owner=None)
    table.store("ready", stored())
    table.new("later", "task f()", owner=None)
    assert table.take_uses(["ready", "later", "later"]) == ["later", "later"]
    for oid in ("ready", "later"):
        table.queue_release(oid)
    table.drain_releases()
    assert "ready" in table  # a pending call uses it
    table.release_uses(["ready"])
    assert "ready" not in table
    with pytest.raises(ObjectLostError, match="ObjectRef\\(nope\\)"):
        table.take_uses(["nope"])


def test_failed_returns_the_first_failed_argument(table):
    for oid, value in [("a", stored()), ("b", stored("boom", error=True)), ("c", None)]:
        table.new(oid, "put()", owner=None)
        if value is not None:
            table.store(oid, value)
    assert table.failed(["a", "c"]) is None
    assert table.failed(["a", "b", "c"])[0] is True
    assert [s is None for s in table.stored_of(["a", "c"])] == [False, True]
    assert set(table.values_of(["a", "b"])) == {"a", "b"}


def test_require_names_the_unknown_ref(table):
    table.new("o1", "put()", owner=None)
    assert len(table.require(["o1"])) == 1
    with pytest.raises(ObjectLostError, match="ObjectRef\\(o2\\) is not known"):
        table.require(["o1", "o2"])


def test_watchers_run_once_stored_each_holding_a_use(table, freed):
    entry = table.new("o1", "task f()", owner=None)
    calls = []
    table.watch("o1", entry, lambda: calls.append(1))
    table.watch("o1", entry, lambda: calls.append(2))
    assert table.take_callbacks() == []  # not stored yet
    table.store("o1", stored())
    callbacks = table.take_callbacks()
    assert len(callbacks) == 2 and entry.uses == 2 and not entry.watchers
    assert table.take_callbacks() == []  # handed out once
    table.queue_release("o1")
    table.drain_releases()
    table.release_uses(["o1"])
    assert "o1" in table  # one future still decoding
    table.release_uses(["o1"])
    assert "o1" not in table


def test_clear_returns_the_watchers_still_waiting(table):
    entry = table.new("o1", "task f()", owner=None)
    table.watch("o1", entry, print)
    assert table.clear() == [print]
    assert len(table) == 0


def test_segments_in_use_names_stored_values_segments(table):
    table.new("o1", "put()", owner=None)
    table.store("o1", (False, Serialized(b"x", "miniray_s_1_0", 64)))
    table.new("o2", "put()", owner=None)
    assert table.segments_in_use() == {"miniray_s_1_0"}
