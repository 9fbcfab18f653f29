"""Teacher server failures: a dead worker, a killed broker, a model path that is not a model.

Each test starts (and kills) its own server, so these are the slow ones of the package.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from teacher_fakes import alive

from miniray.rl.distill import (
    TeacherClient,
    TeacherError,
    TeacherTimeoutError,
    start_teacher_server,
)
from miniray.rl.models.tiny import char_tokenizer, save, tiny_qwen2


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = char_tokenizer("0123456789")
    return save(tiny_qwen2(tokenizer, seed=5), tokenizer, tmp_path_factory.mktemp("teacher"))


def _wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_dead_worker_stops_the_server_loudly(teacher_dir):
    with (
        start_teacher_server(teacher_dir, n_server_workers=2, ready_timeout=180) as server,
        TeacherClient(server_port=server.port, request_timeout=5.0) as client,
    ):
        assert client.score([[1, 2, 3]]).complete
        for pid in server.worker_pids:  # frozen: the next request stays in flight
            os.kill(pid, signal.SIGSTOP)
        in_flight = client.submit([[1, 2, 3]], timeout=30.0)
        time.sleep(0.5)
        os.kill(server.worker_pids[0], signal.SIGKILL)  # as the OOM killer would
        with pytest.raises(TeacherError, match=r"worker 0 .* exited with code -9") as info:
            in_flight.result(timeout=30)
        assert info.value.code == "worker_died"
        os.kill(server.worker_pids[1], signal.SIGCONT)
        _wait_until(lambda: server.poll() is not None, 10, "exited")
        assert server.poll() == 3
        assert "worker 0" in server.log_text() and "exited with code -9" in server.log_text()
        assert not alive(server.worker_pids[1])  # the survivor was stopped, not orphaned
        assert not os.path.exists(server.info["ipc_dir"])
        start = time.monotonic()
        with pytest.raises(TeacherTimeoutError, match=re.escape(server.address)):
            client.score([[1, 2, 3]], timeout=1.0)
        assert time.monotonic() - start < 2 * 1.0 + 1.0  # (max_retries + 1) deadlines


@pytest.mark.slow
def test_a_killed_server_makes_the_client_raise_in_time_and_leaves_no_orphans(teacher_dir):
    server = start_teacher_server(teacher_dir, n_server_workers=1, ready_timeout=180)
    try:
        with TeacherClient(server_port=server.port, request_timeout=2.0, max_retries=1) as client:
            assert client.score([[1, 2, 3, 4]], topk=3).complete
            os.kill(server.pid, signal.SIGKILL)  # no chance to stop its worker
            server.process.wait(timeout=10)
            # the orphaned worker notices its parent is gone and exits on its own
            _wait_until(lambda: not alive(server.worker_pids[0]), 10, "worker gone")
            assert not os.path.exists(server.info["ipc_dir"])  # and removed the ipc directory
            start = time.monotonic()
            with pytest.raises(TeacherTimeoutError) as info:
                client.score([[1, 2, 3, 4]])
            assert time.monotonic() - start < 2 * 2.0 + 1.0
            assert info.value.address == server.address
            assert info.value.missing_microbatches == [0]
    finally:
        assert server.stop() == -signal.SIGKILL


def test_a_model_path_without_a_model_fails_fast_with_the_servers_output(tmp_path):
    start = time.monotonic()
    with pytest.raises(TeacherError, match=r"has no config\.json") as info:
        start_teacher_server(tmp_path, ready_timeout=60)
    assert info.value.code == "start_failed"
    assert "exited with code 2" in str(info.value)
    assert time.monotonic() - start < 30
