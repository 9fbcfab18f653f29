"""The teacher server: one front port, ``n_server_workers`` processes each with a model copy.

    python -m miniray.rl.distill.teacher_server --model-path DIR [--port 15555] [--host 127.0.0.1]
        [--n-server-workers N] [--token T | env MINIRAY_TEACHER_TOKEN] [--topk K] ...

    clients (DEALER) --tcp--> front ROUTER host:port          broker (this process):
                                   |                            token check, size check, ping,
                                   |                            queue bounded in count and bytes,
                                   |                            liveness checks
                              backend ROUTER ipc://<0700 temp dir>/workers
                              /          \\
                     worker 0 DEALER ... worker N-1 DEALER       (teacher_worker.py)

The broker (the queue, the workers' liveness, the request checks) is ``teacher_broker.Broker``;
this module starts it, from the command line (``main``) or from Python:
``start_teacher_server(...)`` runs the same command as a child process and returns a
``TeacherServerHandle`` once every worker has loaded its model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from miniray.rl.distill import wire
from miniray.rl.distill.teacher_broker import (
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_PORT,
    TOKEN_ENV,
    Broker,
)
from miniray.rl.distill.teacher_client import TeacherError, TeacherTimeoutError

# ---------------------------------------------------------------------------------------------
# Starting the server from Python


class TeacherServerHandle:
    """A running teacher server child process; ``stop()`` ends it and its workers by PID."""

    def __init__(self, process: subprocess.Popen, info: dict[str, Any], launch_dir: str):
        self.process = process
        self.info = info
        self.host: str = info["host"]
        self.port: int = info["port"]
        self.pid: int = process.pid
        self.worker_pids: list[int] = list(info["worker_pids"])
        self.vocab_size: int = info["vocab_size"]
        self._launch_dir = launch_dir
        self._final_log: str | None = None

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def poll(self) -> int | None:
        """The server's exit status, or None while it runs."""
        return self.process.poll()

    def log_text(self) -> str:
        """Everything the server and its workers wrote to stdout/stderr (the tail)."""
        if self._final_log is not None:
            return self._final_log
        return _read_log(os.path.join(self._launch_dir, "server.log"))

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; then make sure no worker outlived it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10.0)
        # A broker killed with -9 cannot stop its workers; an idle one notices within 0.2 s
        # (re-parented) and exits. Give them a few seconds (one may be finishing a request),
        # then kill the stragglers by PID.
        deadline = time.monotonic() + 3.0
        for pid in self.worker_pids:
            while _is_our_worker(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_our_worker(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it exited between the check and the kill
                    pass
        if self._final_log is None:
            self._final_log = self.log_text()
        # a broker that was killed could not remove its ipc directory; it is ours to remove
        shutil.rmtree(self.info["ipc_dir"], ignore_errors=True)
        shutil.rmtree(self._launch_dir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TeacherServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.poll() is None else f"exited {self.poll()}"
        return f"TeacherServerHandle({self.address}, pid={self.pid}, {state})"


def start_teacher_server(
    model_path: str | os.PathLike,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    n_server_workers: int = 1,
    token: str | None = None,
    ready_timeout: float = 60.0,
    max_topk: int | None = None,
    max_request_bytes: int = wire.DEFAULT_MAX_REQUEST_BYTES,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    num_threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
) -> TeacherServerHandle:
    """Start the server as a child process and return once all its workers are ready.

    ``port=0`` picks a free port (``handle.port``). The token travels in the environment,
    not on the command line, where other local users could read it. A server that exits or is
    not ready within ``ready_timeout`` seconds is killed and raises with its log.
    """
    if ready_timeout <= 0:
        raise ValueError(f"ready_timeout={ready_timeout} must be > 0")
    launch_dir = tempfile.mkdtemp(prefix="miniray-teacher-launch-")
    ready_file = os.path.join(launch_dir, "ready.json")
    cmd = [
        sys.executable,
        "-m",
        "miniray.rl.distill.teacher_server",
        "--model-path",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--n-server-workers",
        str(n_server_workers),
        "--max-request-bytes",
        str(max_request_bytes),
        "--max-queued-bytes",
        str(max_queued_bytes),
        "--device",
        device,
        "--dtype",
        dtype,
        "--worker-start-timeout",
        str(ready_timeout),
        "--ready-file",
        ready_file,
        "--exit-with-parent",
        *extra_args,
    ]
    if max_topk is not None:
        cmd += ["--topk", str(max_topk)]
    if num_threads is not None:
        cmd += ["--num-threads", str(num_threads)]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    with open(os.path.join(launch_dir, "server.log"), "wb") as logfile:
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, env=env
        )
    deadline = time.monotonic() + ready_timeout
    try:
        while not os.path.exists(ready_file):
            code = process.poll()
            if code is not None:
                raise TeacherError(
                    f"teacher server for {model_path} exited with code {code} before it was "
                    f"ready; its output:\n{_read_log(os.path.join(launch_dir, 'server.log'))}",
                    code="start_failed",
                )
            if time.monotonic() > deadline:
                raise TeacherTimeoutError(
                    f"teacher server for {model_path} not ready after {ready_timeout:.0f} s "
                    f"(ready_timeout); its output:\n"
                    f"{_read_log(os.path.join(launch_dir, 'server.log'))}"
                )
            time.sleep(0.05)
        with open(ready_file) as f:
            info = json.load(f)
    except BaseException:
        _kill_launch(process)
        shutil.rmtree(launch_dir, ignore_errors=True)
        raise
    return TeacherServerHandle(process, info, launch_dir)


def _kill_launch(process: subprocess.Popen) -> None:
    # SIGTERM first: the broker then stops the workers it already started
    process.terminate()
    try:
        process.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10.0)


def _read_log(path: str, limit: int = 8000) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "(no output)"
    text = data.decode(errors="replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _is_our_worker(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) teacher worker: guards against PID reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:  # no /proc (not Linux): fall back to "exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != b"Z" and b"miniray.rl.distill.teacher_worker" in cmdline


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m miniray.rl.distill.teacher_server",
        description="Serve a causal LM's next-token log-probs (GKD teacher).",
    )
    parser.add_argument("--model-path", required=True, help="a save_pretrained directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--n-server-workers", type=int, default=1)
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"shared secret (or env {TOKEN_ENV})"
    )
    parser.add_argument(
        "--topk", "--max-topk", dest="max_topk", type=int, default=None,
        help="largest top-k a request may ask for (default: the vocabulary size)",
    )  # fmt: skip
    parser.add_argument("--max-request-bytes", type=int, default=wire.DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument(
        "--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="requests the broker holds for busy workers; more are answered 'busy'",
    )  # fmt: skip
    parser.add_argument(
        "--max-queued-bytes", type=int, default=DEFAULT_MAX_QUEUED_BYTES,
        help="bytes of requests the broker holds for busy workers (>= --max-request-bytes); "
        "a request past it is answered 'busy'",
    )  # fmt: skip
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (workers spread over GPUs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--worker-start-timeout", type=float, default=300.0)
    parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    try:
        broker = _broker_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    return broker.run(ready_file=args.ready_file)


def _broker_from_args(args: argparse.Namespace) -> Broker:
    return Broker(
        args.model_path,
        host=args.host,
        port=args.port,
        n_server_workers=args.n_server_workers,
        token=args.token,
        max_topk=args.max_topk,
        max_request_bytes=args.max_request_bytes,
        max_queued_requests=args.max_queued_requests,
        max_queued_bytes=args.max_queued_bytes,
        num_threads=args.num_threads,
        device=args.device,
        dtype=args.dtype,
        max_batch_tokens=args.max_batch_tokens,
        worker_start_timeout=args.worker_start_timeout,
        exit_with_parent=args.exit_with_parent,
    )


if __name__ == "__main__":
    sys.exit(main())
