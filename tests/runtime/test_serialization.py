"""Deserializing large values (runtime/serialization.py): each delivery's views over a segment
count as one mapping of it, and a reader reads the next value its creator writes into a pooled
segment through the mapping it kept, unless it wrote into that mapping."""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest
import torch

from miniray.runtime import segments, shm
from miniray.runtime.serialization import deserialize, serialize

SESSION = "sertest"
SIZE = 32 << 20  # above segments.MIN_KEPT_BYTES: its mappings are kept


@pytest.fixture(autouse=True)
def reports():
    segments.reset()
    sent: list[tuple[str, int]] = []
    segments.set_unmapped_hook(lambda name, consumed: sent.append((name, consumed)))
    yield sent
    segments.set_unmapped_hook(None)
    segments.reset()
    shm.unlink_session(SESSION)


def deliver(value):
    """``value`` as a child receives it: written by its creator (this process), and a delivery
    of its segment unpickled from a message."""
    ser = serialize(value, session_id=SESSION)
    return ser.segment, pickle.loads(pickle.dumps(ser))


def test_a_kept_mapping_shows_the_next_value_written_into_the_pooled_segment(reports):
    name, ser = deliver(np.full(SIZE, 1, dtype=np.uint8))
    first = deserialize(ser)
    assert (first == 1).all()  # every page touched: mapped in this process
    del first
    assert reports == [(name, 1)]  # reported unmapped as before, so the creator may reuse it
    assert segments.kept_bytes() == SIZE
    segments.reclaim(name)  # the creator pools it, then writes the next value into it
    again, ser = deliver(np.full(SIZE, 2, dtype=np.uint8))
    assert again == name
    second = deserialize(ser)
    assert segments.POOL.kept.reused == 1  # read through the kept mapping
    assert (second == 2).all()  # the creator's rewrite, not the stale first value


def test_a_reader_that_wrote_into_a_tensor_maps_afresh_and_reads_the_new_value(reports):
    name, ser = deliver(torch.full((SIZE,), 1, dtype=torch.uint8))
    first = deserialize(ser)
    first[: 3 * shm.PAGE] = 7  # private copies of three pages: the segment is unchanged
    del first
    assert reports == [(name, 1)]
    segments.reclaim(name)
    again, ser = deliver(torch.full((SIZE,), 2, dtype=torch.uint8))
    assert again == name
    second = deserialize(ser)
    assert segments.POOL.kept.reused == 0
    assert bool((second == 2).all())


def test_a_live_tensor_keeps_its_segment_mapped_until_its_last_view_is_freed(reports):
    name, ser = deliver(torch.arange(SIZE // 4, dtype=torch.int32))
    tensor = deserialize(ser)
    part = tensor[10:20]
    del tensor, ser
    gc.collect()
    assert segments.local_maps(name) == 1 and reports == []
    assert part.tolist() == list(range(10, 20))
    del part
    assert segments.local_maps(name) == 0 and reports == [(name, 1)]


def test_two_deliveries_of_one_segment_are_two_mappings_reported_once_both_are_gone(reports):
    value = np.full(SIZE, 5, dtype=np.uint8)
    ser = serialize(value, session_id=SESSION)
    one = deserialize(pickle.loads(pickle.dumps(ser)))
    two = deserialize(pickle.loads(pickle.dumps(ser)))
    one[0] = 9  # a private copy in one delivery's mapping only
    assert two[0] == 5
    del one
    assert segments.local_maps(ser.segment) == 1 and reports == []
    del two
    assert reports == [(ser.segment, 2)]


def test_small_segments_are_mapped_per_delivery_and_not_kept(reports):
    name, ser = deliver(np.full(1 << 20, 1, dtype=np.uint8))
    small = deserialize(ser)
    del small
    assert reports == [(name, 1)]
    assert segments.kept_bytes() == 0


def test_a_value_of_many_mid_size_tensors_goes_out_of_band_and_a_small_one_stays_in_band():
    """The rule is the out-of-band buffers' total: a state dict of tensors each under
    ``INLINE_LIMIT`` (Qwen2.5-0.5B's k/v projections) put 11 MB into the pickle stream, which
    went through the socket with every delivery."""
    from miniray.runtime.serialization import INLINE_LIMIT, OUT_OF_BAND_MIN

    mid = {f"w{i}": torch.full((50_000,), float(i)) for i in range(8)}  # 200 KB each, 1.6 MB
    assert all(t.numel() * 4 < INLINE_LIMIT for t in mid.values())
    name, ser = deliver(mid)
    assert name is not None and len(ser.pickled) < 4096 and len(ser.buffers) == 8
    back = deserialize(ser)
    assert all(torch.equal(back[k], v) for k, v in mid.items())
    del back
    # Buffers under OUT_OF_BAND_MIN stay in band even beside large ones.
    mixed = {"big": torch.ones(100_000), "norm": torch.ones(OUT_OF_BAND_MIN // 8)}  # 2 KB
    name, ser = deliver(mixed)
    assert name is not None and len(ser.buffers) == 1
    assert torch.equal(deserialize(ser)["norm"], mixed["norm"])
    # A value whose buffers total less than INLINE_LIMIT needs no segment.
    small = {"a": torch.ones(20_000), "b": torch.arange(20_000)}  # 80 KB + 160 KB
    name, ser = deliver(small)
    assert name is None and ser.segment is None
    back = deserialize(ser)
    assert torch.equal(back["a"], small["a"]) and torch.equal(back["b"], small["b"])


def test_tensor_objects_that_are_one_view_travel_once_and_arrive_shared():
    """``state_dict()`` detaches a tied weight into a new object under each name: the bytes
    go into the segment once, and the reader's two names are one tensor again. Other views of
    the same storage, and a Parameter over the same memory, still travel as themselves."""
    weight = torch.randn(300_000)  # 1.2 MB
    state = {
        "embed": weight.detach(),
        "lm_head": weight.detach(),
        "head_rows": weight[:100_000].detach(),  # another view: its own bytes
        "param": torch.nn.Parameter(weight.detach()),  # another kind of tensor
    }
    name, ser = deliver(state)
    assert name is not None and len(ser.buffers) == 3  # not 4: the tied pair went once
    assert ser.segment_size < 2 * weight.nbytes + weight.nbytes // 3 + 3 * 4096
    back = deserialize(ser)
    assert back["embed"] is back["lm_head"]
    assert isinstance(back["param"], torch.nn.Parameter)
    for key, value in state.items():
        assert torch.equal(back[key], value.detach())
    del back
