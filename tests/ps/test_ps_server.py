"""The parameter server as the seed shows it, on every backend (``runtime`` fixture)."""

from __future__ import annotations

import pytest
import torch
from ps_workers import ListWorker, TrainingWorker

import miniray
from miniray.ps import STRATEGIES, SyncStrategy, create_parameter_server

T = 30  # seconds; generous, every wait in these tests is bounded


def get(ref):
    return miniray.get(ref, timeout=T)


def test_seed_complete_example_runs_and_synchronizes(runtime):
    ps = create_parameter_server("average")
    workers = [TrainingWorker.remote(i) for i in range(4)]
    last = None
    for epoch in range(10):
        get([w.train_step.remote() for w in workers])
        if (epoch + 1) % 3 == 0:
            last = ps.sync_from_workers.remote(workers)
            print(f"Epoch {epoch + 1}: synced")
    result = get(last)
    assert result.applied and result.version == 3 and result.included == (0, 1, 2, 3)
    stats = get(ps.get_stats.remote())
    assert stats["version"] == 3 and stats["num_syncs"] == 3
    assert stats["strategy"] == "AverageStrategy" and stats["initialized"] is True
    # Nothing waited for the sync of epoch 9 before epoch 10's steps, so whether a worker
    # stepped before its weights were gathered or after they were pushed is a race (it failed
    # once on inline in a full run). A sync that is waited for shows the push: after it every
    # worker holds the global weights.
    assert get(ps.sync_from_workers.remote(workers)).version == 4
    global_w = get(ps.pull_weights.remote())
    for w in get([w.get_weights.remote() for w in workers]):
        for a, b in zip(w, global_w):
            assert torch.equal(a, b)


def test_sync_averages_and_pushes_to_every_worker(inline_runtime):
    ps = create_parameter_server("average")
    workers = [ListWorker.remote([torch.full((3,), float(i)), torch.tensor([i])]) for i in (1, 2)]
    result = get(ps.sync_from_workers.remote(workers))
    assert set(result.timings) == {"gather", "validate", "aggregate", "push"}
    # 2 workers x (12 + 8) bytes in; the aggregate (20 bytes) is shipped once, not per worker.
    assert result.bytes_in == 40 and result.bytes_out == 20
    weights = get(ps.pull_weights.remote())
    assert torch.equal(weights[0], torch.full((3,), 1.5))
    assert torch.equal(weights[1], torch.tensor([1]))  # integer: first worker's, not averaged
    assert get([w.times_set.remote() for w in workers]) == [1, 1]
    assert all(
        torch.equal(w[0], weights[0]) for w in get([w.get_weights.remote() for w in workers])
    )


def test_weighted_strategy_with_set_worker_weight(inline_runtime):
    ps = create_parameter_server("weighted")
    get(ps.set_worker_weight.remote(0, 1000))
    get(ps.set_worker_weight.remote(1, 3000))
    workers = [ListWorker.remote([torch.tensor([0.0])]), ListWorker.remote([torch.tensor([4.0])])]
    get(ps.sync_from_workers.remote(workers))
    assert get(ps.pull_weights.remote())[0].item() == pytest.approx(3.0)
    assert get(ps.get_stats.remote())["worker_weights"] == {0: 1000.0, 1: 3000.0}


def test_momentum_strategy_is_an_ema_of_the_global_weights(inline_runtime):
    ps = create_parameter_server("momentum", momentum=0.9)
    workers = [ListWorker.remote([torch.tensor([0.0])]) for _ in range(2)]
    get(ps.sync_from_workers.remote(workers))  # first round adopts the mean: 0
    get([w.load.remote([torch.tensor([10.0])]) for w in workers])
    get(ps.sync_from_workers.remote(workers))
    assert get(ps.pull_weights.remote())[0].item() == pytest.approx(1.0)  # 0.9*0 + 0.1*10
    assert get(ps.get_stats.remote())["strategy"] == "MomentumStrategy"


class SeedMedianStrategy(SyncStrategy):
    """The seed's custom-strategy example, verbatim (lower median for even counts)."""

    def aggregate(self, weight_lists):
        import torch

        num_params = len(weight_lists[0])
        aggregated = []

        for p_idx in range(num_params):
            tensors = [w[p_idx] for w in weight_lists]
            if torch.is_floating_point(tensors[0]):
                stacked = torch.stack(tensors)
                median_tensor = torch.median(stacked, dim=0)[0]
                aggregated.append(median_tensor)
            else:
                aggregated.append(tensors[0])

        return aggregated


def test_seed_custom_strategy_registered_by_name(runtime, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "median", SeedMedianStrategy)
    ps = create_parameter_server("median")
    workers = [ListWorker.remote([torch.tensor([v])]) for v in (1.0, 2.0, 100.0)]
    get(ps.sync_from_workers.remote(workers))
    assert get(ps.pull_weights.remote())[0].item() == 2.0
    assert get(ps.get_stats.remote())["strategy"] == "SeedMedianStrategy"


def test_builtin_median_on_the_server(inline_runtime):
    ps = create_parameter_server("median")
    workers = [ListWorker.remote([torch.tensor([v])]) for v in (1.0, 2.0, 3.0, 10.0)]
    get(ps.sync_from_workers.remote(workers))
    assert get(ps.pull_weights.remote())[0].item() == 2.5


def test_unknown_strategy_raises_in_the_caller():
    with pytest.raises(ValueError, match="known strategies are"):
        create_parameter_server("nope")


def test_bad_strategy_kwarg_names_the_options():
    with pytest.raises(ValueError, match=r"does not accept \['momentun'\]"):
        create_parameter_server("momentum", momentun=0.9)


def test_pull_weights_before_any_sync_is_a_clear_error(inline_runtime):
    ps = create_parameter_server("average")
    assert get(ps.get_stats.remote())["initialized"] is False
    with pytest.raises(ValueError, match="no global weights yet"):
        get(ps.pull_weights.remote())


def test_diloco_outer_step_on_the_server(inline_runtime):
    ps = create_parameter_server("diloco")
    get(ps.initialize.remote([torch.tensor([0.0])]))
    workers = [ListWorker.remote([torch.tensor([1.0])]) for _ in range(2)]
    result = get(ps.sync_from_workers.remote(workers))
    assert result.version == 1
    assert get(ps.pull_weights.remote())[0].item() == pytest.approx(1.33)


def test_named_server_is_reachable_by_name(inline_runtime):
    create_parameter_server("average", name="ps-test")
    ps = miniray.get_actor("ps-test")
    assert get(ps.get_stats.remote())["version"] == 0


def test_workers_given_as_a_dict_keep_their_ids(inline_runtime):
    ps = create_parameter_server("weighted")
    get(ps.set_worker_weight.remote(7, 3.0))
    workers = {
        3: ListWorker.remote([torch.tensor([0.0])]),
        7: ListWorker.remote([torch.tensor([4.0])]),
    }
    result = get(ps.sync_from_workers.remote(workers))
    assert result.included == (3, 7)
    assert get(ps.pull_weights.remote())[0].item() == pytest.approx(3.0)


def test_workers_must_be_a_list_or_dict(inline_runtime):
    ps = create_parameter_server("average")
    with pytest.raises(
        ValueError, match="workers must be a list of actor handles, got ActorHandle"
    ):
        get(ps.sync_from_workers.remote(ListWorker.remote([torch.zeros(1)])))
    with pytest.raises(ValueError, match="workers is empty"):
        get(ps.sync_from_workers.remote([]))
    with pytest.raises(ValueError, match=r"timeout=-1 must be None or a number > 0"):
        get(ps.sync_from_workers.remote([ListWorker.remote([torch.zeros(1)])], timeout=-1))


class NoSuperStrategy(SyncStrategy):
    """A user strategy whose __init__ forgets super().__init__()."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def aggregate(self, weight_lists):
        return [sum(w[i] for w in weight_lists) * self.scale for i in range(len(weight_lists[0]))]


def test_strategy_class_passed_directly_and_without_super_init(inline_runtime):
    ps = create_parameter_server(NoSuperStrategy, scale=0.5)
    get(ps.set_worker_weight.remote(0, 2.0))  # must not crash on the missing attribute
    workers = [ListWorker.remote([torch.tensor([2.0])]), ListWorker.remote([torch.tensor([4.0])])]
    get(ps.sync_from_workers.remote(workers))
    assert get(ps.pull_weights.remote())[0].item() == 3.0
