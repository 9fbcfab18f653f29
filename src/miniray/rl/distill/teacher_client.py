"""TeacherClient: teacher log-probs for token sequences, with deadlines, reconnects, partials.

    score(sequences)
      split into num_microbatches requests --all sent at once--> one DEALER socket --tcp--> server
      wait until every reply is in or the attempt's deadline passes; replies are matched by
      request id, so a late or foreign reply is counted and dropped, never mistaken for another
      unanswered after the deadline, or the server dropped the connection:
        close the socket, open a new one (the "lazy pirate" pattern), resend only what is
        missing under new ids, at most max_retries times
      then: all answered -> TeacherScores; some missing -> raise, or with allow_partial=True
      return what arrived with ``missing``/``errors`` filled in

verl's client used REQ sockets with a 10-minute receive timeout: after one timeout a REQ socket
refuses to send again (EFSM), so the client stayed broken for the rest of the run. Here a
timeout costs one reconnect, and every wait has a deadline: ``score`` returns or raises within
``(max_retries + 1) * timeout`` seconds plus the time to encode and decode.

A client is safe to share between threads (calls are serialized); ``submit`` runs ``score`` on a
background thread and returns a future, so a trainer can overlap scoring with other work.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from miniray.rl.distill import wire
from miniray.rl.errors import TeacherError, TeacherTimeoutError
from miniray.rl.types import TeacherScores

if TYPE_CHECKING:  # torch is imported on first use: the server's broker process never needs it
    import torch

log = logging.getLogger("miniray.rl.distill.teacher_client")

__all__ = ["TeacherClient", "TeacherError", "TeacherScores", "TeacherTimeoutError"]


@dataclass
class _Failure:
    code: str
    reason: str


class TeacherClient:
    """Scores token sequences on a teacher server (``python -m ...teacher_server``)."""

    def __init__(
        self,
        server_ip: str = "127.0.0.1",
        server_port: int = 15555,
        *,
        token: str | None = None,
        num_microbatches: int = 1,
        request_timeout: float = 60.0,
        max_retries: int = 1,
        max_reply_bytes: int = wire.DEFAULT_MAX_REPLY_BYTES,
    ):
        if type(server_port) is not int or not 1 <= server_port <= 65535:
            raise ValueError(f"server_port={server_port!r} must be an int in [1, 65535]")
        if type(num_microbatches) is not int or num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches!r} must be an int >= 1")
        _check_timeout("request_timeout", request_timeout)
        if type(max_retries) is not int or max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r} must be an int >= 0")
        self.server_ip = server_ip
        self.server_port = server_port
        self.address = f"tcp://{server_ip}:{server_port}"
        self.token = token
        self.num_microbatches = num_microbatches
        self.request_timeout = float(request_timeout)
        self.max_retries = max_retries
        self.max_reply_bytes = max_reply_bytes
        self.reconnects = 0  # sockets replaced after a timeout or a dropped connection
        self.stale_replies = 0  # replies whose id matched nothing in flight (late, or foreign)
        self._prefix = secrets.token_hex(4)  # ids unique across clients and across restarts
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._ctx = zmq.Context()
        self._open()

    # -- public API ----------------------------------------------------------------------------

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        topk: int = 0,
        temperature: float = 1.0,
        timeout: float | None = None,
        allow_partial: bool = False,
    ) -> TeacherScores:
        """The teacher's log-probs of each sequence's next tokens (and its top-``topk``).

        ``timeout`` (default ``request_timeout``) is the deadline of each attempt; a missing
        microbatch is re-sent at most ``max_retries`` times. Raises ``TeacherTimeoutError`` when
        only time ran out, ``TeacherError`` when the server refused some microbatch, unless
        ``allow_partial=True``, which returns what arrived with ``missing``/``errors`` set.
        """
        import torch

        seqs = _as_id_tensors(sequences)
        if type(topk) is not int or topk < 0:
            raise ValueError(f"topk={topk!r} must be an int >= 0")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
            temperature <= 0
        ):
            raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
        timeout = self.request_timeout if timeout is None else timeout
        _check_timeout("timeout", timeout)
        bounds = _split(len(seqs), self.num_microbatches)
        payloads = [(torch.cat(seqs[a:b]), [len(s) for s in seqs[a:b]]) for a, b in bounds]
        results: dict[int, tuple[list, list, list]] = {}
        failures: dict[int, _Failure] = {}
        start = time.monotonic()
        attempts = 0
        with self._lock:
            self._check_open()
            todo = list(range(len(bounds)))
            while todo:
                attempts += 1
                self._drain_monitor()  # disconnects before this attempt are old news
                pending = {}
                for mb in todo:
                    rid = f"{self._prefix}-{next(self._ids)}"
                    ids, lengths = payloads[mb]
                    frames = wire.encode_score_request(
                        rid, ids, lengths, topk=topk, temperature=temperature, token=self.token
                    )
                    self._send(frames)
                    pending[rid] = mb
                deadline = time.monotonic() + timeout
                lost = self._collect(pending, deadline, timeout, results, failures, payloads, topk)
                todo = sorted(pending.values())
                if todo:
                    # The old socket may still receive answers to the old ids; a new socket is
                    # a new identity on the server, so those answers are dropped there.
                    self._reconnect()
                    if attempts > self.max_retries:
                        for mb in todo:
                            failures[mb] = lost
                        break
        return self._finish(
            seqs, bounds, results, failures, attempts, start, timeout, allow_partial
        )

    def submit(
        self, sequences: Sequence[Sequence[int]], **kwargs: Any
    ) -> concurrent.futures.Future:
        """``score(sequences, **kwargs)`` on a background thread; calls run one at a time."""
        with self._lock:
            self._check_open()
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="teacher-client"
                )
            return self._executor.submit(self.score, sequences, **kwargs)

    def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's facts (vocab_size, max_seq_len, n_server_workers, limits); a cheap
        readiness check that does not touch the model."""
        timeout = self.request_timeout if timeout is None else timeout
        _check_timeout("timeout", timeout)
        start = time.monotonic()
        with self._lock:
            self._check_open()
            for _ in range(self.max_retries + 1):
                self._drain_monitor()
                rid = f"{self._prefix}-{next(self._ids)}"
                self._send(wire.encode_ping(rid, token=self.token))
                deadline = time.monotonic() + timeout
                while True:
                    frames, lost = self._recv(deadline, timeout)
                    if frames is None:
                        break
                    decoded = self._decode(frames)
                    if decoded is None:
                        continue
                    reply = decoded[0]
                    if wire.request_id_of(reply) != rid:
                        self.stale_replies += 1
                        continue
                    if reply["op"] == "error":
                        raise TeacherError(
                            f"teacher server {self.address} refused a ping: "
                            f"{reply.get('code')}: {reply.get('message')}",
                            code=str(reply.get("code")),
                            address=self.address,
                        )
                    return {k: v for k, v in reply.items() if k not in ("v", "op", "id")}
                self._reconnect()
        raise TeacherTimeoutError(
            f"teacher server {self.address} did not answer a ping after "
            f"{time.monotonic() - start:.2f} s ({self.max_retries + 1} attempt(s)): {lost.reason}",
            code=lost.code,
            address=self.address,
            elapsed_s=time.monotonic() - start,
        )

    def close(self) -> None:
        """Close the socket; a running ``submit`` finishes first (it has a deadline)."""
        executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_socket()
            self._ctx.term()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TeacherClient({self.address}, num_microbatches={self.num_microbatches}, "
            f"request_timeout={self.request_timeout:g}, max_retries={self.max_retries})"
        )

    # -- socket handling -----------------------------------------------------------------------

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # The monitor reports a dropped connection: requests on it will never be answered, so
        # the attempt ends at once instead of at its deadline (a killed server is seen fast).
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self._socket = sock

    def _close_socket(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def _reconnect(self) -> None:
        self._close_socket()
        self._open()
        self.reconnects += 1

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TeacherClient({self.address}) is closed")

    def _send(self, frames: list[Any]) -> None:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # send queue full: the request stays pending and times out
            log.warning("teacher client: send queue to %s is full", self.address)

    def _drain_monitor(self) -> bool:
        """Whether the monitor reported a disconnect since the last drain."""
        disconnected = False
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            disconnected |= event["event"] == zmq.EVENT_DISCONNECTED
        return disconnected

    def _recv(self, deadline: float, timeout: float) -> tuple[list[Any] | None, _Failure]:
        """The next message, or (None, why not) at the deadline or on a dropped connection."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            try:  # a reply that arrived with the disconnect still counts
                return self._socket.recv_multipart(zmq.NOBLOCK, copy=False), _NO_FAILURE
            except zmq.Again:
                pass
            if self._drain_monitor():
                return None, _Failure(
                    "disconnected",
                    "the server closed the connection (it stopped or died, or a request "
                    "frame exceeded twice its --max-request-bytes)",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, _Failure("timeout", f"no reply within {timeout:g} s")
            poller.poll(max(1, math.ceil(remaining * 1000)))

    def _decode(self, frames: list[Any]) -> tuple[dict, dict] | None:
        try:
            return wire.decode_message([f.buffer for f in frames], max_bytes=self.max_reply_bytes)
        except wire.WireError as exc:
            log.warning(
                "teacher client: dropping an unreadable reply from %s: %s", self.address, exc
            )
            return None

    def _collect(self, pending, deadline, timeout, results, failures, payloads, topk):
        """Receive replies until ``pending`` (id -> microbatch) is empty or the attempt ends;
        returns why the attempt ended early (meaningful only if something is still pending)."""
        while pending:
            frames, lost = self._recv(deadline, timeout)
            if frames is None:
                return lost
            decoded = self._decode(frames)
            if decoded is None:
                continue
            header, tensors = decoded
            mb = pending.pop(wire.request_id_of(header), None)
            if mb is None:
                self.stale_replies += 1
                continue
            op = header.get("op")
            if op == "error":
                code = str(header.get("code"))
                failures[mb] = _Failure(code, f"{code}: {header.get('message')}")
            elif op == "scores":
                try:
                    results[mb] = wire.parse_scores_reply(
                        header, tensors, lengths=payloads[mb][1], topk=topk
                    )
                    failures.pop(mb, None)
                except wire.WireError as exc:
                    failures[mb] = _Failure("bad_reply", f"malformed reply: {exc}")
            else:
                failures[mb] = _Failure("bad_reply", f"unexpected reply op {op!r}")
        return _NO_FAILURE

    def _finish(self, seqs, bounds, results, failures, attempts, start, timeout, allow_partial):
        n = len(seqs)
        scores = TeacherScores([None] * n, [None] * n, [None] * n, attempts=attempts)
        for mb, (a, b) in enumerate(bounds):
            if mb in results:
                tok, lp, idx = results[mb]
                scores.token_logprobs[a:b] = tok
                scores.topk_logprobs[a:b] = lp
                scores.topk_indices[a:b] = idx
            else:
                failure = failures[mb]
                for i in range(a, b):
                    scores.missing.append(i)
                    scores.errors[i] = failure.reason
        scores.elapsed_s = time.monotonic() - start
        if scores.complete or allow_partial:
            return scores
        missing = sorted(mb for mb in range(len(bounds)) if mb not in results)
        details = "; ".join(
            f"microbatch {mb} (sequences {bounds[mb][0]}-{bounds[mb][1] - 1}): "
            f"{failures[mb].reason}"
            for mb in missing
        )
        message = (
            f"teacher server {self.address}: {len(missing)} of {len(bounds)} microbatches "
            f"without scores after {scores.elapsed_s:.2f} s ({attempts} attempt(s), "
            f"timeout {timeout:g} s each, max_retries={self.max_retries}): {details}"
        )
        codes = {failures[mb].code for mb in missing}
        kwargs: dict[str, Any] = dict(
            address=self.address,
            missing_microbatches=missing,
            elapsed_s=scores.elapsed_s,
            scores=scores,
        )
        if codes <= _LOST_CODES:
            raise TeacherTimeoutError(message, code=failures[missing[0]].code, **kwargs)
        code = next(c for c in (failures[mb].code for mb in missing) if c not in _LOST_CODES)
        raise TeacherError(message, code=code, **kwargs)


_NO_FAILURE = _Failure("", "")
_LOST_CODES = {"timeout", "disconnected"}  # nothing came back: time ran out, not a refusal


def _check_timeout(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number of seconds > 0")


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(n)``, sizes differing by at most one."""
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _as_id_tensors(sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    import torch

    if isinstance(sequences, torch.Tensor) and sequences.dim() == 2:
        sequences = list(sequences)
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
        raise TypeError(
            f"sequences must be a sequence of token id sequences, got {type(sequences)}"
        )
    if len(sequences) == 0:
        raise ValueError("sequences is empty: nothing to score")
    out = []
    for i, seq in enumerate(sequences):
        try:
            t = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ValueError(f"sequences[{i}] is not a list of token ids: {exc}") from exc
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"sequences[{i}] must be a non-empty 1-D list of token ids")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"sequences[{i}] has dtype {t.dtype}; token ids must be integers")
        if int(t.min()) < 0:
            raise ValueError(f"sequences[{i}] has a negative token id {int(t.min())}")
        out.append(t.to(torch.int64).reshape(-1))
    return out
