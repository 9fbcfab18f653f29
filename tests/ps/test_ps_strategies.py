"""Strategies and reducers as pure functions: no runtime needed."""

from __future__ import annotations

import pytest
import torch

from miniray.ps import reducers
from miniray.ps.outer import OuterSGD
from miniray.ps.strategies import (
    STRATEGIES,
    AverageStrategy,
    KrumStrategy,
    MedianStrategy,
    MomentumStrategy,
    OuterOptimizerStrategy,
    SyncStrategy,
    TrimmedMeanStrategy,
    WeightedStrategy,
    resolve_strategy,
)


def lists(*values):
    """One single-parameter weight list per value."""
    return [[torch.tensor([float(v)])] for v in values]


def test_average_is_the_plain_mean_and_keeps_shape_and_dtype():
    a = [torch.ones(2, 3), torch.zeros(4, dtype=torch.float64)]
    b = [torch.full((2, 3), 3.0), torch.full((4,), 2.0, dtype=torch.float64)]
    out = AverageStrategy().aggregate([a, b])
    assert torch.equal(out[0], torch.full((2, 3), 2.0))
    assert out[1].dtype == torch.float64 and torch.equal(out[1], torch.ones(4, dtype=torch.float64))


def test_non_floating_tensors_are_copied_from_the_first_worker_not_averaged():
    a = [torch.tensor([1.0]), torch.tensor([10])]
    b = [torch.tensor([3.0]), torch.tensor([11])]
    for name in ("average", "weighted", "median", "trimmed_mean", "momentum"):
        out = STRATEGIES[name]().aggregate([a, b])
        assert torch.equal(out[1], torch.tensor([10])), name
        assert out[1].dtype == torch.int64


def test_weighted_uses_worker_weights_and_defaults_to_one():
    s = WeightedStrategy()
    s.worker_weights.update({0: 1000.0, 1: 3000.0})
    out = s.reduce(lists(0, 4), worker_ids=[0, 1])
    assert out[0].item() == pytest.approx(3.0)
    out = s.reduce(lists(0, 4, 8), worker_ids=[0, 1, 7])  # worker 7 weighs 1
    assert out[0].item() == pytest.approx((0 * 1000 + 4 * 3000 + 8 * 1) / 4001)


def test_weighted_rejects_an_all_zero_round():
    s = WeightedStrategy()
    s.worker_weights.update({0: 0.0, 1: 0.0})
    with pytest.raises(ValueError, match="positive total weight"):
        s.reduce(lists(1, 2), worker_ids=[0, 1])


def test_median_even_count_is_the_mean_of_the_two_middle_values():
    # torch.median would give 2.0 (the lower middle value).
    out = MedianStrategy().aggregate(lists(1, 2, 3, 10))
    assert out[0].item() == 2.5
    assert MedianStrategy().aggregate(lists(1, 2, 100))[0].item() == 2.0


def test_median_is_coordinate_wise():
    ws = [[torch.tensor([1.0, 9.0])], [torch.tensor([2.0, 8.0])], [torch.tensor([100.0, -5.0])]]
    assert torch.equal(MedianStrategy().aggregate(ws)[0], torch.tensor([2.0, 8.0]))


def test_trimmed_mean_drops_extremes_per_coordinate():
    out = TrimmedMeanStrategy(trim_fraction=0.2).aggregate(lists(-1000, 1, 2, 3, 1000))
    assert out[0].item() == pytest.approx(2.0)
    # trim_fraction 0 is the plain mean
    assert TrimmedMeanStrategy(trim_fraction=0.0).aggregate(lists(1, 2, 6))[0].item() == 3.0


def test_trimmed_mean_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"trim_fraction=0\.5 must be in \[0, 0\.5\)"):
        TrimmedMeanStrategy(trim_fraction=0.5)


def test_krum_picks_an_honest_worker_and_ignores_an_outlier():
    honest = [[torch.tensor([1.0, 1.0]) + 0.01 * i] for i in range(4)]
    byzantine = [[torch.tensor([1e6, -1e6])]]
    s = KrumStrategy(num_byzantine=1)
    out = s.aggregate([*byzantine, *honest])
    assert s.last_selected[0] != 0
    assert torch.allclose(out[0], torch.tensor([1.0, 1.0]), atol=0.05)


def test_multi_krum_averages_the_best_workers():
    ws = [
        [torch.tensor([0.0])],
        [torch.tensor([0.1])],
        [torch.tensor([0.2])],
        [torch.tensor([50.0])],
        [torch.tensor([-50.0])],
    ]
    out = KrumStrategy(num_byzantine=1, num_selected=3).aggregate(ws)
    assert out[0].item() == pytest.approx(0.1)


def test_multi_krum_cannot_select_more_than_the_honest_workers():
    with pytest.raises(ValueError, match=r"num_selected=5 with 5 workers and num_byzantine=1"):
        KrumStrategy(num_byzantine=1, num_selected=5).aggregate(lists(1, 2, 3, 4, 5))


def test_krum_needs_2f_plus_3_workers():
    with pytest.raises(ValueError, match=r"workers >= 2 \* num_byzantine \+ 3 = 5"):
        KrumStrategy(num_byzantine=1).aggregate(lists(1, 2, 3, 4))


def test_low_precision_is_accumulated_in_fp32():
    # 4 x 30000 overflows fp16 (max 65504) if summed in fp16.
    ws = [[torch.full((3,), 30000.0, dtype=torch.float16)] for _ in range(4)]
    out = AverageStrategy().aggregate(ws)
    assert out[0].dtype == torch.float16
    assert torch.isfinite(out[0]).all() and out[0][0].item() == 30000.0


def test_outer_sign_moves_the_global_weights_towards_the_workers():
    s = OuterOptimizerStrategy(lr=0.5, momentum=0.0, nesterov=False)
    new = s.step([torch.tensor([0.0])], lists(2, 2), worker_ids=[0, 1])
    assert new[0].item() == pytest.approx(1.0)  # halfway towards 2, not away from it


def test_diloco_first_step_is_1_33_delta():
    s = STRATEGIES["diloco"]()  # lr 0.7, momentum 0.9, Nesterov
    new = s.step([torch.tensor([0.0])], lists(1, 1), worker_ids=[0, 1])
    # delta = 0 - 1 = -1; nesterov: d + 0.9 * buf = 1.9 * delta; 0.7 * 1.9 = 1.33
    assert new[0].item() == pytest.approx(1.33)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_ema_with_factor_b_equals_outer_sgd_with_lr_1_minus_b(beta):
    ema = MomentumStrategy(momentum=beta)
    sgd = OuterOptimizerStrategy(lr=1 - beta, momentum=0.0, nesterov=False) if beta < 1 else None
    g_ema = g_sgd = g_hand = None
    torch.manual_seed(0)
    for _ in range(5):
        ws = [[torch.randn(3)] for _ in range(3)]
        mean = sum(w[0] for w in ws) / 3
        g_ema = ema.step(g_ema, ws, [0, 1, 2])
        g_sgd = sgd.step(g_sgd, ws, [0, 1, 2])
        g_hand = [mean] if g_hand is None else [beta * g_hand[0] + (1 - beta) * mean]
        assert torch.allclose(g_ema[0], g_hand[0], atol=1e-6)
        assert torch.allclose(g_sgd[0], g_hand[0], atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_outer_sgd_matches_torch_optim_sgd(nesterov):
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=nesterov)
    ours = OuterSGD(lr=0.7, momentum=0.9, nesterov=nesterov)
    weights = [p.detach().clone()]
    for _ in range(6):
        delta = torch.randn(5)
        p.grad = delta.clone()
        opt.step()
        weights = ours.step(weights, [delta])
        assert torch.allclose(weights[0], p.detach(), atol=1e-6)


def test_outer_state_round_trips():
    a = OuterSGD(lr=0.7, momentum=0.9, nesterov=True)
    a.step([torch.zeros(2)], [torch.ones(2)])
    b = OuterSGD(lr=0.7, momentum=0.9, nesterov=True)
    b.load_state_dict(a.state_dict())
    x = [torch.zeros(2)]
    assert torch.equal(a.step(x, [torch.ones(2)])[0], b.step(x, [torch.ones(2)])[0])


def test_outer_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr=-1"):
        OuterSGD(lr=-1)
    with pytest.raises(ValueError, match=r"momentum=1\.0 must be in \[0, 1\)"):
        OuterSGD(lr=1, momentum=1.0)
    with pytest.raises(ValueError, match="reducer='nope'"):
        OuterOptimizerStrategy(reducer="nope")


def test_outer_with_a_robust_reducer():
    s = OuterOptimizerStrategy(lr=1.0, momentum=0.0, nesterov=False, reducer="median")
    new = s.step([torch.tensor([0.0])], lists(1, 2, 1000), [0, 1, 2])
    assert new[0].item() == 2.0


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"strategy='nope' is unknown; known strategies are \[.*'average'"
    ):
        resolve_strategy("nope")


def test_reducers_mean_does_not_mutate_inputs():
    a, b = torch.ones(3), torch.zeros(3)
    reducers.mean([a, b])
    assert torch.equal(a, torch.ones(3))


def test_seed_median_strategy_registered_by_name(monkeypatch):
    class SeedMedian(SyncStrategy):
        def aggregate(self, weight_lists):
            out = []
            for p_idx in range(len(weight_lists[0])):
                tensors = [w[p_idx] for w in weight_lists]
                out.append(torch.median(torch.stack(tensors), dim=0)[0])
            return out

    monkeypatch.setitem(STRATEGIES, "seed_median", SeedMedian)
    assert resolve_strategy("seed_median") is SeedMedian


def test_first_nonfinite_finds_nan_inf_and_overflowing_sums():
    from miniray.ps.validation import first_nonfinite

    assert first_nonfinite([torch.ones(3), torch.tensor([1])]) is None
    assert first_nonfinite([torch.ones(3), torch.tensor([0.0, float("nan")])]) == 1
    assert first_nonfinite([torch.tensor([float("-inf")])]) == 0
    # Finite values whose sum overflows fp32 are still finite: the exact check decides.
    assert first_nonfinite([torch.full((4,), 3e38)]) is None
