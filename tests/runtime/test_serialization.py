"""Deserializing large values (runtime/serialization.py): each delivery's views over a segment
count as one mapping of it, and a reader reads the next value its creator writes into a pooled
segment through the mapping it kept, unless it wrote into that mapping."""

from __future__ import annotations

import gc
import pickle
import time

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


def checking(ok):
    """A ``Verified`` piece as a caller writes one: copies what the runtime hands it into the
    target (when there is one) and answers ``ok`` of the stretch as a flat tensor."""

    def piece(source, dtype, target=None):
        if target is not None:
            target[:] = source
        return ok(torch.from_numpy(np.array(source)).view(dtype))

    return piece


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


@pytest.fixture
def two_copy_threads(monkeypatch):
    """Values from 1 MiB on copied by two threads, whatever this machine's cores."""
    from miniray.runtime import serialization

    monkeypatch.setattr(serialization, "COPY_THREADS", 2)
    monkeypatch.setattr(serialization, "PARALLEL_COPY_MIN", 1 << 20)
    monkeypatch.setattr(serialization, "_copier", None)
    yield serialization
    if serialization._copier is not None:
        serialization._copier.shutdown(wait=True)


def test_a_large_value_copied_by_two_threads_arrives_byte_for_byte(two_copy_threads):
    """The parts' boundaries fall inside buffers, on whole elements, and every byte is copied
    exactly once (odd sizes, mixed dtypes, a buffer split between the two threads)."""
    gen = torch.Generator().manual_seed(3)
    value = {
        "a": torch.randn(300_001, generator=gen),  # 1.2 MB, an odd number of elements
        "b": torch.randn(77_777, generator=gen).to(torch.bfloat16),
        "c": torch.randint(0, 255, (1_000_003,), dtype=torch.uint8, generator=gen),
        "d": np.arange(250_000, dtype=np.float64),
    }
    _, ser = deliver(value)
    assert len(ser.buffers) == 4 and two_copy_threads._copier is not None  # two threads ran
    back = deserialize(ser)
    for key in ("a", "b", "c"):
        assert torch.equal(back[key], value[key])
    assert np.array_equal(back["d"], value["d"])


@pytest.mark.parametrize("threads", [1, 2])
def test_a_verified_value_is_checked_by_the_pass_that_copies_it(monkeypatch, threads):
    from miniray.runtime import serialization

    monkeypatch.setattr(serialization, "COPY_THREADS", threads)
    monkeypatch.setattr(serialization, "PARALLEL_COPY_MIN", 1 << 20)
    monkeypatch.setattr(serialization, "COPY_CHUNK", 1 << 20)
    value = {
        "big": torch.arange(1_000_000, dtype=torch.float32),  # 4 MB: 4 stretches for threads
        "half": torch.ones(70_000, dtype=torch.bfloat16),
        "small": torch.full((100,), 2.0, dtype=torch.float64),  # in band: checked whole
    }
    seen: list[tuple[torch.dtype, int, float]] = []
    copied: list[bool] = []
    fulls: list[int] = []

    def piece(source, dtype, target=None):
        copied.append(target is not None)
        if target is not None:
            target[:] = source  # the piece does the copy: the runtime does not
        t = torch.from_numpy(np.array(source)).view(dtype)
        seen.append((dtype, t.numel(), float(t.double().sum())))
        return True

    name, ser = deliver(serialization.Verified(value, piece, lambda: fulls.append(1)))
    assert name is not None and len(ser.buffers) == 2 and fulls == []
    # The two large tensors through copies (the first in 1 MiB stretches when two threads
    # copy), the small one in band, checked without one.
    assert copied.count(False) == 1 and copied.count(True) == (2 if threads == 1 else 5)
    # Every element of every tensor was seen once, as its own dtype.
    for tensor in value.values():  # one dtype each
        got = [(n, s) for dtype, n, s in seen if dtype == tensor.dtype]
        assert sum(n for n, _ in got) == tensor.numel()
        assert sum(s for _, s in got) == pytest.approx(float(tensor.double().sum()))
    back = deserialize(ser)
    assert all(torch.equal(back[k], v) for k, v in value.items())


def test_a_failed_piece_asks_the_whole_check_whose_error_stops_the_value(reports):
    from miniray.runtime import serialization

    value = {"w": torch.ones(1_000_000), "bad": torch.tensor([1.0, float("nan")] * 2048)}

    def full():
        raise ValueError("'bad' holds NaN")

    with pytest.raises(serialization.Rejected) as caught:
        finite = serialization.Verified(value, checking(lambda t: t.isfinite().all()), full)
        serialize(finite, session_id=SESSION)
    assert isinstance(caught.value.cause, ValueError) and "'bad' holds NaN" in str(caught.value)
    # The segment written so far went back to this process's pool: the next value reuses it.
    assert segments.pooled_bytes() >= value["w"].nbytes
    # A false alarm: the piece check fails, the whole check finds nothing; the value stands.
    name, ser = deliver(serialization.Verified(value, checking(lambda t: False), lambda: None))
    assert name is not None
    back = deserialize(ser)
    assert torch.equal(back["w"], value["w"]) and back["bad"].isnan().sum() == 2048


@pytest.mark.parametrize("session", [SESSION, None])
def test_an_empty_tensor_of_a_verified_value_is_not_handed_to_the_check(session):
    """Nothing in it to check (a reduction of no entries, NumPy's max, would raise)."""
    from miniray.runtime.serialization import Verified

    def piece(source, dtype, target=None):
        assert source.nbytes > 0
        if target is not None:
            target[:] = source
        return True

    value = {"empty": torch.empty(0), "w": torch.ones(100_000)}
    ser = serialize(Verified(value, piece, lambda: None), session_id=session)
    back = deserialize(pickle.loads(pickle.dumps(ser)) if session else ser)
    assert back["empty"].shape == (0,) and torch.equal(back["w"], value["w"])
    del back


def test_a_verified_value_pickled_elsewhere_is_checked_whole_and_arrives_plain():
    """Ray's pickler (or a Verified inside another value) knows nothing of pieces."""
    from miniray.runtime.serialization import Verified

    value = {"w": torch.ones(10)}
    fulls = []
    back = pickle.loads(
        pickle.dumps(Verified(value, checking(lambda t: True), lambda: fulls.append(1)))
    )
    assert fulls == [1] and torch.equal(back["w"], value["w"])

    def refuse():
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        pickle.dumps(Verified(value, checking(lambda t: True), refuse))
    # Nested in another value: checked whole, through the same pickler.
    nested = Verified({"w": torch.ones(100_000)}, checking(lambda t: True), lambda: fulls.append(2))
    _, ser = deliver([nested])
    assert fulls == [1, 2] and torch.equal(deserialize(ser)[0]["w"], torch.ones(100_000))


def test_copy_threads_come_from_the_environment(monkeypatch):
    from miniray.runtime import serialization

    monkeypatch.setenv("MINIRAY_COPY_THREADS", "3")
    assert serialization._copy_threads() == 3
    monkeypatch.setenv("MINIRAY_COPY_THREADS", "two")
    with pytest.raises(ValueError, match=r"MINIRAY_COPY_THREADS='two'.*whole number"):
        serialization._copy_threads()
    monkeypatch.delenv("MINIRAY_COPY_THREADS")
    assert 1 <= serialization._copy_threads() <= 4


def test_an_answer_that_fails_its_verification_is_the_calls_error(runtime):
    import miniray

    class Publisher:
        """Answers a Verified value, as a trainer rank answers its weights."""

        def weights(self, poisoned: bool):
            from miniray.runtime.serialization import Verified

            value = {"w": torch.ones(200_000), "b": torch.zeros(10)}
            if poisoned:
                value["w"][123_456] = float("nan")

            def full():
                if not all(bool(t.isfinite().all()) for t in value.values()):
                    raise FloatingPointError("'w' holds NaN")

            def piece(source, dtype, target=None):
                if target is not None:
                    target[:] = source
                return bool(torch.from_numpy(np.array(source)).view(dtype).isfinite().all())

            return Verified(value, piece, full)

    actor = miniray.remote(Publisher).remote()
    good = miniray.get(actor.weights.remote(False), timeout=60)
    assert set(good) == {"w", "b"} and torch.equal(good["w"], torch.ones(200_000))
    with pytest.raises(FloatingPointError, match="'w' holds NaN"):
        miniray.get(actor.weights.remote(True), timeout=60)
    assert miniray.get(actor.weights.remote(False), timeout=60)["w"].sum() == 200_000


def test_an_idle_kept_mapping_is_tested_for_writes_off_the_next_deliverys_path(
    reports, monkeypatch
):
    name, ser = deliver(np.full(SIZE, 1, dtype=np.uint8))
    first = deserialize(ser)
    del first  # idle: the tester thread looks for pages written here
    kept = segments.POOL.kept._idle[name]
    wait_until(lambda: kept.unwritten is not None, "the idle mapping's write test")
    assert kept.unwritten is True
    tests = []
    real = shm.written
    monkeypatch.setattr(shm, "written", lambda *a: tests.append(1) or real(*a))
    segments.reclaim(name)
    _, ser = deliver(np.full(SIZE, 2, dtype=np.uint8))
    second = deserialize(ser)
    assert tests == [] and segments.POOL.kept.reused == 1  # the answer was ready
    assert kept.unwritten is None  # handed out again: views may write into it
    second[: 2 * shm.PAGE] = 9  # private pages: the next delivery must not read through it
    del second
    wait_until(lambda: kept.unwritten is not None, "the idle mapping's write test")
    assert kept.unwritten is False
    segments.reclaim(name)
    _, ser = deliver(np.full(SIZE, 3, dtype=np.uint8))
    third = deserialize(ser)
    assert segments.POOL.kept.reused == 1 and (third == 3).all()  # mapped afresh


def wait_until(condition, what, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_threads_take_stretches_split_on_whole_elements_and_copy_every_byte_once(
    monkeypatch, threads
):
    import threading

    from miniray.runtime import serialization

    monkeypatch.setattr(serialization, "COPY_THREADS", threads)
    monkeypatch.setattr(serialization, "PARALLEL_COPY_MIN", 0)
    monkeypatch.setattr(serialization, "COPY_CHUNK", 64 * 67)  # 4288 bytes: 1072 float32s
    monkeypatch.setattr(serialization, "_copier", None)
    # A bf16 buffer of an odd number of elements first: the float32 ones after it start 2
    # bytes off a multiple of 4 in the value's bytes (a split counted over the whole value
    # would cut an element in two).
    bf16, f32 = torch.bfloat16, torch.float32
    buffers = [(4098, bf16), (70_000, f32), (4100, f32), (131_076, f32), (10_006, bf16)]
    layout, offset = [], 0
    for size, _ in buffers:
        layout.append((offset, size))
        offset += size + 64
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 255, size, np.uint8) for size, _ in buffers]
    mapping = bytearray(offset)
    seen: list[tuple[int, torch.dtype]] = []
    copiers: set[int] = set()

    def piece(source, dtype, target):
        seen.append((source.nbytes, dtype))
        copiers.add(threading.get_ident())
        target[:] = source
        time.sleep(0.001)  # every thread gets some (the caller's alone would be quick)
        return True

    verified = serialization.Verified(None, piece, lambda: None)
    dtypes = [dtype for _, dtype in buffers]
    raws = [memoryview(source) for source in sources]
    serialization._write_buffers(np, mapping, raws, layout, (verified, dtypes))
    assert sum(n for n, _ in seen) == sum(size for size, _ in buffers)
    assert all(n % dtype.itemsize == 0 for n, dtype in seen)
    if threads > 1:  # split into stretches of at most COPY_CHUNK, taken by every thread
        assert max(n for n, _ in seen) <= 64 * 67 and len(copiers) == threads
    else:  # one thread copies whole buffers
        assert sorted(n for n, _ in seen) == sorted(size for size, _ in buffers)
    for (off, size), source in zip(layout, sources):
        assert bytes(mapping[off : off + size]) == source.tobytes()
    if serialization._copier is not None:
        serialization._copier.shutdown(wait=True)


def test_a_plain_value_is_copied_in_a_threads_share_a_checked_one_in_small_stretches():
    from miniray.runtime.serialization import COPY_CHUNK, _stretch_bytes, _stretches

    gib = 1 << 30
    assert _stretch_bytes(gib, 1, checked=False) is None  # one thread: whole buffers
    assert _stretch_bytes(gib, 2, checked=False) == gib // 2  # past the cache, one each
    assert _stretch_bytes(gib + 1, 2, checked=False) % 64 == 0  # whole elements
    assert _stretch_bytes(gib, 2, checked=True) == COPY_CHUNK  # balanced to ~2 ms
    assert _stretch_bytes(COPY_CHUNK, 4, checked=False) == COPY_CHUNK
    assert _stretches([(0, gib), (gib, 100)], gib // 2) == [
        (0, 0, gib // 2),
        (0, gib // 2, gib // 2),
        (1, 0, 100),
    ]


def test_a_forked_child_copies_with_threads_of_its_own(two_copy_threads):
    """The parent's copying threads do not exist in a forked child: it starts its own (NumPy
    only in the child: torch's OpenMP threads do not survive a fork either)."""
    import os

    value = {"w": np.arange(2_000_000, dtype=np.float32)}
    deliver(value)  # the parent's pool exists now
    assert two_copy_threads._copier is not None
    pid = os.fork()
    if pid == 0:  # the child: a large value copied on two threads, then exit at once
        code = 1
        try:
            ser = serialize(value, session_id=SESSION + "child")
            back = deserialize(pickle.loads(pickle.dumps(ser)))
            code = 0 if np.array_equal(back["w"], value["w"]) else 2
            del back
            shm.unlink_session(SESSION + "child")
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    try:
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child's copy did not finish within 30 s")
            time.sleep(0.01)
    finally:
        shm.unlink_session(SESSION + "child")
    assert os.waitstatus_to_exitcode(done[1]) == 0
