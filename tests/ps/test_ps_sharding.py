"""Parameter sharding: k shard actors behind one server handle give the same results."""

from __future__ import annotations

import pytest
import torch
from ps_workers import ListWorker

import miniray
from miniray.ps import create_parameter_server
from miniray.ps.shard import assign

T = 30


def get(ref):
    return miniray.get(ref, timeout=T)


def test_assign_balances_bytes_and_keeps_order():
    shards = assign([100, 10, 60, 50, 10], 2)
    assert sorted(i for s in shards for i in s) == [0, 1, 2, 3, 4]
    loads = [sum([100, 10, 60, 50, 10][i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 10
    assert all(s == sorted(s) for s in shards)


def test_assign_rejects_bad_shard_count():
    with pytest.raises(ValueError, match=r"num_shards=0 must be an integer >= 1"):
        assign([1, 2], 0)


def model(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(64, 32, generator=g),
        torch.randn(32, generator=g),
        torch.randn(16, 16, generator=g),
        torch.tensor([seed]),
    ]


@pytest.mark.parametrize("strategy", ["diloco"])
def test_sharded_server_matches_the_unsharded_one(runtime, strategy):
    workers = [ListWorker.remote(model(i)) for i in range(2)]
    one = create_parameter_server(strategy)
    two = create_parameter_server(strategy, num_shards=2)
    for r in range(3):
        results = []
        for ps in (one, two):  # reload: each server's round pushes its result into the workers
            get([w.load.remote(model(10 * r + i)) for i, w in enumerate(workers)])
            results.append(get(ps.sync_from_workers.remote(workers)))
        assert results[0].version == results[1].version == r + 1
    wa, wb = get(one.pull_weights.remote()), get(two.pull_weights.remote())
    assert len(wa) == len(wb) == 4
    for x, y in zip(wa, wb):
        assert torch.allclose(x, y, atol=1e-6)
    assert get(two.get_stats.remote())["num_shards"] == 2


def test_sharded_push_and_checkpoint(inline_runtime, tmp_path):
    a = create_parameter_server("average", num_shards=2, server_momentum=0.9, lr=1.0)
    get(a.initialize.remote(model(0)))
    v, pulled = get(a.pull.remote())
    delta = [torch.ones_like(t) if t.is_floating_point() else t for t in pulled]
    assert get(a.push.remote(delta, v, 0)).status == "applied"
    get(a.save_checkpoint.remote(str(tmp_path)))
    b = create_parameter_server("average", num_shards=2, server_momentum=0.9, lr=1.0)
    get(b.load_checkpoint.remote(str(tmp_path)))
    for ps in (a, b):  # momentum buffers restored: the next step is identical
        get(ps.push.remote(delta, 1, 0))
    for x, y in zip(get(a.pull_weights.remote()), get(b.pull_weights.remote())):
        assert torch.equal(x, y)


def test_krum_cannot_be_sharded():
    with pytest.raises(ValueError, match="cannot run with num_shards=2"):
        create_parameter_server("krum", num_shards=2)
