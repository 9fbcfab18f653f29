"""The teacher server under hostile input, memory pressure and a killed broker, end to end.

Each test starts its own server (real worker processes, a tiny model) and sends it raw zmq
frames, so they are slow; the in-process versions are in tests/rl/distill/ (the decoder
fuzzers in test_distill_wire.py, the broker's queue and handle_request in
test_distill_teacher.py).
"""

from __future__ import annotations

import os
import random
import signal
import time

import msgpack
import psutil
import pytest
import torch
import zmq

from miniray.rl.distill import TeacherClient, start_teacher_server, wire
from miniray.rl.models.tiny import char_tokenizer, save, tiny_qwen2

MAX_REQUEST_BYTES = 64 * 1024
REPLY_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = char_tokenizer("0123456789")
    return save(tiny_qwen2(tokenizer, seed=7), tokenizer, tmp_path_factory.mktemp("teacher"))


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a reaper may be slow to collect it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _socket(port: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def _score(rid: str, ids: torch.Tensor, lengths: list[int], *, topk: int = 0) -> list:
    return wire.encode_score_request(rid, ids, lengths, topk=topk, temperature=1.0)


# -- garbage -----------------------------------------------------------------------------------

DIMS = [0, 0, 1, 3, -1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), "2", 1.5]
DTYPES = [*wire.DTYPE_SIZES, "float64", "object", "uint8", "torch.int64", "", None, [1], {}]


def _random_value(rng: random.Random, depth: int = 0):
    """Anything msgpack carries: the wrong type for whichever field it lands in."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2**63, 2**64 - 1, -(2**63), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e308, float("nan"), float("inf"), rng.random()])
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(6)))
    if kind == 5:
        return rng.randbytes(rng.randrange(6))
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}


def _garbage(rng: random.Random, index: int) -> list[bytes]:
    """One hostile message: random bytes, a random map, or a score request with one thing
    wrong (a field's type, a dimension, a dtype, the frame count), and sometimes several."""
    kind = rng.randrange(4)
    if kind == 0:
        return [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:
        if rng.random() < 0.5:  # anything at all, often not even a map
            return [msgpack.packb(_random_value(rng))]
        fields = {f"{rng.choice(['id', 'lengths', 'topk', 'tensors', 'x'])}": _random_value(rng)}
        return [msgpack.packb({"v": 1, "op": "score", **fields})]
    shape = [rng.choice(DIMS) for _ in range(rng.randrange(5))]
    if kind == 2:  # well-formed but for the shape: a zero-element one reaches torch.empty
        shape = [0, *shape]
    header = {
        "v": 1,
        "op": "score",
        "id": f"g-{index}",
        "lengths": [1],
        "topk": 0,
        "temperature": 1.0,
        "token_logprobs": True,
        "tensors": [["input_ids", rng.choice(DTYPES), shape]],
    }
    for _ in range(rng.randrange(3) if kind == 3 else 0):
        header[rng.choice([*header, "token", "extra"])] = _random_value(rng)
    n_frames = rng.choice([1, 1, 1, 0, 2])
    return [msgpack.packb(header), *[b"" if rng.random() < 0.7 else b"\0" * 8] * n_frames]


@pytest.mark.slow
def test_garbage_never_ends_a_worker_and_a_good_request_still_succeeds(teacher_dir):
    """Hundreds of hostile messages, each answered; then the same server scores correctly.
    Before the fix, one zero-element shape with a dimension over int64 ended a worker, and the
    broker took that for an OOM kill and shut the server down."""
    rng = random.Random(21)
    server = start_teacher_server(
        teacher_dir, n_server_workers=2, max_request_bytes=MAX_REQUEST_BYTES, ready_timeout=180
    )
    sock = _socket(server.port)
    try:
        answers: dict[str, int] = {}
        for index in range(400):
            sock.send_multipart(_garbage(rng, index))  # in lockstep: one reply per message
            header, _ = wire.decode_message(sock.recv_multipart(), max_bytes=1 << 20)
            assert header["op"] in ("error", "pong"), header
            if header["op"] == "error":
                assert header["code"] in (wire.BAD_REQUEST, wire.TOO_LARGE), header
            answers[header.get("code", "pong")] = answers.get(header.get("code", "pong"), 0) + 1
        assert answers.get(wire.BAD_REQUEST, 0) > 300, answers
        assert server.poll() is None, server.log_text()
        assert all(_alive(pid) for pid in server.worker_pids), server.log_text()
        with TeacherClient(server_port=server.port, num_microbatches=2) as client:
            scores = client.score([[1, 2, 3, 4], [5, 6, 7]], topk=3)
        assert scores.complete and [t.shape for t in scores.topk_indices] == [(3, 3), (2, 3)]
        assert "Traceback" not in server.log_text()  # every rejection was a WireError
    finally:
        sock.close()
        assert server.stop() == 0, server.log_text()


# -- memory ------------------------------------------------------------------------------------


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes: transient highs count too."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_a_burst_of_large_requests_is_held_within_the_byte_bound(teacher_dir):
    """40 requests of 8 MiB at a frozen worker: the broker queues what fits in
    --max-queued-bytes (64 MiB) and answers the rest ``busy`` at once. Before the bound, all
    of them queued (the count bound is 1024) and the broker's memory grew by 320 MiB."""
    mib = 1 << 20
    server = start_teacher_server(
        teacher_dir,
        n_server_workers=1,
        max_request_bytes=16 * mib,
        max_queued_bytes=64 * mib,
        ready_timeout=180,
    )
    sock = _socket(server.port)
    frozen = False
    try:
        baseline = _peak_rss(server.pid)
        os.kill(server.worker_pids[0], signal.SIGSTOP)  # nothing leaves the queue
        frozen = True
        # one sequence longer than the model's context: once thawed, the worker refuses each
        # at once instead of scoring a million tokens
        ids = torch.zeros(mib, dtype=torch.int64)  # 8 MiB, shared by every request
        busy, held = [], []
        for i in range(40):  # one at a time, so the broker reads each before the next arrives
            sock.send_multipart(_score(f"big-{i}", ids, [mib]), copy=False)
            if sock.poll(300):
                header, _ = wire.decode_message(sock.recv_multipart(), max_bytes=1 << 20)
                assert (header["id"], header["code"]) == (f"big-{i}", wire.BUSY), header
                assert "(--max-queued-bytes)" in header["message"]
                busy.append(i)
            else:
                held.append(i)
        growth = _peak_rss(server.pid) - baseline
        # 8 held (one in flight to the worker, 7 queued): 64 MiB, plus one being read
        assert len(held) <= 9 and held == list(range(len(held))), (held, busy)
        assert growth < 64 * mib + 48 * mib, f"broker peak RSS grew by {growth / mib:.0f} MiB"
        os.kill(server.worker_pids[0], signal.SIGCONT)
        frozen = False
        for _ in held:  # every held request is answered: by the worker, which refuses it
            header, _ = wire.decode_message(sock.recv_multipart(), max_bytes=1 << 20)
            assert header["code"] == wire.BAD_REQUEST, header
            assert f"'lengths'[0]={mib} exceeds" in header["message"]
        with TeacherClient(server_port=server.port) as client:
            assert client.score([[1, 2, 3]]).complete
    finally:
        if frozen:
            os.kill(server.worker_pids[0], signal.SIGCONT)
        sock.close()
        assert server.stop() == 0, server.log_text()


# -- a killed broker ---------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_are_gone_within_a_second_and_a_half_of_a_broker_kill(teacher_dir):
    """They noticed within a second but took 6-7 s more on a loaded machine to exit: the
    interpreter's teardown of torch and transformers (about a second of CPU even when idle).
    Now they notice within 0.2 s and leave with os._exit once their socket is closed."""
    server = start_teacher_server(teacher_dir, n_server_workers=2, ready_timeout=180)
    try:
        with TeacherClient(server_port=server.port, num_microbatches=2) as client:
            assert client.score([[1, 2, 3, 4], [5, 6]], topk=2).complete  # torch threads up
        killed = time.monotonic()
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        while any(_alive(pid) for pid in server.worker_pids) and time.monotonic() < killed + 10:
            time.sleep(0.01)
        elapsed = time.monotonic() - killed
        assert not any(_alive(pid) for pid in server.worker_pids)
        assert elapsed < 1.5, f"workers took {elapsed:.2f} s to exit after the broker's kill"
        assert not os.path.exists(server.info["ipc_dir"])  # removed by a worker on its way out
        assert server.log_text().count("died, exiting") == 2
    finally:
        assert server.stop() == -signal.SIGKILL
