"""Asynchronous push/pull with a staleness bound, gradient mode, mixed precision."""

from __future__ import annotations

import pytest
import torch
from ps_workers import ListWorker

import miniray
from miniray.ps import create_parameter_server
from miniray.ps.deltas import pseudo_gradient
from miniray.ps.staleness import admits, damping, staleness

T = 30


def get(ref):
    return miniray.get(ref, timeout=T)


# -- the admission rule as pure functions ------------------------------------------------------


def test_staleness_is_versions_since_the_pull():
    assert staleness(5, 5) == 0
    assert staleness(7, 5) == 2


@pytest.mark.parametrize("version", [6, -1, "5", True])
def test_staleness_rejects_versions_never_published(version):
    with pytest.raises(ValueError, match="version="):
        staleness(5, version)


def test_admission_rule():
    assert admits(0, 0) and not admits(1, 0)
    assert admits(3, 3) and not admits(4, 3)
    assert admits(10**6, None)


def test_damping():
    assert damping(3, enabled=False) == 1.0
    assert damping(3, enabled=True) == 0.25


def test_pseudo_gradient_sign_and_dtype():
    d = pseudo_gradient(
        [torch.tensor([1.0]), torch.tensor([3])],
        [torch.tensor([1.5]), torch.tensor([4])],
        torch.bfloat16,
    )
    assert d[0].dtype == torch.bfloat16 and d[0].item() == -0.5
    assert torch.equal(d[1], torch.tensor([4]))


# -- the server --------------------------------------------------------------------------------


def test_push_pull_with_a_bound(runtime):
    ps = create_parameter_server("average", staleness_bound=1)
    get(ps.initialize.remote([torch.zeros(3)]))
    v0, _ = get(ps.pull.remote())
    assert v0 == 0
    # Two workers start from version 0; each moved +1 (delta = pulled - current = -1).
    r1 = get(ps.push.remote([torch.full((3,), -1.0)], v0, 0))
    assert r1.status == "applied" and r1.version == 1 and r1.staleness == 0
    r2 = get(ps.push.remote([torch.full((3,), -1.0)], v0, 1))
    assert r2.status == "applied" and r2.staleness == 1 and r2.version == 2
    r3 = get(ps.push.remote([torch.full((3,), -1.0)], v0, 2))  # 2 versions old, bound 1
    assert r3.status == "rejected_stale" and not r3.accepted
    assert r3.staleness == 2 and "bound is 1" in r3.message and r3.version == 2
    v, w = get(ps.pull.remote())
    assert v == 2 and torch.equal(w[0], torch.full((3,), 2.0))
    stats = get(ps.get_stats.remote())
    assert stats["num_pushes_applied"] == 2 and stats["num_pushes_rejected_stale"] == 1


def test_bound_zero_with_k_pushes_per_version_equals_a_synchronous_round(inline_runtime):
    torch.manual_seed(0)
    start = [torch.randn(4), torch.randn(2, 2)]
    locals_ = [[t + torch.randn_like(t) for t in start] for _ in range(3)]

    sync_ps = create_parameter_server("average")
    workers = [ListWorker.remote(w) for w in locals_]
    get(sync_ps.sync_from_workers.remote(workers))
    expected = get(sync_ps.pull_weights.remote())

    ps = create_parameter_server("average", staleness_bound=0, pushes_per_version=3)
    get(ps.initialize.remote(start))
    v, pulled = get(ps.pull.remote())
    results = [get(ps.push.remote(pseudo_gradient(pulled, w), v, i)) for i, w in enumerate(locals_)]
    assert [r.status for r in results] == ["buffered", "buffered", "applied"]
    # A fourth worker still on version 0 is now stale: bound 0 admits only current updates.
    late = get(ps.push.remote(pseudo_gradient(pulled, locals_[0]), v, 3))
    assert late.status == "rejected_stale"
    version, got = get(ps.pull.remote())
    assert version == 1
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_deltas_are_accumulated_in_fp32(inline_runtime):
    ps = create_parameter_server("average", pushes_per_version=4)
    big = torch.full((8,), 1000.0)
    get(ps.initialize.remote([big]))
    v, pulled = get(ps.pull.remote())
    # Each worker moved by a tiny step that bf16 can represent on its own (1/256) but that
    # would vanish if added to 1000 in bf16 (spacing 8 there).
    current = [pulled[0] - 2**-8]
    for i in range(4):
        get(ps.push.remote(pseudo_gradient(pulled, current, torch.bfloat16), v, i))
    _, w = get(ps.pull.remote())
    assert w[0].dtype == torch.float32
    assert torch.allclose(w[0], big - 2**-8, atol=1e-6)


def test_nonfinite_push_is_rejected_and_counted(inline_runtime):
    ps = create_parameter_server("average")
    get(ps.initialize.remote([torch.zeros(2)]))
    r = get(ps.push.remote([torch.tensor([float("inf"), 0.0])], 0, 0))
    assert r.status == "rejected_nonfinite" and "parameter 0" in r.message
    assert get(ps.get_stats.remote())["num_pushes_rejected_nonfinite"] == 1
    assert get(ps.pull.remote())[0] == 0


def test_push_shape_mismatch_names_worker_and_parameter(inline_runtime):
    ps = create_parameter_server("average")
    get(ps.initialize.remote([torch.zeros(2), torch.zeros(3)]))
    with pytest.raises(ValueError, match=r"worker 4: parameter 1 has shape \(2,\)"):
        get(ps.push.remote([torch.zeros(2), torch.zeros(2)], 0, 4))


def test_push_before_initialize_is_a_clear_error(inline_runtime):
    ps = create_parameter_server("average")
    with pytest.raises(ValueError, match=r"initialize\(weights\) first"):
        get(ps.push.remote([torch.zeros(2)], 0, 0))


def test_staleness_damping_scales_stale_updates(inline_runtime):
    ps = create_parameter_server("average", staleness_damping=True)
    get(ps.initialize.remote([torch.zeros(1)]))
    get(ps.push.remote([torch.tensor([-1.0])], 0, 0))  # fresh: +1
    get(ps.push.remote([torch.tensor([-1.0])], 0, 1))  # 1 version old: +0.5
    assert get(ps.pull.remote())[1][0].item() == pytest.approx(1.5)


# -- gradient aggregation ----------------------------------------------------------------------


def test_gradient_mode_applies_the_mean_gradient_with_the_server_lr(inline_runtime):
    ps = create_parameter_server("average", mode="gradients", lr=0.5)
    w0 = [torch.tensor([1.0, 1.0])]
    workers = [
        ListWorker.remote(w0, gradients=[torch.tensor([1.0, 0.0])]),
        ListWorker.remote(w0, gradients=[torch.tensor([3.0, 2.0])]),
    ]
    result = get(ps.sync_from_workers.remote(workers))
    assert result.applied and result.version == 1
    expected = torch.tensor([1.0 - 0.5 * 2.0, 1.0 - 0.5 * 1.0])
    assert torch.allclose(get(ps.pull_weights.remote())[0], expected)
    assert torch.allclose(get(workers[1].get_weights.remote())[0], expected)
    assert get(ps.get_stats.remote())["mode"] == "gradients"


def test_gradient_mode_with_a_robust_reducer(inline_runtime):
    ps = create_parameter_server("median", mode="gradients", lr=1.0)
    get(ps.initialize.remote([torch.zeros(1)]))
    workers = [
        ListWorker.remote([torch.zeros(1)], gradients=[torch.tensor([g])]) for g in (1.0, 2.0, 1e9)
    ]
    get(ps.sync_from_workers.remote(workers))
    assert get(ps.pull_weights.remote())[0].item() == -2.0


def test_gradient_mode_needs_a_learning_rate():
    with pytest.raises(ValueError, match="needs the server learning rate lr"):
        create_parameter_server("average", mode="gradients")


def test_buffered_pushes_survive_a_checkpoint(inline_runtime, tmp_path):
    a = create_parameter_server("average", pushes_per_version=2)
    b = create_parameter_server("average", pushes_per_version=2)
    get(a.initialize.remote([torch.zeros(2)]))
    assert get(a.push.remote([torch.tensor([-1.0, -2.0])], 0, 0)).status == "buffered"
    get(a.save_checkpoint.remote(str(tmp_path)))
    get(b.load_checkpoint.remote(str(tmp_path)))
    assert get(b.get_stats.remote())["pending_pushes"] == 1
    for ps in (a, b):
        assert get(ps.push.remote([torch.tensor([-3.0, -4.0])], 0, 1)).status == "applied"
    va, wa = get(a.pull.remote())
    vb, wb = get(b.pull.remote())
    assert (
        va == vb == 1 and torch.equal(wa[0], wb[0]) and torch.equal(wa[0], torch.tensor([2.0, 3.0]))
    )
