"""Bad input, dead and slow workers, quorum, checkpoints."""

from __future__ import annotations

import pytest
import torch
from ps_workers import ListWorker

import miniray
from miniray.ps import create_parameter_server

T = 30


def get(ref):
    return miniray.get(ref, timeout=T)


def one(v):
    return [torch.tensor([float(v)]), torch.ones(2, 2) * v]


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([torch.tensor([1.0])], r"worker 1: sent 1 tensors but worker 0 has 2"),
        (
            [torch.tensor([1.0]), torch.ones(3)],
            r"worker 1: parameter 1 has shape \(3,\) but worker 0 has \(2, 2\)",
        ),
        (
            [torch.tensor([1.0]), torch.ones(2, 2, dtype=torch.float64)],
            r"worker 1: parameter 1 has dtype torch.float64 but worker 0 has torch.float32",
        ),
    ],
)
def test_mismatched_workers_raise_naming_worker_and_parameter(inline_runtime, bad, match):
    ps = create_parameter_server("average")
    workers = [ListWorker.remote(one(1)), ListWorker.remote(bad)]
    with pytest.raises(ValueError, match=match):
        get(ps.sync_from_workers.remote(workers))


def test_mismatch_against_the_global_weights_names_them(inline_runtime):
    ps = create_parameter_server("average")
    get(ps.initialize.remote(one(0)))
    workers = [ListWorker.remote([torch.tensor([1.0]), torch.ones(5)])]
    with pytest.raises(
        ValueError, match=r"worker 0: parameter 1 has shape \(5,\) but the global weights"
    ):
        get(ps.sync_from_workers.remote(workers))


def test_get_weights_returning_a_non_list_is_a_clear_error(inline_runtime):
    ps = create_parameter_server("average")
    workers = [ListWorker.remote(one(1)), ListWorker.remote(one(2))]
    get(workers[1].load_raw.remote({"w": torch.ones(1)}))
    with pytest.raises(
        ValueError, match=r"worker 1: get_weights\(\) returned a dict; the rule is a list"
    ):
        get(ps.sync_from_workers.remote(workers))


def test_nonfinite_worker_is_left_out_and_counted(inline_runtime):
    ps = create_parameter_server("average")
    nan = one(100)
    nan[1][0, 0] = float("nan")
    workers = [ListWorker.remote(one(2)), ListWorker.remote(nan)]
    result = get(ps.sync_from_workers.remote(workers))
    assert result.applied and result.included == (0,)
    assert result.excluded == {1: "nonfinite: parameter 1"}
    assert get(ps.pull_weights.remote())[0].item() == 2.0
    assert get(ps.get_stats.remote())["num_excluded_nonfinite"] == 1
    # The NaN worker is repaired: it received the global weights too.
    assert torch.isfinite(get(workers[1].get_weights.remote())[1]).all()


@pytest.mark.parametrize("strategy", ["momentum", "median"])
def test_nonfinite_worker_never_reaches_a_stateful_or_robust_strategy(inline_runtime, strategy):
    ps = create_parameter_server(strategy)
    get(ps.initialize.remote(one(0)))
    inf = one(100)
    inf[0][0] = float("inf")
    workers = [ListWorker.remote(one(1)), ListWorker.remote(inf), ListWorker.remote(one(1))]
    result = get(ps.sync_from_workers.remote(workers))
    assert result.excluded == {1: "nonfinite: parameter 0"}
    assert all(torch.isfinite(t).all() for t in get(ps.pull_weights.remote()))
    get([w.load.remote(one(2)) for w in workers])  # momentum buffers must still be finite
    get(ps.sync_from_workers.remote(workers))
    assert all(torch.isfinite(t).all() for t in get(ps.pull_weights.remote()))


def test_nonfinite_round_below_quorum_leaves_the_weights_untouched(inline_runtime):
    ps = create_parameter_server("average", quorum=2)
    get(ps.initialize.remote(one(5)))
    nan = one(1)
    nan[0][0] = float("nan")
    result = get(ps.sync_from_workers.remote([ListWorker.remote(one(1)), ListWorker.remote(nan)]))
    assert not result.applied and result.excluded == {1: "nonfinite: parameter 0"}
    assert get(ps.pull.remote())[1][0].item() == 5.0
    # Pushes apply to the kept weights, not to the discarded NaN aggregate.
    assert get(ps.push.remote([torch.tensor([-1.0]), torch.zeros(2, 2)], 0, 0)).status == "applied"
    assert get(ps.pull.remote())[1][0].item() == 6.0


def test_bad_server_options_name_field_value_and_rule():
    with pytest.raises(ValueError, match=r"quorum=0 must be an integer >= 1"):
        create_parameter_server("average", quorum=0)
    with pytest.raises(ValueError, match=r"sync_timeout_s=-1 must be a number > 0"):
        create_parameter_server("average", sync_timeout_s=-1)
    with pytest.raises(ValueError, match=r"mode='nope' is unknown"):
        create_parameter_server("average", mode="nope")
    with pytest.raises(ValueError, match=r"staleness_bound=-1"):
        create_parameter_server("average", staleness_bound=-1)
    with pytest.raises(ValueError, match=r"lr=0 must be a finite number > 0"):
        create_parameter_server("average", lr=0)


def test_set_worker_weight_rejects_bad_values(inline_runtime):
    ps = create_parameter_server("weighted")
    with pytest.raises(ValueError, match=r"weight=-1 for worker 0 must be a finite number >= 0"):
        get(ps.set_worker_weight.remote(0, -1))
    with pytest.raises(ValueError, match=r"worker_id='a' must be an int"):
        get(ps.set_worker_weight.remote("a", 1))


# -- fault tolerance ---------------------------------------------------------------------------


def test_slow_worker_times_out_and_is_reported(inline_runtime):
    ps = create_parameter_server("average", sync_timeout_s=1.0)
    workers = [ListWorker.remote(one(2)), ListWorker.remote(one(50), delay_s=3.0)]
    get([w.times_set.remote() for w in workers])  # all started before the clock runs
    result = get(ps.sync_from_workers.remote(workers))
    assert result.applied and result.included == (0,)
    assert result.excluded == {1: "timeout"}
    assert result.duration_s < 2.9  # the deadline, not the straggler, ends the round
    assert get(ps.pull_weights.remote())[0].item() == 2.0
    stats = get(ps.get_stats.remote())
    assert stats["num_excluded_timeout"] == 1
    assert stats["last_round"]["excluded"] == {1: "timeout"}


def test_dead_worker_is_left_out_and_reported(inline_runtime):
    ps = create_parameter_server("average", sync_timeout_s=10)
    workers = [ListWorker.remote(one(1)), ListWorker.remote(one(9))]
    get([w.times_set.remote() for w in workers])
    miniray.kill(workers[1])
    result = get(ps.sync_from_workers.remote(workers))
    assert result.included == (0,)
    assert result.excluded[1].startswith("died")
    assert get(ps.pull_weights.remote())[0].item() == 1.0
    assert get(ps.get_stats.remote())["num_excluded_died"] == 1


def test_round_survives_dead_slow_and_nan_workers_across_processes(runtime):
    """The three failures at once, on every backend (the tests above detail each on inline)."""
    ps = create_parameter_server("average", sync_timeout_s=1.0)
    nan = one(100)
    nan[1][0, 0] = float("nan")
    workers = [
        ListWorker.remote(one(2)),
        ListWorker.remote(one(50), delay_s=3.0),
        ListWorker.remote(nan),
        ListWorker.remote(one(9)),
    ]
    get([w.times_set.remote() for w in workers])
    miniray.kill(workers[3])
    result = get(ps.sync_from_workers.remote(workers))
    assert result.applied and result.included == (0,)
    assert result.excluded[1] == "timeout"
    assert result.excluded[2] == "nonfinite: parameter 1"
    assert result.excluded[3].startswith("died")
    assert result.duration_s < 2.9
    assert get(ps.pull_weights.remote())[0].item() == 2.0
    stats = get(ps.get_stats.remote())
    counts = [stats[f"num_excluded_{k}"] for k in ("timeout", "nonfinite", "died")]
    assert counts == [1, 1, 1]


def test_worker_raising_is_left_out_with_its_error(inline_runtime):
    ps = create_parameter_server("average")
    workers = [ListWorker.remote(one(1)), ListWorker.remote(one(2), error="disk on fire")]
    result = get(ps.sync_from_workers.remote(workers))
    assert result.included == (0,)
    assert "disk on fire" in result.excluded[1] and result.excluded[1].startswith("error")


def test_below_quorum_the_round_is_discarded_and_weights_stay(inline_runtime):
    ps = create_parameter_server("average", quorum=2, sync_timeout_s=1.0)
    good = [ListWorker.remote(one(1)), ListWorker.remote(one(3))]
    get(ps.sync_from_workers.remote(good))
    before = get(ps.pull.remote())
    bad = [ListWorker.remote(one(7)), ListWorker.remote(one(9), error="boom")]
    result = get(ps.sync_from_workers.remote(bad))
    assert not result.applied and "quorum is 2" in result.reason
    after = get(ps.pull.remote())
    assert after[0] == before[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
    assert get(bad[0].times_set.remote()) == 0  # nothing was pushed
    assert get(ps.get_stats.remote())["num_discarded_rounds"] == 1


def test_quorum_larger_than_the_worker_list_is_refused(inline_runtime):
    ps = create_parameter_server("average", quorum=3)
    with pytest.raises(ValueError, match=r"quorum=3 but only 2 workers"):
        get(ps.sync_from_workers.remote([ListWorker.remote(one(1)), ListWorker.remote(one(2))]))


# -- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["diloco", "momentum", "weighted"])
def test_restarted_server_continues_exactly(inline_runtime, tmp_path, strategy):
    torch.manual_seed(0)
    rounds = [[[torch.randn(4), torch.tensor([i])] for i in range(3)] for _ in range(5)]
    workers = [ListWorker.remote(rounds[0][i]) for i in range(3)]

    def run(ps, rs):
        for r in rs:
            get([w.load.remote(r[i]) for i, w in enumerate(workers)])
            get(ps.sync_from_workers.remote(workers))

    a = create_parameter_server(strategy)
    get(a.set_worker_weight.remote(1, 5.0))
    run(a, rounds[:3])
    get(a.save_checkpoint.remote(str(tmp_path / "ckpt")))
    run(a, rounds[3:])

    b = create_parameter_server(strategy)
    assert get(b.load_checkpoint.remote(str(tmp_path / "ckpt"))) == 3
    run(b, rounds[3:])
    va, wa = get(a.pull.remote())
    vb, wb = get(b.pull.remote())
    assert va == vb == 5
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert get(b.get_stats.remote())["worker_weights"] == {1: 5.0}


def test_checkpoint_of_another_strategy_is_refused(inline_runtime, tmp_path):
    a = create_parameter_server("average")
    get(a.initialize.remote(one(1)))
    get(a.save_checkpoint.remote(str(tmp_path)))
    b = create_parameter_server("median")
    with pytest.raises(ValueError, match="written by strategy 'AverageStrategy'"):
        get(b.load_checkpoint.remote(str(tmp_path)))


def test_missing_checkpoint_is_a_clear_error(inline_runtime, tmp_path):
    ps = create_parameter_server("average")
    with pytest.raises(FileNotFoundError, match=r"is .* a checkpoint"):
        get(ps.load_checkpoint.remote(str(tmp_path / "nope")))
