"""A real two-node Ray cluster on this machine, driven through ``miniray.init(address=...)``.

    ray start --head --block (node A, 1 CPU)  <--  ray start --address --block (node B, 1 CPU)
          ^                                                ^
          +---- pytest driver: miniray.init(address) ------+
                parameter server on either node, one worker actor pinned to each node;
                trainer ranks, one on each node; an RL run's rollout replicas, one on each

Both nodes run as ``--block`` processes in their own process groups, so the fixture can stop
them by pid (and kill whatever they left) even when the test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import torch

import miniray

ray = pytest.importorskip("ray")

from ray_support import RAY_TEST_ENV  # noqa: E402

pytestmark = pytest.mark.slow

RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")
# tests/rl, for its rl_fakes (on sys.path already when pytest collected a test there).
RL_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rl")
T = 120  # seconds for any single wait: node start-up on 2 busy cores is slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def tree(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid} | {c.pid for c in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def mentions(port: int) -> set[int]:
    """Ray processes whose command line names our GCS port: every process of this cluster does.

    Exact port match (":4583" must not match ":45837"): on a shared machine a loose match
    would kill someone else's Ray.
    """
    pattern = re.compile(rf":{port}(?!\d)")
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ray" in cmdline and pattern.search(cmdline) and proc.pid != os.getpid():
            found.add(proc.pid)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture
def two_node_cluster(request, tmp_path):
    """Two nodes of 1 CPU each, or of ``request.param`` CPUs (indirect parametrization)."""
    if ray.is_initialized():
        pytest.fail("Ray is already initialised in this process; the cluster test needs a driver")
    # Ray puts unix sockets under --temp-dir, and their paths must stay under 108 bytes:
    # pytest's tmp_path is too deep.
    ray_tmp = tempfile.mkdtemp(prefix="mrc", dir="/tmp")
    port = free_port()
    env = {**os.environ, **RAY_TEST_ENV}
    common = [f"--num-cpus={getattr(request, 'param', 1)}", "--block", "--disable-usage-stats"]
    head_cmd = [
        RAY_CLI,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=false",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={ray_tmp}",
        *common,
    ]
    worker_cmd = [
        RAY_CLI,
        "start",
        f"--address=127.0.0.1:{port}",
        "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={free_port()}",
        *common,
    ]
    nodes: list[subprocess.Popen] = []
    started: set[int] = set()
    try:
        for name, cmd in (("head", head_cmd), ("worker", worker_cmd)):
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            nodes.append(
                subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )
            if name == "head":
                head = nodes[0]
                wait_until(
                    lambda head=head: _accepts(port) or head.poll() is not None,
                    T,
                    "the head's GCS port",
                )
                if head.poll() is not None:
                    pytest.fail(f"ray start --head failed:\n{(tmp_path / 'head.log').read_text()}")
        yield f"127.0.0.1:{port}"
    finally:
        if miniray.is_initialized():
            miniray.shutdown()
        for node in nodes:
            started |= tree(node.pid)
        started |= mentions(port)
        # SIGKILL to each node's process group: a SIGTERMed `ray start --block` first tries to
        # drain its node through the GCS for 30 s, which is pointless when all of it goes.
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        # Whatever left the process groups (Ray workers, the GCS) goes now, by pid.
        for pid in alive(started | mentions(port)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # exited between the check and the kill
                continue
        wait_until(lambda: not alive(started | mentions(port)), 30, "Ray processes to exit")
        shutil.rmtree(ray_tmp, ignore_errors=True)
        survivors = alive(started | mentions(port))
        assert not survivors, f"Ray processes survived the cluster teardown: {survivors}"


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@miniray.remote
def where_am_i():
    return ray.get_runtime_context().get_node_id()


@miniray.remote
class WeightHolder:
    """A training worker as the parameter server sees it: get_weights / set_weights."""

    def __init__(self, value):
        self.weights = [torch.full((3,), float(value)), torch.full((2, 2), float(value) * 2)]

    def get_weights(self):
        return self.weights

    def set_weights(self, weights):
        self.weights = [w.clone() for w in weights]

    def node(self):
        return ray.get_runtime_context().get_node_id()


def test_parameter_server_sync_across_two_nodes(two_node_cluster):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    miniray.init(address=two_node_cluster)
    wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, T, "both nodes to join")
    node_ids = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

    def on(node_id):
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}

    # Tasks pinned to each node report the node they ran on.
    ran_on = miniray.get([where_am_i.options(**on(n)).remote() for n in node_ids], timeout=T)
    assert ran_on == node_ids

    create_parameter_server = pytest.importorskip("miniray.ps").create_parameter_server
    server = create_parameter_server("average")
    workers = [
        WeightHolder.options(num_cpus=0, **on(n)).remote(value)
        for n, value in zip(node_ids, (1.0, 3.0))
    ]
    assert miniray.get([w.node.remote() for w in workers], timeout=T) == node_ids

    result = miniray.get(server.sync_from_workers.remote(workers), timeout=T)
    assert result.applied and result.included == (0, 1)
    expected = [torch.full((3,), 2.0), torch.full((2, 2), 4.0)]
    held_by_workers = miniray.get([w.get_weights.remote() for w in workers], timeout=T)
    for weights in [miniray.get(server.pull_weights.remote(), timeout=T), *held_by_workers]:
        assert all(torch.equal(a, b) for a, b in zip(weights, expected))
    miniray.shutdown()
    assert not ray.is_initialized()  # connected, not attached: shutdown disconnects


def test_the_rl_trainer_group_trains_with_one_rank_on_each_node(two_node_cluster, tmp_path):
    """Two trainer ranks (gloo over loopback), placed by num_cpus=1 on 1-CPU nodes: one each;
    their step equals one rank's on the whole batch."""
    from miniray.rl.models import char_tokenizer, save, tiny_qwen2
    from miniray.rl.rollouter import as_rl_config
    from miniray.rl.tasks import ArithmeticTask, write_prompts
    from miniray.rl.trainer import FullyAsyncTrainer
    from miniray.rl.trainer_group import TrainerGroup
    from miniray.rl.types import Sample

    task = ArithmeticTask(max_operand=9)
    tokenizer = char_tokenizer(task.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, tmp_path / "m")
    write_prompts(task.rows(8), tmp_path / "train.parquet")

    def cfg(nodes):
        return as_rl_config(
            {
                "data": {"train_files": [str(tmp_path / "train.parquet")], "train_batch_size": 2},
                "actor_rollout_ref": {
                    "model": {"path": str(tmp_path / "m")},
                    "actor": {"optim": {"lr": 1e-3}},
                    "nccl_timeout": T,
                },
                "trainer": {"nnodes": nodes, "n_gpus_per_node": 1 if nodes > 1 else 0},
            }
        )

    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    batch = [
        [
            Sample(
                prompt_token_ids=[tokenizer.bos_token_id, digits[g]],
                response_token_ids=[digits[(g + i) % 10]] * (1 + i % 2),
                response_logprobs=[-2.3] * (1 + i % 2),
                reward=float(i % 2),
                group_id=f"g{g}",
                v_start=0,
            )
            for i in range(4)
        ]
        for g in range(2)
    ]
    single = FullyAsyncTrainer(cfg(1))
    single.train_step(batch)

    miniray.init(address=two_node_cluster)
    wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, T, "both nodes to join")
    node_ids = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    group = TrainerGroup.start(cfg(2))
    try:
        assert sorted(group.nodes) == node_ids  # one rank on each node
        group.train_step(batch)
        weights = group.get_weights()
    finally:
        group.close()
    for name, value in single.get_weights().items():
        torch.testing.assert_close(weights[name], value, atol=1e-5, rtol=0, msg=name)
    miniray.shutdown()


# Nodes with room for both replicas and the trainer rank (num_cpus=cpu_threads: the driver's
# cores less one) on either one, so that resources do not keep the replicas apart: without
# their SPREAD strategy Ray's default policy put both on one node here (tried on 4-CPU nodes).
RL_NODE_CPUS = max(4, os.cpu_count() or 1)


@pytest.mark.parametrize("two_node_cluster", [RL_NODE_CPUS], indirect=True)
def test_an_rl_run_spreads_its_rollout_replicas_over_both_nodes_and_syncs_both(
    two_node_cluster, tmp_path
):
    """rollout.nnodes=2 x n_gpus_per_node=1: two EngineReplica actors (num_cpus=1, SPREAD) on
    nodes where either could hold both: one lands on each. A 3-step async run with a weight
    sync after every step: both replicas generate, and every sync reaches both."""
    if RL_TESTS not in sys.path:
        sys.path.insert(0, RL_TESTS)
    from rl_fakes import PacedEngines, ship_by_value_to_ray

    from miniray.rl.loop import run
    from miniray.rl.models import char_tokenizer, save, tiny_qwen2
    from miniray.rl.rollouter import as_rl_config
    from miniray.rl.tasks import ArithmeticTask, write_prompts

    task = ArithmeticTask(max_operand=9)
    tokenizer = char_tokenizer(task.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, tmp_path / "m")
    write_prompts(task.rows(64), tmp_path / "train.parquet")
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    steps = 3
    cfg = as_rl_config(
        {
            "data": {
                "train_files": [str(tmp_path / "train.parquet")],
                "train_batch_size": 2,
                "max_prompt_length": 8,
                "max_response_length": 3,
            },
            "actor_rollout_ref": {"model": {"path": str(tmp_path / "m")}, "rollout": {"n": 2}},
            "rollout": {"nnodes": 2, "n_gpus_per_node": 1, "device": "cpu"},
            "async_training": {
                "mode": "async",
                "max_queue_size": 8,
                "generation_timeout": T,
                "max_concurrent_rollouts": 2,  # one group per call: both replicas get work
            },
            "trainer": {"total_training_steps": steps, "trigger_parameter_sync_step": 1},
        }
    )

    ship_by_value_to_ray()  # the replicas build their engines with PacedEngines on either node
    miniray.init(address=two_node_cluster)
    wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, T, "both nodes to join")
    node_ids = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    result = run(cfg, engine_factory=PacedEngines(digits, [0.02, 0.02]))
    miniray.shutdown()

    assert result.summary["steps"] == steps and result.summary["rollout_replicas"] == 2
    stats = result.rollouter_stats
    replicas = stats["replicas"]
    assert sorted(r["node"] for r in replicas) == node_ids  # one replica on each node
    assert all(r["groups"] > 0 for r in replicas), replicas  # both generated
    # Every sync reached both: versions load in order, none missed, no replica restarted, and
    # each holds the last one published.
    assert stats["version"] == steps
    assert stats["replica_failures"] == 0 and stats["replica_restarts"] == 0
    for replica in replicas:
        assert replica["missed_syncs"] == 0 and replica["loaded_version"] == steps, replica
