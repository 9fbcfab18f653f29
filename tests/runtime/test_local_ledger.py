"""The head's segment ledger (runtime/local/ledger.py) and segment names (shm.parse_name):
when a freed segment goes back to its creator, without processes."""

from __future__ import annotations

import os

import pytest

from miniray.runtime import shm
from miniray.runtime.local.ledger import SegmentLedger, creator_pid
from miniray.runtime.serialization import Serialized

SESSION = "feedbeef"
CHILD_PID = 4242


class Fakes:
    def __init__(self):
        self.maps: dict[str, int] = {}
        self.sent: list[tuple[int, str]] = []
        self.reclaimed_here: list[str] = []
        self.wakes = 0
        self.child_alive = True

    def ledger(self) -> SegmentLedger:
        return SegmentLedger(
            self.send_reclaim,
            self.wake,
            local_maps=lambda name: self.maps.get(name, 0),
            reclaim_here=self.reclaimed_here.append,
        )

    def send_reclaim(self, pid, name):
        self.sent.append((pid, name))
        return self.child_alive

    def wake(self):
        self.wakes += 1


@pytest.fixture
def fakes():
    return Fakes()


def segment(pid: int = CHILD_PID, serial: int = 0) -> Serialized:
    return Serialized(b"x", str(shm.SegmentName(SESSION, pid, serial)), 64)


def test_segment_names_parse_back_with_or_without_a_pool_suffix():
    name = shm.new_name(SESSION)
    assert shm.parse_name(name) == (SESSION, os.getpid(), shm.parse_name(name).serial)
    assert str(shm.parse_name(name)) == name
    assert shm.parse_name(name + shm.FREE_SUFFIX) == shm.parse_name(name)
    assert shm.parse_name(name + shm.EVICTING_SUFFIX) == shm.parse_name(name)
    for other in ("other_x_1_2", "miniray_x_1", "miniray_x_y_2", "miniray_x_1_2.tmp"):
        assert shm.parse_name(other) is None
        assert creator_pid(other) == -1


def test_unmapped_freed_segment_goes_back_to_its_creator_at_once(fakes):
    ledger = fakes.ledger()
    ser = segment()
    ledger.free(ser)
    assert fakes.sent == [(CHILD_PID, ser.segment)] and not ledger.orphans


def test_segment_of_this_process_is_reclaimed_here(fakes):
    ledger = fakes.ledger()
    ser = segment(pid=os.getpid())
    ledger.free(ser)
    assert fakes.reclaimed_here == [ser.segment] and not fakes.sent


def test_delivered_segment_waits_for_every_child_to_report_it(fakes):
    ledger = fakes.ledger()
    ser = segment()
    ledger.deliver(1, ser, (False, ser), None)  # one object twice in a message: counted once
    ledger.deliver(2, (False, ser))
    assert ledger.outstanding(ser.segment) == {1: 1, 2: 1}
    ledger.free(ser)
    assert ledger.orphans == {ser.segment} and not fakes.sent
    ledger.on_unmapped(1, [(ser.segment, 1)])
    assert not fakes.sent  # child 2 may still read it
    ledger.on_unmapped(2, [(ser.segment, 1)])
    assert fakes.sent == [(CHILD_PID, ser.segment)] and not ledger.orphans


def test_a_delivery_still_in_flight_keeps_the_segment(fakes):
    ledger = fakes.ledger()
    ser = segment()
    ledger.deliver(1, ser)
    ledger.deliver(1, ser)  # a second message
    ledger.free(ser)
    ledger.on_unmapped(1, [(ser.segment, 1)])  # the child had consumed only the first
    assert not fakes.sent
    ledger.on_unmapped(1, [(ser.segment, 1)])
    assert fakes.sent == [(CHILD_PID, ser.segment)]


def test_a_view_in_this_process_keeps_the_segment_until_its_unmap_is_drained(fakes):
    ledger = fakes.ledger()
    ser = segment()
    fakes.maps[ser.segment] = 1
    ledger.free(ser)
    assert ledger.orphans == {ser.segment}
    del fakes.maps[ser.segment]
    ledger.on_local_unmap(ser.segment, 1)  # from the GC: only queued, the router woken
    assert fakes.wakes == 1 and not fakes.sent
    ledger.drain_local_unmaps()
    assert fakes.sent == [(CHILD_PID, ser.segment)]


def test_a_dead_childs_deliveries_no_longer_hold_a_segment(fakes):
    ledger = fakes.ledger()
    ser = segment()
    ledger.deliver(1, ser)
    ledger.free(ser)
    ledger.forget_child(1)
    assert fakes.sent == [(CHILD_PID, ser.segment)]


def test_segment_whose_creator_is_gone_is_unlinked(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv(shm.ENV_SHM_DIR, str(tmp_path))
    ledger = fakes.ledger()
    fakes.child_alive = False
    ser = segment()
    (tmp_path / ser.segment).write_bytes(b"x")
    kept = os.open(tmp_path / ser.segment, os.O_RDONLY)  # as a reader's kept mapping holds it
    try:
        ledger.free(ser)
        assert not (tmp_path / ser.segment).exists()
        assert os.fstat(kept).st_size == 0  # emptied first: its pages are given back now
    finally:
        os.close(kept)


def test_sweep_removes_only_the_dead_creators_unused_segments(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv(shm.ENV_SHM_DIR, str(tmp_path))
    ledger = fakes.ledger()
    used, unused, pooled = (segment(serial=i).segment for i in range(3))
    others = segment(pid=CHILD_PID + 1).segment
    orphan = segment(serial=9)
    fakes.maps[orphan.segment] = 1  # mapped here: stays an orphan
    ledger.free(orphan)
    for name in (used, unused, pooled + shm.FREE_SUFFIX, others, orphan.segment):
        (tmp_path / name).write_bytes(b"x")
    kept = os.open(tmp_path / unused, os.O_RDONLY)  # as a reader's kept mapping holds it
    try:
        ledger.sweep_created_by(CHILD_PID, SESSION, {used})
        assert os.fstat(kept).st_size == 0  # emptied first: its pages are given back now
    finally:
        os.close(kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([used, others, orphan.segment])
