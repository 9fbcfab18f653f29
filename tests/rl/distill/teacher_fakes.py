"""Stand-ins for a teacher server, speaking the real wire format from a thread in the test.

``FakeTeacher(handler)`` binds a ROUTER on a free loopback port; for each request the handler
gets ``(index, header, tensors)`` (index counts requests from 0) and returns a list of frame
lists to send back (possibly empty: swallow the request). A handler may return ``DROP`` instead: the fake then closes its socket (the client sees
the connection drop) and binds a fresh one on the same port. ``scores_for`` builds a valid
``scores`` reply whose token log-probs all equal ``value``, so a test can tell replies apart.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch
import zmq

from miniray.rl.distill import wire

DROP = "drop the connection"


class FakeTeacher:
    def __init__(self, handler):
        self.handler = handler
        self.requests: list[dict] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.drops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            client, *frames = self._sock.recv_multipart()
            header, tensors = wire.decode_message(frames, max_bytes=1 << 30)
            index = len(self.requests)
            self.requests.append(header)
            replies = self.handler(index, header, tensors)
            if replies == DROP:
                self._rebind()
                continue
            for reply in replies:
                self._sock.send_multipart([client, *reply])

    def _rebind(self):
        self._sock.close(linger=0)
        self.drops += 1
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        for _ in range(100):  # the old listener may take a moment to let go of the port
            try:
                self._sock.bind(f"tcp://127.0.0.1:{self.port}")
                return
            except zmq.ZMQError:
                time.sleep(0.02)
        raise RuntimeError(f"could not rebind port {self.port}")

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def scores_for(header: dict, value: float, *, request_id: str | None = None) -> list:
    """A well-formed ``scores`` reply to ``header`` with every token log-prob set to ``value``."""
    rows = sum(n - 1 for n in header["lengths"])
    k = header["topk"]
    return wire.encode_scores_reply(
        header["id"] if request_id is None else request_id,
        token_logprobs=torch.full((rows,), value),
        topk_logprobs=torch.full((rows, k), value) if k else None,
        topk_indices=torch.zeros((rows, k), dtype=torch.long) if k else None,
    )


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
