"""Teacher server + TeacherClient: exact answers, workers, auth, bad input, timeouts, partials.

One real server (2 workers, a token, a small request limit) serves the whole module; fakes
from ``teacher_fakes`` stand in for servers that stay silent, answer late or answer half.
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import torch
import zmq
from teacher_fakes import DROP, FakeTeacher, alive, scores_for

from miniray.rl.distill import (
    TeacherClient,
    TeacherError,
    TeacherTimeoutError,
    start_teacher_server,
    wire,
)
from miniray.rl.distill.teacher_broker import Broker, _Worker
from miniray.rl.distill.teacher_worker import handle_request
from miniray.rl.models.tiny import char_tokenizer, save, tiny_qwen2

TOKEN = "s3cret-token"
MAX_REQUEST_BYTES = 64 * 1024
ALPHABET = "0123456789+="
MAX_LEN = 64  # tiny_qwen2's max_position_embeddings


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = char_tokenizer(ALPHABET)
    return save(tiny_qwen2(tokenizer, seed=3), tokenizer, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def reference(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="module")
def server(teacher_dir):
    with start_teacher_server(
        teacher_dir,
        n_server_workers=2,
        token=TOKEN,
        max_request_bytes=MAX_REQUEST_BYTES,
        ready_timeout=180,
    ) as handle:
        yield handle
    # a clean stop: exit status 0, every worker gone, the ipc directory removed
    assert handle.poll() == 0, handle.log_text()
    assert not any(alive(pid) for pid in [handle.pid, *handle.worker_pids])
    assert not os.path.exists(handle.info["ipc_dir"])


def _client(port, **kwargs):
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("request_timeout", 60.0)
    return TeacherClient(server_port=port, **kwargs)


def _random_sequences(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def _reference_logprobs(model, seq, temperature=1.0):
    """log_softmax of one sequence run alone, no padding: the ground truth."""
    logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def test_scores_match_an_in_process_forward(server, reference):
    vocab = server.vocab_size
    lengths = [1, 2, 7, 33, MAX_LEN, 15, 40]
    seqs = _random_sequences(lengths, vocab)
    with _client(server.port, num_microbatches=3) as client:
        scores = client.score(seqs, topk=5, temperature=0.7)
    assert scores.complete and scores.missing == [] and scores.errors == {}
    for seq, tok, top_lp, top_idx in zip(
        seqs, scores.token_logprobs, scores.topk_logprobs, scores.topk_indices
    ):
        ref = _reference_logprobs(reference, seq, temperature=0.7)
        assert tok.shape == (len(seq) - 1,) and tok.dtype == torch.float32
        assert top_lp.shape == top_idx.shape == (len(seq) - 1, 5)
        assert top_idx.dtype == torch.int64
        expected_tok = ref.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(tok, expected_tok, atol=1e-5, rtol=0)
        torch.testing.assert_close(top_lp, ref.topk(5, dim=-1).values, atol=1e-5, rtol=0)
        # indices checked through the values they point at: robust to ties in the order
        torch.testing.assert_close(ref.gather(-1, top_idx), top_lp, atol=1e-5, rtol=0)


def test_topk_equal_to_the_vocabulary_is_the_whole_distribution(server, reference):
    vocab = server.vocab_size
    seqs = _random_sequences([20, 9], vocab, seed=1)
    with _client(server.port) as client:
        scores = client.score(seqs, topk=vocab)
    for seq, top_lp, top_idx in zip(seqs, scores.topk_logprobs, scores.topk_indices):
        assert top_idx.shape == (len(seq) - 1, vocab)
        assert torch.equal(top_idx.sort(-1).values, torch.arange(vocab).expand_as(top_idx))
        torch.testing.assert_close(top_lp.exp().sum(-1), torch.ones(len(seq) - 1))
        full = torch.empty_like(top_lp).scatter_(-1, top_idx, top_lp)
        torch.testing.assert_close(full, _reference_logprobs(reference, seq), atol=1e-5, rtol=0)
    with _client(server.port) as client, pytest.raises(TeacherError, match="'topk'=17") as info:
        client.score(seqs, topk=vocab + 1)
    assert info.value.code == wire.BAD_REQUEST


def _raw_socket(port):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def _request(seqs, rid, *, token=TOKEN, topk=0):
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    lengths = [len(s) for s in seqs]
    return wire.encode_score_request(rid, ids, lengths, topk=topk, temperature=1.0, token=token)


def _reply(sock):
    return wire.decode_message(sock.recv_multipart(), max_bytes=1 << 30)


def test_two_workers_serve_microbatches_at_the_same_time(server):
    seqs = _random_sequences([MAX_LEN] * 16, server.vocab_size, seed=2)
    sock = _raw_socket(server.port)
    try:
        for i in range(4):  # all in flight at once: the broker hands them to both workers
            sock.send_multipart(_request(seqs, f"c-{i}", topk=4))
        replies = [_reply(sock)[0] for _ in range(4)]
    finally:
        sock.close()
    assert sorted(r["id"] for r in replies) == [f"c-{i}" for i in range(4)]
    assert {r["worker"] for r in replies} == {0, 1}
    with _client(server.port, num_microbatches=4) as client:
        assert client.score(seqs * 2, topk=4).complete


def test_requests_without_the_token_never_reach_the_model(server):
    seqs = _random_sequences([5, 6], server.vocab_size)
    with _client(server.port) as client:
        served = client.server_info()["requests_served"]
    for token, what in [(None, "no token"), ("wrong", "a wrong token")]:
        with _client(server.port, token=token) as client:
            with pytest.raises(TeacherError, match=what) as info:
                client.score(seqs)
            assert info.value.code == wire.UNAUTHORIZED
            assert not isinstance(info.value, TimeoutError)
            with pytest.raises(TeacherError, match="refused a ping"):
                client.server_info()
    with _client(server.port) as client:
        assert client.server_info()["requests_served"] == served


def _handmade(rid, lengths, dtype, payload):
    """A score request with a hand-written tensor descriptor (what our encoder refuses)."""
    header = {"v": 1, "op": "score", "id": rid, "token": TOKEN, "lengths": lengths, "topk": 0}
    header |= {"temperature": 1.0, "token_logprobs": True}
    header["tensors"] = [["input_ids", dtype, [len(payload) // 8]]]
    return [msgpack.packb(header), payload]


def test_bad_requests_get_errors_and_the_server_keeps_serving(server):
    vocab = server.vocab_size
    header = {"v": 1, "op": "score", "id": "b-0", "token": TOKEN}
    too_many = (MAX_REQUEST_BYTES // 8) + 100  # over the limit, under the transport's cut-off
    cases = [
        ([b"not msgpack \xc1"], None, wire.BAD_REQUEST, "not valid msgpack"),
        ([b"\x80\x04\x95pickle"], None, wire.BAD_REQUEST, "msgpack"),
        ([msgpack.packb({**header, "op": "launch"})], "b-0", wire.BAD_REQUEST, "unknown op"),
        (_request([[1, 2, vocab + 80]], "b-1"), "b-1", wire.BAD_REQUEST, f"token id {vocab + 80}"),
        (_request([[1, 2]], "b-2", topk=vocab + 1), "b-2", wire.BAD_REQUEST, "'topk'"),
        (_request([[1] * (MAX_LEN + 1)], "b-3"), "b-3", wire.BAD_REQUEST, "max_position"),
        (_handmade("b-4", [2], "float64", b"\0" * 16), "b-4", wire.BAD_REQUEST, "'float64'"),
        (_handmade("b-5", [0], "int64", b""), "b-5", wire.BAD_REQUEST, "empty sequence"),
        (_request([[1] * too_many], "b-6"), "b-6", wire.TOO_LARGE, "limit is 65536"),
        (_request([[1, 2]], "b-7", token=None), "b-7", wire.UNAUTHORIZED, "no token"),
    ]
    sock = _raw_socket(server.port)
    try:
        for frames, rid, code, match in cases:
            sock.send_multipart(frames)
            reply, tensors = _reply(sock)
            assert (reply["op"], reply["id"], reply["code"]) == ("error", rid, code), reply
            assert match in reply["message"]
            assert tensors == {}
    finally:
        sock.close()
    good = _random_sequences([4, 9], vocab)
    with _client(server.port, num_microbatches=2) as client:
        assert client.score(good, topk=2).complete
        # one refused microbatch: allow_partial keeps the other, errors say why
        partial = client.score([*good, [1, vocab + 5]], allow_partial=True)
        assert partial.missing == [2] and "bad_request" in partial.errors[2]
        assert partial.token_logprobs[0] is not None and partial.token_logprobs[2] is None
        with pytest.raises(TeacherError, match=r"microbatch 1 \(sequences 2-2\)") as info:
            client.score([*good, [1, vocab + 5]])
        assert info.value.code == wire.BAD_REQUEST


def _described(rid, dtype, shape, payload=b""):
    """A score request whose one tensor has a hand-written descriptor (shape and dtype)."""
    header = {"v": 1, "op": "score", "id": rid, "token": TOKEN, "lengths": [1], "topk": 0}
    header |= {"temperature": 1.0, "token_logprobs": True}
    header["tensors"] = [["input_ids", dtype, shape]]
    return [msgpack.packb(header), payload]


def test_requests_torch_cannot_build_get_errors_and_every_worker_keeps_serving(server):
    """Zero-element shapes need zero bytes whatever their other dimensions: one over int64
    made ``torch.empty`` raise TypeError, which ended the worker, and the broker then shut the
    whole server down. Every such request must be answered, by the same server, which then
    still scores."""
    cases = [
        (_described("g-0", "int64", [0, 2**63]), r"shape[1]=9223372036854775808"),
        (_described("g-1", "int64", [2**64 - 1, 0]), r"shape[0]=18446744073709551615"),
        (_described("g-2", "int64", [0, 2**15, 2**15]), "multiply to 1073741824"),
        (_described("g-3", [1], [1], b"\0" * 8), "dtype [1] is not one of"),
        (_described("g-4", {"a": 1}, [1], b"\0" * 8), "dtype {'a': 1} is not one of"),
        (_described("g-5", "int64", "1", b"\0" * 8), "must be a list of at most 4"),
    ]
    sock = _raw_socket(server.port)
    try:
        # twice over: each worker gets at least one of each (the broker alternates idle ones)
        for frames, match in cases * 2:
            sock.send_multipart(frames)
            reply, _ = _reply(sock)
            assert (reply["op"], reply["code"]) == ("error", wire.BAD_REQUEST), reply
            assert match in reply["message"], reply
        sock.send_multipart(_request([[1, 2, 3]], "g-ok", topk=2))
        reply, tensors = _reply(sock)
        assert (reply["op"], reply["id"]) == ("scores", "g-ok") and tensors[
            "topk_indices"
        ].shape == (2, 2)
    finally:
        sock.close()
    assert server.poll() is None and all(alive(pid) for pid in server.worker_pids)


class _FakeTeacher:
    """What ``handle_request`` needs of a model: its limits, and a ``score`` that raises."""

    vocab_size, max_seq_len = 16, 8

    def __init__(self, error):
        self.error = error

    def score(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error", [ValueError("no"), IndexError("index 9"), TypeError("x")])
def test_a_model_that_raises_anything_gets_an_internal_error_reply(error):
    # only RuntimeError and MemoryError were answered; anything else ended the worker
    frames = _frames(_request([[1, 2, 3]], "m-1"))
    reply = handle_request(_FakeTeacher(error), frames, max_request_bytes=1 << 20, max_topk=None)
    header, _ = wire.decode_message(_frames(reply), max_bytes=1 << 20)
    assert (header["op"], header["id"], header["code"]) == ("error", "m-1", wire.INTERNAL)
    assert type(error).__name__ in header["message"]


def test_a_gap_in_validation_is_answered_not_raised(monkeypatch):
    def parse(*args, **kwargs):
        raise TypeError("a check the validator lacks")

    monkeypatch.setattr(wire, "parse_score_request", parse)
    frames = _frames(_request([[1, 2, 3]], "m-2"))
    reply = handle_request(_FakeTeacher(None), frames, max_request_bytes=1 << 20, max_topk=None)
    header, _ = wire.decode_message(_frames(reply), max_bytes=1 << 20)
    assert (header["id"], header["code"]) == ("m-2", wire.INTERNAL)
    assert (
        "could not read the request (TypeError: a check the validator lacks)" in header["message"]
    )


def _frames(frames):
    return [bytes(f) for f in frames]


class _Sent:
    """A socket stand-in that keeps what the broker sends."""

    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, copy=True):
        self.sent.append(frames)


def _broker(tmp_path, **kwargs):
    (tmp_path / "config.json").write_text("{}")  # the broker checks only that it exists
    return Broker(str(tmp_path), **kwargs)


def test_the_brokers_queue_is_bounded_in_bytes(tmp_path):
    """150 queued requests of 8 MiB took the broker from 29 MiB to 1 GiB: a count bound alone
    (1024) allows 1024 requests of the largest size. Past the byte bound it answers busy."""
    broker = _broker(tmp_path, max_request_bytes=4096, max_queued_bytes=10_000)
    front = _Sent()
    requests = [[zmq.Frame(f) for f in _frames(_request([[1] * 400], f"q-{i}"))] for i in range(5)]
    size = sum(len(f.bytes) for f in requests[0])
    assert 3 * size <= 10_000 < 4 * size  # three fit, the fourth does not
    for request in requests[:4]:
        broker._on_request(front, b"client", request)
    assert [rid for _, rid, _, _ in broker.queue] == ["q-0", "q-1", "q-2"]
    assert broker.queued_bytes == 3 * size
    (refusal,) = front.sent
    assert refusal[0] == b"client"
    header, _ = wire.decode_message(refusal[1:], max_bytes=1 << 20)
    assert (header["op"], header["id"], header["code"]) == ("error", "q-3", wire.BUSY)
    assert f"{3 * size} bytes already queued; this request's {size}" in header["message"]
    assert "limit of 10000 (--max-queued-bytes)" in header["message"]
    # a worker taking a request makes room again
    worker = _Worker(0, process=None, ready=True)
    broker.idle.append(worker)
    backend = _Sent()
    broker._dispatch(backend)
    assert backend.sent[0][:2] == [b"w0", b"client"]
    assert broker.queued_bytes == 2 * size
    broker._on_request(front, b"client", requests[4])
    assert [rid for _, rid, _, _ in broker.queue] == ["q-1", "q-2", "q-4"]
    assert broker.queued_bytes == 3 * size and len(front.sent) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"max_queued_bytes": 4095},
            r"max_queued_bytes=4095 must be an int >= max_request_bytes \(4096\)",
        ),
        ({"max_queued_bytes": 1.5e9}, r"max_queued_bytes=1500000000.0 must be an int"),
        ({"max_queued_requests": 0}, r"max_queued_requests=0 must be an int >= 1"),
    ],
)
def test_queue_bounds_are_checked(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _broker(tmp_path, max_request_bytes=4096, **kwargs)


def test_a_bad_queue_bound_stops_the_server_at_its_start(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        TeacherError, match=r"max_queued_bytes=100 must be an int >= max_request_bytes"
    ) as info:
        start_teacher_server(
            tmp_path, max_request_bytes=4096, max_queued_bytes=100, ready_timeout=60
        )
    assert info.value.code == "start_failed"


def _forwarder(port, *, swallow):
    """A handler that swallows the first ``swallow`` requests and forwards the rest."""
    upstream = _raw_socket(port)

    def handle(index, header, tensors):
        if index < swallow:
            return []
        upstream.send_multipart(wire.encode_message(header, tensors))
        return [upstream.recv_multipart()]

    return handle, upstream


def test_a_timeout_reconnects_and_the_retry_succeeds(server, reference):
    seqs = _random_sequences([12, 30], server.vocab_size, seed=4)
    handler, upstream = _forwarder(server.port, swallow=1)
    try:
        with FakeTeacher(handler) as fake, _client(fake.port, request_timeout=1.0) as client:
            scores = client.score(seqs, topk=3)
            assert scores.complete and scores.attempts == 2 and client.reconnects == 1
            assert len(fake.requests) == 2
            assert fake.requests[0]["id"] != fake.requests[1]["id"]
        ref = _reference_logprobs(reference, seqs[1])
        expected = ref.gather(-1, torch.tensor(seqs[1][1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(scores.token_logprobs[1], expected, atol=1e-5, rtol=0)
    finally:
        upstream.close()
    # max_retries=0: the timeout raises; the same client then works (verl's REQ client would not)
    handler, upstream = _forwarder(server.port, swallow=1)
    try:
        with (
            FakeTeacher(handler) as fake,
            _client(fake.port, request_timeout=0.5, max_retries=0) as client,
        ):
            start = time.monotonic()
            with pytest.raises(TeacherTimeoutError) as info:
                client.score(seqs)
            assert time.monotonic() - start < 3.0
            assert isinstance(info.value, TimeoutError)
            assert f"127.0.0.1:{fake.port}" in str(info.value)
            assert "microbatch 0 (sequences 0-1): no reply within 0.5 s" in str(info.value)
            assert client.score(seqs).complete
    finally:
        upstream.close()


def test_late_and_foreign_replies_are_not_taken_for_answers():
    saved = {}

    def handler(index, header, tensors):
        if index == 0:  # microbatch 0, first attempt: answered only after the client gave up
            saved["late"] = header
            return []
        if index == 1:  # microbatch 1: a reply to some other id first, then its own
            return [scores_for(header, -99.0, request_id="someone-else"), scores_for(header, -1.0)]
        # microbatch 0, retried: the stale answer to the first attempt arrives first
        return [scores_for(saved["late"], -99.0), scores_for(header, -2.0)]

    seqs = [[1, 2, 3], [4, 5, 6, 7]]
    with (
        FakeTeacher(handler) as fake,
        _client(fake.port, num_microbatches=2, request_timeout=0.5) as client,
    ):
        scores = client.score(seqs)
        assert scores.complete and scores.attempts == 2
        assert scores.token_logprobs[0].tolist() == [-2.0, -2.0]
        assert scores.token_logprobs[1].tolist() == [-1.0, -1.0, -1.0]
        assert client.stale_replies == 2


def test_allow_partial_returns_what_arrived():
    def handler(index, header, tensors):  # answers the 1st and 3rd request, swallows the rest
        return [scores_for(header, -1.0)] if index % 2 == 0 else []

    seqs = [[1, 2], [1, 3], [2, 3, 4], [5, 6], [7, 8], [8, 9], [1, 1], [2, 2, 2]]
    with (
        FakeTeacher(handler) as fake,
        _client(fake.port, num_microbatches=4, request_timeout=0.5, max_retries=0) as client,
    ):
        scores = client.score(seqs, topk=2, allow_partial=True)
        assert scores.missing == [2, 3, 6, 7] and not scores.complete
        assert set(scores.errors) == {2, 3, 6, 7}
        assert "no reply within 0.5 s" in scores.errors[2]
        for i in (0, 1, 4, 5):
            assert scores.token_logprobs[i].tolist() == [-1.0] * (len(seqs[i]) - 1)
            assert scores.topk_indices[i].shape == (len(seqs[i]) - 1, 2)
        for i in (2, 3, 6, 7):
            assert scores.token_logprobs[i] is None and scores.topk_logprobs[i] is None
        with pytest.raises(TeacherTimeoutError) as info:
            client.score(seqs, topk=2)
    err = info.value
    assert err.missing_microbatches == [1, 3] and err.scores.missing == [2, 3, 6, 7]
    assert err.address == f"tcp://127.0.0.1:{fake.port}"
    assert "2 of 4 microbatches without scores" in str(err)
    assert "microbatch 3 (sequences 6-7)" in str(err)


def test_a_dropped_connection_ends_the_attempt_before_its_deadline():
    def handler(index, header, tensors):  # the first request kills the connection
        return DROP if index == 0 else [scores_for(header, -3.0)]

    with FakeTeacher(handler) as fake, _client(fake.port, request_timeout=20.0) as client:
        start = time.monotonic()
        scores = client.score([[1, 2, 3]])
        assert time.monotonic() - start < 10.0  # not the 20 s deadline
        assert scores.attempts == 2 and scores.token_logprobs[0].tolist() == [-3.0, -3.0]
        assert fake.drops == 1


def test_a_silent_server_costs_at_most_the_retries_deadlines():
    with FakeTeacher(lambda index, header, tensors: []) as fake:
        with _client(fake.port, request_timeout=0.3, max_retries=2) as client:
            start = time.monotonic()
            with pytest.raises(TeacherTimeoutError, match="3 attempt"):
                client.score([[1, 2, 3]])
            elapsed = time.monotonic() - start
            with pytest.raises(TeacherTimeoutError, match="did not answer a ping"):
                client.server_info(timeout=0.2)
        assert 0.9 <= elapsed < 3.0
        assert [r["op"] for r in fake.requests].count("score") == 3  # each attempt re-sent
        assert client.reconnects == 6


def test_submit_runs_score_in_the_background(server):
    seqs = _random_sequences([10, 11, 12], server.vocab_size)
    with _client(server.port, num_microbatches=2) as client:
        future = client.submit(seqs, topk=2)
        direct = client.score(seqs, topk=2)
        scores = future.result(timeout=60)
    for a, b in zip(scores.topk_logprobs, direct.topk_logprobs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("sequences", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "sequences is empty"),
        ([[1, 2], []], {}, ValueError, r"sequences\[1\] must be a non-empty"),
        ([[1.5, 2.0]], {}, ValueError, "must be integers"),
        ([[True, False]], {}, ValueError, "must be integers"),
        ([[1, -2]], {}, ValueError, "negative token id -2"),
        ([["a"]], {}, ValueError, r"sequences\[0\] is not a list of token ids"),
        ("abc", {}, TypeError, "sequence of token id sequences"),
        ([[1, 2]], {"topk": -1}, ValueError, "topk=-1"),
        ([[1, 2]], {"temperature": 0}, ValueError, "temperature=0"),
        ([[1, 2]], {"timeout": 0}, ValueError, "timeout=0"),
    ],
)
def test_client_checks_its_input_before_sending(sequences, kwargs, error, match):
    with TeacherClient(server_port=1) as client, pytest.raises(error, match=match):
        client.score(sequences, **kwargs)


def test_client_constructor_checks():
    for kwargs, match in [
        ({"server_port": 0}, "server_port=0"),
        ({"num_microbatches": 0}, "num_microbatches=0"),
        ({"request_timeout": float("inf")}, "request_timeout=inf"),
        ({"max_retries": -1}, "max_retries=-1"),
    ]:
        with pytest.raises(ValueError, match=match):
            TeacherClient(**kwargs)
    client = TeacherClient()
    client.close()
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.score([[1, 2]])
