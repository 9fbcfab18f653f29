"""The sliced reduction (``miniray.ps.sliced``) against the gather path it replaces.

Arithmetic and bookkeeping run in one process (``inline_runtime``, or no runtime at all); the
tests whose point is processes and shared memory (workers reducing slices, a participant failing
or hanging, weights a worker keeps, segments removed at shutdown) use the local backend.
"""

from __future__ import annotations

import os

import pytest
import torch
from ps_workers import (
    FailsInWorkers,
    KeepingWorker,
    ListWorker,
    ScribblingWorker,
    SlowInHelpers,
)

import miniray
from miniray.ps import STRATEGIES, create_parameter_server, sliced
from miniray.ps.server import ParameterServer, ServerConfig
from miniray.ps.strategies import AverageStrategy, SyncStrategy, sliceable
from miniray.runtime import context, shm
from process_support import wait_until

T = 60  # seconds; every wait below is bounded

pytestmark = pytest.mark.timeout(240)


def model(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """A small model with awkward sizes, a bf16 tensor, a scalar, an empty and a counter."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1000, 37, generator=g) * scale,
        torch.randn(5, generator=g).to(torch.bfloat16),
        torch.randn((), generator=g),
        torch.zeros(0),
        torch.randn(3, 3, 3, generator=g, dtype=torch.float64),
        torch.tensor([seed], dtype=torch.int64),
    ]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        if torch.is_floating_point(x):
            tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=f"parameter {i}")
        else:
            assert torch.equal(x, y), i


# -- planning and the per-slice arithmetic, no runtime ------------------------------------------
@pytest.mark.parametrize("num_slices", [1, 2, 3, 7, 64])
def test_plan_covers_every_element_once_and_balances_bytes(num_slices):
    numels = [37_000, 5, 1, 0, 27, 1, 100_003]
    sizes = [4, 2, 4, 4, 8, 8, 4]
    slices = sliced.plan_slices(numels, sizes, num_slices)
    assert len(slices) == num_slices
    covered = [torch.zeros(n, dtype=torch.int32) for n in numels]
    for pieces in slices:
        for piece in pieces:
            covered[piece.param][piece.start : piece.stop] += 1
            if piece.start:  # a cut inside a parameter falls on an aligned element
                assert piece.start % sliced.ALIGN_ELEMENTS == 0
    assert all(bool((c == 1).all()) for c in covered)
    loads = [sum((p.stop - p.start) * sizes[p.param] for p in pieces) for pieces in slices]
    ideal = sum(n * s for n, s in zip(numels, sizes)) / num_slices
    assert max(loads) <= ideal + 2 * sliced.ALIGN_ELEMENTS * 8


def test_plan_rejects_zero_slices():
    with pytest.raises(ValueError, match="num_slices=0"):
        sliced.plan_slices([10], [4], 0)


def reduce_in_slices(strategy, lists, worker_ids, num_slices, check_inputs=True):
    """Every slice reduced separately into one private buffer, as P processes would."""
    layout = sliced.Layout.of([t.shape for t in lists[0]], [t.dtype for t in lists[0]])
    buffer = torch.full((layout.size,), 0xFF, dtype=torch.uint8)  # garbage where not written
    numels = layout.numels()
    sizes = [t.element_size() for t in lists[0]]
    bad = {}
    for pieces in sliced.plan_slices(numels, sizes, num_slices):
        task = sliced.SliceTask(
            pieces=tuple(pieces),
            layout=layout,
            worker_ids=tuple(worker_ids),
            upcast=(None,) * len(numels),
            check_inputs=check_inputs,
        )
        for wid, p in sliced.reduce_slice(strategy, task, lists, buffer).items():
            bad[wid] = min(p, bad.get(wid, p))
    return [v.clone() for v in layout.views(buffer)], bad


@pytest.mark.parametrize(
    "name,kwargs",
    [("average", {}), ("weighted", {}), ("median", {}), ("trimmed_mean", {"trim_fraction": 0.25})],
)
@pytest.mark.parametrize("num_slices", [1, 3, 5])
def test_slices_reduce_to_the_gather_paths_result(name, kwargs, num_slices):
    strategy = STRATEGIES[name](**kwargs)
    strategy.worker_weights.update({0: 1.0, 1: 3.0, 2: 0.5, 3: 2.0})
    lists = [model(i) for i in range(4)]
    expected = strategy.reduce(lists, [0, 1, 2, 3])
    got, bad = reduce_in_slices(strategy, lists, [0, 1, 2, 3], num_slices)
    assert bad == {}
    assert_close(got, expected)


def test_the_mean_of_slices_is_bit_identical_to_the_gather_mean():
    lists = [model(i) for i in range(3)]
    expected = AverageStrategy().reduce(lists, [0, 1, 2])
    got, _ = reduce_in_slices(AverageStrategy(), lists, [0, 1, 2], num_slices=4)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("check_inputs", [True, False])
def test_slices_name_each_worker_with_nan_or_inf_and_its_first_parameter(check_inputs):
    lists = [model(i) for i in range(4)]
    lists[1][4][2, 2, 2] = float("nan")
    lists[3][0][999, 36] = float("inf")
    lists[3][4][0, 0, 0] = float("-inf")
    _, bad = reduce_in_slices(AverageStrategy(), lists, [10, 11, 12, 13], 3, check_inputs)
    assert bad == {11: 4, 13: 0}


def test_sliceable_is_declared_not_inherited_by_an_override():
    class CustomMean(SyncStrategy):
        def aggregate(self, weight_lists):
            return AverageStrategy().aggregate(weight_lists)

    class ScaledAverage(AverageStrategy):  # inherits elementwise, but its arithmetic is new
        def aggregate(self, weight_lists):
            return [t * 2 for t in super().aggregate(weight_lists)]

    class DeclaredScaledAverage(ScaledAverage):
        elementwise = True

        def aggregate(self, weight_lists):
            return super().aggregate(weight_lists)

    built_in = {name: sliceable(cls()) for name, cls in STRATEGIES.items()}
    assert built_in == {
        "average": True,
        "weighted": True,
        "momentum": True,
        "median": True,
        "trimmed_mean": True,
        "krum": False,
        "outer": True,
        "diloco": True,
    }
    assert not sliceable(CustomMean()) and not sliceable(ScaledAverage())
    assert sliceable(DeclaredScaledAverage())
    assert not sliceable(STRATEGIES["diloco"](reducer="krum", num_byzantine=0))


# -- the server, in one process ----------------------------------------------------------------
def run_rounds(strategy, aggregation, rounds, mode="weights", **options):
    """Global weights after each of ``rounds`` syncs of 4 workers that drift apart."""
    extra = {"lr": 0.5} if mode == "gradients" else {}
    ps = ParameterServer(
        strategy["name"],
        strategy.get("kwargs"),
        ServerConfig(aggregation=aggregation, mode=mode, sync_timeout_s=T, **extra, **options),
    )
    ps.set_worker_weight(2, 5.0)
    workers = [ListWorker.remote(model(i), gradients=model(10 + i, 0.1)) for i in range(4)]
    history, results = [], []
    for r in range(rounds):
        for i, w in enumerate(workers):
            miniray.get(w.load.remote(model(100 * r + i), model(200 * r + i, 0.1)), timeout=T)
        results.append(ps.sync_from_workers(workers))
        history.append([t.clone() for t in ps.pull_weights()])
    return history, results, ps


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "average"},
        {"name": "weighted"},
        {"name": "median"},
        {"name": "trimmed_mean", "kwargs": {"trim_fraction": 0.25}},
        {"name": "momentum", "kwargs": {"momentum": 0.8}},
        {"name": "diloco"},
        {"name": "diloco", "kwargs": {"reducer": "median"}},
    ],
    ids=lambda s: s["name"] + "".join(f"-{v}" for v in s.get("kwargs", {}).values()),
)
@pytest.mark.parametrize("mode", ["weights", "gradients"])
def test_sliced_rounds_equal_gather_rounds(inline_runtime, strategy, mode):
    sliced_history, sliced_results, _ = run_rounds(strategy, "sliced", 3, mode)
    gather_history, gather_results, _ = run_rounds(strategy, "gather", 3, mode)
    assert [r.aggregation for r in sliced_results] == ["sliced"] * 3
    assert [r.aggregation for r in gather_results] == ["gather"] * 3
    for got, expected in zip(sliced_history, gather_history):
        assert_close(got, expected)


def test_sliced_round_excludes_nonfinite_workers_like_the_gather_path(inline_runtime):
    def round_with_nan(aggregation, quorum=1):
        ps = ParameterServer("diloco", config=ServerConfig(aggregation=aggregation, quorum=quorum))
        weights = [model(i) for i in range(3)]
        weights[0][2] = torch.tensor(float("nan"))
        weights[2][0][5, 5] = float("inf")
        result = ps.sync_from_workers([ListWorker.remote(w) for w in weights])
        return result, ps

    sliced_result, sliced_ps = round_with_nan("sliced")
    gather_result, gather_ps = round_with_nan("gather")
    assert (
        sliced_result.excluded
        == gather_result.excluded
        == {
            0: "nonfinite: parameter 2",
            2: "nonfinite: parameter 0",
        }
    )
    assert sliced_result.included == (1,) and sliced_result.applied
    assert_close(sliced_ps.pull_weights(), gather_ps.pull_weights())
    assert sliced_ps.get_stats()["num_excluded_nonfinite"] == 2
    discarded, ps = round_with_nan("sliced", quorum=2)
    assert not discarded.applied and discarded.version == 0 and "quorum is 2" in discarded.reason
    assert ps.get_stats()["initialized"] is False


def test_sliced_option_is_checked_where_it_is_set():
    with pytest.raises(ValueError, match="aggregation='sliced' needs a strategy"):
        create_parameter_server("krum", aggregation="sliced")
    with pytest.raises(ValueError, match="num_shards=2"):
        ServerConfig(aggregation="sliced", num_shards=2)
    with pytest.raises(ValueError, match="aggregation='fast' is unknown"):
        ServerConfig(aggregation="fast")
    with pytest.raises(ValueError, match="reduce_processes=0 must be"):
        ServerConfig(reduce_processes=0)
    with pytest.raises(ValueError, match="sliced_min_bytes=-1 must be"):
        ServerConfig(sliced_min_bytes=-1)


def test_a_custom_strategy_keeps_the_gather_path(inline_runtime):
    class WholeModelNorm(SyncStrategy):
        """Needs every value at once: it scales by a norm over the whole model."""

        def aggregate(self, weight_lists):
            total = sum(float(w[0].norm()) for w in weight_lists)
            return [weight_lists[0][0] / total]

    ps = ParameterServer(WholeModelNorm, config=ServerConfig(sliced_min_bytes=0))
    workers = [ListWorker.remote([torch.full((4,), float(i + 1))]) for i in range(2)]
    result = ps.sync_from_workers(workers)
    assert result.aggregation == "gather"
    assert torch.allclose(ps.pull_weights()[0], torch.full((4,), 1 / 6))


# -- processes and shared memory (local backend) -----------------------------------------------
def session_segments() -> set[str]:
    backend = context.current()
    return set(shm.list_session(backend.session_id))


def expected_mean(weight_lists):
    return AverageStrategy().aggregate(weight_lists)


def start_spread(strategy="average", strategy_kwargs=None, workers=3, **options):
    """A server in this process whose rounds are spread from the first one (``initialize``
    gives it the layout), and ``workers`` ListWorkers holding model(0), model(1), ..."""
    options = {"sliced_min_bytes": 0, "sync_timeout_s": T, **options}
    ps = ParameterServer(strategy, strategy_kwargs, ServerConfig(**options))
    lists = [model(i) for i in range(workers)]
    ps.initialize(model(99))
    workers = [ListWorker.remote(w) for w in lists]
    miniray.get([w.times_set.remote() for w in workers], timeout=T)  # started
    return ps, lists, workers


def test_workers_reduce_their_slices_through_segments_that_go_at_shutdown():
    miniray.init(backend="local", num_workers=1)
    try:
        session = context.current().session_id
        ps, lists, workers = start_spread(reduce_processes=3)
        pulled = []
        for r in range(4):
            lists = [model(10 * r + i) for i in range(3)]
            miniray.get([w.load.remote(x) for w, x in zip(workers, lists)], timeout=T)
            result = ps.sync_from_workers(workers)
            assert result.aggregation == "sliced" and result.reduce_failed == {}
            assert result.applied and result.included == (0, 1, 2)
            assert_close(ps.pull_weights(), expected_mean(lists))
            if r == 0:  # held by an in-process caller: its segment is never written again
                pulled, first = ps.pull_weights(), expected_mean(lists)
        assert_close(pulled, first)
        assert ps.sliced is not None and len(ps.sliced.spread.inputs) == 3
        assert len(ps.sliced.spread.results) == 2  # the newest result and one to write next
        live = set(ps.sliced.spread.live())
        assert len(live) == 5 and live <= session_segments()
        # Every worker loaded the result.
        for got in miniray.get([w.get_weights.remote() for w in workers], timeout=T):
            assert_close(got, expected_mean(lists))
        ps.close()
        assert not (live & session_segments())
    finally:
        miniray.shutdown()
    assert shm.list_session(session) == []


@pytest.mark.parametrize("die", [False, True], ids=["raises", "dies"])
def test_a_participant_that_fails_leaves_the_round_complete(die):
    miniray.init(backend="local", num_workers=1)
    try:
        strategy = (FailsInWorkers, {"server_pid": os.getpid(), "die": die})
        ps, lists, workers = start_spread(*strategy, reduce_processes=3, push_timeout_s=10)
        result = ps.sync_from_workers(workers)
        # Slices 1 and 2 were the workers 0 and 1's: the server reduced everything itself.
        assert result.applied and sorted(result.reduce_failed) == [1, 2]
        why = "died" if die else "error"
        assert all(r.startswith(why) for r in result.reduce_failed.values())
        assert_close(ps.pull_weights(), expected_mean(lists))
        assert ps.get_stats()["num_reducer_failures"] == 2
        if die:  # the dead workers cannot load the result; the living one did
            assert sorted(result.push_failed) == [0, 1]
            assert_close(
                miniray.get(workers[2].get_weights.remote(), timeout=T), expected_mean(lists)
            )
        else:
            assert result.push_failed == {}
    finally:
        miniray.shutdown()


def test_a_participant_that_misses_the_deadline_has_its_segment_retired():
    miniray.init(backend="local", num_workers=1)
    try:
        strategy = (SlowInHelpers, {"server_pid": os.getpid()})
        ps, lists, workers = start_spread(
            *strategy, workers=2, reduce_processes=2, sync_timeout_s=3.0, push_timeout_s=3.0
        )
        assert ps.sliced is not None
        made, make = [], ps.sliced.spread._next_result
        ps.sliced.spread._next_result = lambda size: made.append(make(size)) or made[-1]
        result = ps.sync_from_workers(workers)
        assert result.applied and result.reduce_failed == {1: "timeout"}
        assert_close(ps.pull_weights(), expected_mean(lists))
        # The segment the hung worker may still write into is gone; the result is in a new one.
        names = [m.name for m in made]
        assert len(set(names)) == 2 and names[0] not in session_segments()
        assert names[1] in session_segments()
        # The hung worker (0) could not load in time either; worker 1 did.
        assert list(result.push_failed) == [0]
        assert_close(miniray.get(workers[1].get_weights.remote(), timeout=T), expected_mean(lists))
    finally:
        miniray.shutdown()


def test_weights_a_worker_keeps_are_never_rewritten_and_its_writes_stay_its_own():
    miniray.init(backend="local", num_workers=1)
    try:
        ps, lists, workers = start_spread(workers=1)
        keeper = KeepingWorker.remote(model(7))
        workers.append(keeper)
        lists.append(model(7))
        first = expected_mean(lists)
        assert ps.sync_from_workers(workers).applied
        # The keeper's write went to its own copy: not into the server's weights, not into
        # what the other worker loaded.
        assert_close(ps.pull_weights(), first)
        assert_close(miniray.get(workers[0].get_weights.remote(), timeout=T), first)
        for r in range(3):
            miniray.get(workers[0].load.remote(model(10 + r)), timeout=T)
            result = ps.sync_from_workers(workers)
            assert result.applied and result.aggregation == "sliced"
        # Three rounds later the keeper still holds round 1's result (and its own write).
        kept = miniray.get(keeper.first_weights.remote(), timeout=T)
        assert torch.equal(kept[-1], first[-1] + 1000)
        assert_close(kept[:-1], first[:-1])
    finally:
        miniray.shutdown()


def test_a_worker_that_writes_into_what_it_loaded_gets_fresh_weights_next_time():
    miniray.init(backend="local", num_workers=1)
    try:
        ps, _, workers = start_spread(workers=1)
        workers.append(ScribblingWorker.remote(model(5)))
        for r in range(5):  # each ring segment is loaded more than once
            lists = [model(10 * r + i) for i in range(2)]
            miniray.get([w.load.remote(x) for w, x in zip(workers, lists)], timeout=T)
            assert ps.sync_from_workers(workers).applied
            for got in miniray.get([w.get_weights.remote() for w in workers], timeout=T):
                assert_close(got, expected_mean(lists))
    finally:
        miniray.shutdown()


@pytest.mark.parametrize(
    ("strategy", "mode"),
    [
        ({"name": "weighted"}, "weights"),
        ({"name": "diloco"}, "weights"),
        ({"name": "median"}, "weights"),
        ({"name": "average"}, "gradients"),
        ({"name": "diloco", "kwargs": {"reducer": "trimmed_mean"}}, "gradients"),
    ],
    ids=lambda x: x if isinstance(x, str) else x["name"] + "".join(x.get("kwargs", {}).values()),
)
def test_spread_rounds_equal_gather_rounds_with_nan_exclusion(strategy, mode):
    """Several rounds, worker 1 sending NaN in round 2; gradients mode upcasts the bf16
    gradient before reducing it (the result's layout differs from the inputs')."""
    miniray.init(backend="local", num_workers=1)
    try:
        history = {}
        extra = {"lr": 0.5} if mode == "gradients" else {}
        for aggregation in ("sliced", "gather"):
            ps, _, workers = start_spread(
                strategy["name"],
                strategy.get("kwargs"),
                aggregation=aggregation,
                reduce_processes=3,
                mode=mode,
                **extra,
            )
            ps.set_worker_weight(2, 5.0)
            history[aggregation] = []
            for r in range(3):
                for i, w in enumerate(workers):
                    values = model(100 * r + i, 0.1 if mode == "gradients" else 1.0)
                    if r == 1 and i == 1:
                        values[4][1, 1, 1] = float("nan")
                    miniray.get(w.load.remote(values, values), timeout=T)
                result = ps.sync_from_workers(workers)
                assert result.aggregation == aggregation and result.applied
                assert result.excluded == ({1: "nonfinite: parameter 4"} if r == 1 else {})
                history[aggregation].append([t.clone() for t in ps.pull_weights()])
            ps.close()
        for got, expected in zip(history["sliced"], history["gather"]):
            assert_close(got, expected)
    finally:
        miniray.shutdown()


def test_a_spread_round_raises_on_a_worker_with_another_structure():
    miniray.init(backend="local", num_workers=1)
    try:
        ps, _, workers = start_spread(workers=2)
        wrong = model(1)
        wrong[0] = torch.zeros(3, 3)
        miniray.get(workers[1].load.remote(wrong), timeout=T)
        with pytest.raises(ValueError, match=r"worker 1: parameter 0 has shape \(3, 3\)"):
            ps.sync_from_workers(workers)
        assert ps.version == 0
    finally:
        miniray.shutdown()


@miniray.remote
class DyingWorker:
    def get_weights(self):
        os._exit(1)

    def set_weights(self, weights):
        raise AssertionError("a dead worker cannot load weights")


def test_a_worker_that_dies_mid_sync_is_left_out_by_name():
    miniray.init(backend="local", num_workers=1)
    try:
        config = ServerConfig(sliced_min_bytes=0, reduce_processes=2, sync_timeout_s=T)
        ps = ParameterServer("average", config=config)
        ps.initialize(model(99))  # the layout is known: the round is spread from the start
        lists = [model(i) for i in range(2)]
        workers = [ListWorker.remote(lists[0]), DyingWorker.remote(), ListWorker.remote(lists[1])]
        result = ps.sync_from_workers(workers)
        assert result.aggregation == "sliced" and result.applied
        assert result.included == (0, 2) and result.excluded[1].startswith("died")
        assert_close(ps.pull_weights(), expected_mean(lists))
        strict = ParameterServer(
            "average", config=ServerConfig(sliced_min_bytes=0, quorum=3, sync_timeout_s=T)
        )
        discarded = strict.sync_from_workers(workers)
        assert not discarded.applied and "quorum is 3" in discarded.reason
    finally:
        miniray.shutdown()


def test_the_server_actors_segment_goes_when_the_server_dies(local_runtime):
    before = session_segments()
    ps = create_parameter_server("average", sliced_min_bytes=0, reduce_processes=2)
    workers = [ListWorker.remote(model(i)) for i in range(2)]
    for _ in range(2):  # the first round is reduced by the server alone, the second spread
        result = miniray.get(ps.sync_from_workers.remote(workers), timeout=T)
        assert result.aggregation == "sliced" and result.applied
    stats = miniray.get(ps.get_stats.remote(), timeout=T)
    assert stats["last_round"]["aggregation"] == "sliced"
    others = {str(os.getpid())} | {
        str(pid) for pid in miniray.get([w.pid.remote() for w in workers], timeout=T)
    }
    # What the server process created: the put of round 1, inputs and results of round 2.
    created = {n for n in session_segments() - before if n.split("_")[-2] not in others}
    assert len(created) >= 3
    miniray.kill(ps)
    wait_until(
        lambda: not (created & session_segments()), timeout=T, what="the dead server's segments"
    )
