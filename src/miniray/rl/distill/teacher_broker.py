"""The teacher server's broker: the front socket, the worker processes and the queue between
them; started by ``teacher_server`` (its command line, or ``start_teacher_server``).

Who waits for what: the broker polls both sockets with a 200 ms tick. A request is handed to a
worker only when that worker is idle (it said READY, or returned its last reply), so requests
queue in one place, here, and a long request never sits behind another on a busy worker while
a second worker idles. The tick also checks that every worker is alive: a worker that dies
makes the broker answer every request in flight or queued with a ``worker_died`` error, stop
the other workers and exit with status 3 (a teacher that lost a worker usually ran out of
memory; failing loudly beats serving at reduced capacity unnoticed). SIGTERM/SIGINT stop it
cleanly: workers terminated and reaped, the ipc directory removed.

The queue holds whole requests (up to ``max_request_bytes`` each) in the broker's memory, so it
is bounded in bytes as well as in count: ``max_queued_bytes`` (default 512 MiB) caps what a
burst of large requests can make the broker hold, where a count alone let 1024 requests of
256 MiB through. A request past either bound is answered ``busy`` at once, and never queued.

The broker never unpickles and never runs the model: it reads only the msgpack header (auth,
op, id) and forwards the frames untouched; workers validate the rest. It binds 127.0.0.1
unless told otherwise, and logs a warning when it listens beyond loopback without a token.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from miniray.rl.distill import wire

# One logger for the whole server process, named after its entry point.
log = logging.getLogger("miniray.rl.distill.teacher_server")

DEFAULT_PORT = 15555
TOKEN_ENV = "MINIRAY_TEACHER_TOKEN"
TICK_MS = 200
WORKER_DIED_EXIT = 3
PARENT_GONE_EXIT = 4
DEFAULT_MAX_QUEUED_REQUESTS = 1024
# Twice the default request limit: two requests of the largest size fit, and a burst of small
# microbatches (the usual traffic) is never refused for bytes before the count bound bites.
DEFAULT_MAX_QUEUED_BYTES = 512 << 20


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    ready: bool = False
    # (client identity, request id) of the request it is computing, None when idle
    busy_with: tuple[bytes, str | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> bytes:
        return f"w{self.index}".encode()


class Broker:
    """Owns the front socket, the worker processes and the queue between them."""

    def __init__(
        self,
        model_path: str,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        n_server_workers: int = 1,
        token: str | None = None,
        max_topk: int | None = None,
        max_request_bytes: int = wire.DEFAULT_MAX_REQUEST_BYTES,
        max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        num_threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_tokens: int | None = None,
        worker_start_timeout: float = 300.0,
        exit_with_parent: bool = False,
    ):
        if n_server_workers < 1:
            raise ValueError(f"n_server_workers={n_server_workers} must be >= 1")
        if not 0 <= port <= 65535:
            raise ValueError(f"port={port} must be in [0, 65535] (0 picks a free port)")
        if max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes={max_request_bytes} must be >= 1024")
        if type(max_queued_requests) is not int or max_queued_requests < 1:
            raise ValueError(f"max_queued_requests={max_queued_requests!r} must be an int >= 1")
        if type(max_queued_bytes) is not int or max_queued_bytes < max_request_bytes:
            # smaller, and a request this server accepts could never be queued: always "busy"
            raise ValueError(
                f"max_queued_bytes={max_queued_bytes!r} must be an int >= max_request_bytes "
                f"({max_request_bytes}), or the largest request allowed could never be queued"
            )
        if max_topk is not None and max_topk < 0:
            raise ValueError(f"max_topk={max_topk} must be >= 0")
        if token is not None and not token:
            raise ValueError("token='' would accept anyone; pass None for no token")
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            # checked here, in a second, rather than by N workers after importing transformers
            raise FileNotFoundError(
                f"model path {str(model_path)!r} has no config.json: pass a directory written "
                "by save_pretrained"
            )
        self.model_path = str(model_path)
        self.host, self.port = host, port
        self.n_server_workers = n_server_workers
        self.token = token
        self.max_topk = max_topk or None
        self.max_request_bytes = max_request_bytes
        self.max_queued_requests = max_queued_requests
        self.max_queued_bytes = max_queued_bytes
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # workers share the machine's cores: oversubscribing threads slows every one of them
        self.num_threads = num_threads or max(1, (cpus or 1) // n_server_workers)
        self.device, self.dtype = device, dtype
        self.max_batch_tokens = max_batch_tokens
        self.worker_start_timeout = worker_start_timeout
        self.exit_with_parent = exit_with_parent
        self.workers: list[_Worker] = []
        # (client identity, request id, frames, their byte count), oldest first
        self.queue: collections.deque[tuple[bytes, str, list[zmq.Frame], int]] = collections.deque()
        self.queued_bytes = 0  # the sum of the queue's byte counts
        self.idle: collections.deque[_Worker] = collections.deque()
        self.served = 0
        self.ipc_dir: str | None = None
        self._stopping = False
        self._parent = os.getppid()

    # -- lifecycle -----------------------------------------------------------------------------

    def run(self, *, ready_file: str | None = None) -> int:
        """Serve until SIGTERM/SIGINT (0), a worker death (3) or the parent's death (4)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request_stop)
        workdir = tempfile.mkdtemp(prefix="miniray-teacher-")  # 0700: only we reach the ipc
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        backend = ctx.socket(zmq.ROUTER)
        try:
            front.setsockopt(zmq.LINGER, 0)
            # Transport guard: a frame over twice the limit drops the connection before it is
            # buffered; anything smaller that is still too big gets a "too_large" reply.
            front.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_request_bytes + wire.MAX_HEADER_BYTES)
            front.bind(f"tcp://{self.host}:{self.port}")
            self.port = int(front.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
            backend.setsockopt(zmq.LINGER, 0)
            backend_address = f"ipc://{workdir}/workers"
            backend.bind(backend_address)
            self.ipc_dir = workdir
            self._spawn_workers(backend_address)
            code = self._await_workers(backend)
            if code is not None:
                return code
            self._announce(ready_file)
            return self._serve(front, backend)
        finally:
            self._stop_workers()
            front.close(linger=0)
            backend.close(linger=0)
            ctx.term()
            shutil.rmtree(workdir, ignore_errors=True)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stopping = True

    def _spawn_workers(self, backend_address: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # workers never need it
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["OMP_NUM_THREADS"] = str(self.num_threads)
        for index in range(self.n_server_workers):
            cmd = [
                sys.executable,
                "-m",
                "miniray.rl.distill.teacher_worker",
                "--model-path",
                self.model_path,
                "--backend",
                backend_address,
                "--index",
                str(index),
                "--num-threads",
                str(self.num_threads),
                "--device",
                self.device,
                "--dtype",
                self.dtype,
                "--max-request-bytes",
                str(self.max_request_bytes),
                "--broker-pid",
                str(os.getpid()),
            ]
            if self.max_topk is not None:
                cmd += ["--max-topk", str(self.max_topk)]
            if self.max_batch_tokens is not None:
                cmd += ["--max-batch-tokens", str(self.max_batch_tokens)]
            process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
            self.workers.append(_Worker(index, process))

    def _await_workers(self, backend: zmq.Socket) -> int | None:
        deadline = time.monotonic() + self.worker_start_timeout
        while not all(w.ready for w in self.workers):
            if self._stopping:
                return 0
            if backend.poll(TICK_MS):
                self._drain_backend(backend, front=None)
            dead = [w for w in self.workers if w.process.poll() is not None]
            if dead:
                log.error("teacher server: %s before it was ready", _describe_dead(dead))
                return WORKER_DIED_EXIT
            if time.monotonic() > deadline:
                waiting = [w.index for w in self.workers if not w.ready]
                log.error(
                    "teacher server: workers %s not ready after %.0f s (--worker-start-timeout)",
                    waiting,
                    self.worker_start_timeout,
                )
                return WORKER_DIED_EXIT
        return None

    def _announce(self, ready_file: str | None) -> None:
        info = {
            "host": self.host,
            "port": self.port,
            "address": f"tcp://{self.host}:{self.port}",
            "pid": os.getpid(),
            "worker_pids": [w.process.pid for w in self.workers],
            "ipc_dir": self.ipc_dir,
            **self._facts(),
        }
        if ready_file:  # written whole, then renamed: a reader never sees half a file
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.replace(tmp, ready_file)
        if self.host not in ("127.0.0.1", "localhost", "::1") and self.token is None:
            log.warning(
                "teacher server listens on %s without a token: anyone who can reach the port "
                "can use the model (pass --token or set %s)",
                self.host,
                TOKEN_ENV,
            )
        print(
            f"teacher server ready on {info['address']}: {self.n_server_workers} worker(s), "
            f"vocab {info['vocab_size']}, token {'required' if self.token else 'off'}",
            flush=True,
        )

    def _facts(self) -> dict[str, Any]:
        first = self.workers[0].info if self.workers else {}
        return {
            "vocab_size": first.get("vocab_size"),
            "max_seq_len": first.get("max_seq_len"),
            "n_server_workers": self.n_server_workers,
            "max_request_bytes": self.max_request_bytes,
            "max_queued_requests": self.max_queued_requests,
            "max_queued_bytes": self.max_queued_bytes,
            "max_topk": self.max_topk,
            "requests_served": self.served,
        }

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.process.poll() is None:
                w.process.terminate()
        deadline = time.monotonic() + 5.0
        for w in self.workers:
            try:
                w.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait(timeout=5.0)

    # -- serving -------------------------------------------------------------------------------

    def _serve(self, front: zmq.Socket, backend: zmq.Socket) -> int:
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        while not self._stopping:
            events = dict(poller.poll(TICK_MS))
            if backend in events:
                self._drain_backend(backend, front)
            if front in events:
                self._drain_front(front)
            self._dispatch(backend)
            dead = [w for w in self.workers if w.process.poll() is not None]
            if dead:
                self._fail_everything(front, dead)
                return WORKER_DIED_EXIT
            if self.exit_with_parent and os.getppid() != self._parent:
                log.error("teacher server: parent process %d died, exiting", self._parent)
                return PARENT_GONE_EXIT
        log.info("teacher server: stopping after %d answered requests", self.served)
        return 0

    def _drain_front(self, front: zmq.Socket) -> None:
        for _ in range(1000):  # bounded, so worker replies are never starved by a flood
            try:
                frames = front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_request(front, frames[0].bytes, frames[1:])

    def _on_request(self, front: zmq.Socket, client: bytes, msg: list[zmq.Frame]) -> None:
        if not msg:
            self._reply_error(front, client, None, wire.BAD_REQUEST, "empty message")
            return
        try:
            header = wire.decode_header(msg[0].buffer)
        except wire.WireError as exc:
            self._reply_error(front, client, None, exc.code, str(exc))
            return
        rid = wire.request_id_of(header)
        if self.token is not None:
            supplied = header.get("token")
            if not isinstance(supplied, str) or not hmac.compare_digest(
                supplied.encode(), self.token.encode()
            ):
                what = "no token" if supplied is None else "a wrong token"
                self._reply_error(
                    front, client, rid, wire.UNAUTHORIZED, f"the request carries {what}"
                )
                return
        nbytes = sum(f.buffer.nbytes for f in msg)
        if nbytes > self.max_request_bytes:
            self._reply_error(
                front,
                client,
                rid,
                wire.TOO_LARGE,
                f"request has {nbytes} bytes; this server's limit is {self.max_request_bytes} "
                "(--max-request-bytes): send smaller microbatches",
            )
            return
        op = header["op"]
        if op == "ping":
            front.send_multipart([client, *wire.encode_pong(rid, self._facts())])
        elif op != "score":
            self._reply_error(
                front, client, rid, wire.BAD_REQUEST, f"unknown op {op!r}; known: ping, score"
            )
        elif rid is None:
            self._reply_error(
                front, client, None, wire.BAD_REQUEST, "field 'id' must be a short string"
            )
        elif len(self.queue) >= self.max_queued_requests:
            self._reply_error(
                front,
                client,
                rid,
                wire.BUSY,
                f"{len(self.queue)} requests already queued (limit {self.max_queued_requests})",
            )
        elif self.queued_bytes + nbytes > self.max_queued_bytes:
            self._reply_error(
                front,
                client,
                rid,
                wire.BUSY,
                f"{self.queued_bytes} bytes already queued; this request's {nbytes} would pass "
                f"the limit of {self.max_queued_bytes} (--max-queued-bytes)",
            )
        else:
            self.queue.append((client, rid, msg, nbytes))
            self.queued_bytes += nbytes

    def _dispatch(self, backend: zmq.Socket) -> None:
        while self.queue and self.idle:
            worker = self.idle.popleft()
            client, rid, msg, nbytes = self.queue.popleft()
            self.queued_bytes -= nbytes
            worker.busy_with = (client, rid)
            backend.send_multipart([worker.identity, client, *msg], copy=False)

    def _drain_backend(self, backend: zmq.Socket, front: zmq.Socket | None) -> None:
        by_identity = {w.identity: w for w in self.workers}
        while True:
            try:
                identity, *rest = backend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            worker = by_identity.get(identity.bytes)
            if worker is None or not rest:
                log.warning("teacher server: ignoring a message from unknown peer %r", identity)
                continue
            # Control messages start with an empty frame: zmq never gives a client an empty
            # identity, so they cannot be confused with a reply addressed to a client.
            if rest[0].bytes == b"":
                if len(rest) == 3 and rest[1].bytes == b"READY" and not worker.ready:
                    worker.info = msgpack.unpackb(rest[2].bytes)
                    worker.ready = True
                    self.idle.append(worker)
                continue
            if front is not None:
                front.send_multipart(rest, copy=False)
            self.served += 1
            worker.busy_with = None
            self.idle.append(worker)

    def _fail_everything(self, front: zmq.Socket, dead: list[_Worker]) -> None:
        why = _describe_dead(dead) + "; the teacher server is shutting down"
        log.error("teacher server: %s", why)
        pending = [w.busy_with for w in self.workers if w.busy_with is not None]
        pending += [(client, rid) for client, rid, _, _ in self.queue]
        for client, rid in pending:
            self._reply_error(front, client, rid, wire.WORKER_DIED, why)
        self.queue.clear()
        self.queued_bytes = 0

    def _reply_error(
        self, front: zmq.Socket, client: bytes, rid: str | None, code: str, message: str
    ) -> None:
        log.info("teacher server: request %s rejected (%s): %s", rid, code, message)
        front.send_multipart([client, *wire.encode_error(rid, code, message)])


def _describe_dead(dead: list[_Worker]) -> str:
    return ", ".join(
        f"worker {w.index} (pid {w.process.pid}) exited with code {w.process.returncode}"
        for w in dead
    )
