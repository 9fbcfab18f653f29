"""BaseTrainer and DataParallelTrainer: lifecycle, hooks, contract checks, results, errors.

Most tests run on the inline backend (same API, one process, no second-long actor starts);
the tests whose point is a real process dying use the local backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from train_workers import (
    CounterWorker,
    NoSetWeightsWorker,
    RegressionWorker,
)

import miniray
from miniray.train import (
    BaseTrainer,
    DataParallelTrainer,
    WorkerContractError,
    WorkerDiedError,
    WorkerTimeoutError,
    aggregate_results,
    weighted_results,
)


class RegressionTrainer(DataParallelTrainer):
    """Records every hook call; worker options come from train(**kwargs)."""

    def __init__(self, num_workers=2, **kwargs):
        kwargs.setdefault("backend", "inline")
        super().__init__(num_workers=num_workers, **kwargs)
        self.events = []

    def create_worker(self, worker_id, **kwargs):
        self.events.append(("create_worker", worker_id, sorted(kwargs)))
        options = {
            k: v for k, v in kwargs.items() if k in ("model", "lr", "momentum", "batch_size")
        }
        options.update(kwargs.get("faults", {}).get(worker_id, {}))
        return RegressionWorker.remote(worker_id, **options)

    def on_train_start(self, **kwargs):
        self.events.append(("on_train_start", sorted(kwargs)))

    def on_epoch_start(self, epoch, **kwargs):
        self.events.append(("on_epoch_start", epoch))

    def on_epoch_end(self, epoch, result, **kwargs):
        super().on_epoch_end(epoch, result, **kwargs)
        self.events.append(("on_epoch_end", epoch, self.epoch, sorted(result)))

    def on_train_end(self, history, **kwargs):
        result = super().on_train_end(history, **kwargs)
        self.events.append(("on_train_end", len(history)))
        result["custom"] = "from on_train_end"
        return result


def test_hooks_run_in_order_and_kwargs_reach_create_worker_and_shards():
    with RegressionTrainer(num_workers=2, sync_interval=1) as trainer:
        out = trainer.train(epochs=2, lr=0.05, extra="x")
        calls = miniray.get(trainer.workers[1].get_calls.remote())
    assert out["custom"] == "from on_train_end"  # on_train_end's return is train's result
    assert out["epochs"] == 2 and len(out["history"]) == 2
    names = [e[0] for e in trainer.events]
    assert names == [
        "create_worker",
        "create_worker",
        "on_train_start",
        "on_epoch_start",
        "on_epoch_end",
        "on_epoch_start",
        "on_epoch_end",
        "on_train_end",
    ]
    assert trainer.events[0] == ("create_worker", 0, ["extra", "lr"])
    assert trainer.events[2] == ("on_train_start", ["extra", "lr"])
    # self.epoch already counts the epoch in on_epoch_end.
    assert trainer.events[4][:3] == ("on_epoch_end", 0, 1)
    # load_data_shard(shard_id, num_shards, **train kwargs), then the epochs.
    assert calls == [
        ("load_data_shard", 1, 2, ["extra", "lr"]),
        ("train_epoch", 0),
        ("train_epoch", 1),
    ]
    assert not miniray.is_initialized()  # the with block shut the runtime down


def test_epoch_results_average_numbers_sum_counts_and_report_syncs():
    with RegressionTrainer(num_workers=2, sync_interval=2) as trainer:
        out = trainer.train(epochs=3)
        stats = trainer.get_sync_stats()
    first, second, third = out["history"]
    assert first["num_samples"] == 48  # 24 + 24: a count, summed
    assert first["worker"] == 0.5  # numeric fields are averaged (worker ids 0 and 1)
    assert [first["synced"], second["synced"], third["synced"]] == [False, True, False]
    assert second["ps_version"] == 1
    assert first["epoch_time_s"] > 0
    # Syncs after epoch 2, then one at the end because epoch 3 did not end with one.
    assert stats["num_syncs"] == 2
    assert stats["strategy"] == "AverageStrategy"


def test_training_ends_with_one_model_on_every_worker():
    with RegressionTrainer(num_workers=2, sync_interval=5) as trainer:
        trainer.train(epochs=2, lr=0.1)
        weights = [miniray.get(w.get_weights.remote()) for w in trainer.workers]
        server = miniray.get(trainer.param_server.pull_weights.remote())
    for a, b, g in zip(weights[0], weights[1], server):
        assert torch.equal(a, b) and torch.equal(a, g)


def test_replicas_start_from_worker_zeros_weights():
    with RegressionTrainer(num_workers=3, sync_interval=1) as trainer:
        trainer.setup()
        first = miniray.get(trainer.workers[0].get_weights.remote())
        for worker in trainer.workers[1:]:
            for a, b in zip(first, miniray.get(worker.get_weights.remote())):
                assert torch.equal(a, b)


def test_aggregate_results_rules():
    out = aggregate_results(
        [
            {"loss": 1.0, "acc": 0.5, "num_samples": 10, "name": "a", "flag": True},
            {"loss": 3.0, "acc": torch.tensor(1.0), "num_samples": 30, "name": "a", "flag": True},
            {"loss": 2.0, "acc": 0.0, "num_samples": 20, "name": "b", "extra": 7},
        ],
        summed=frozenset({"num_samples"}),
    )
    assert out["loss"] == 2.0 and out["acc"] == 0.5
    assert out["num_samples"] == 60
    assert out["name"] == ["a", "a", "b"]  # disagreeing non-numbers: every value
    assert out["flag"] is True  # bools are not averaged
    assert out["extra"] == 7.0  # averaged over the workers that report it
    with pytest.raises(TypeError, match="worker 1 returned a float"):
        aggregate_results([{"loss": 1.0}, 2.0])


def test_weighted_results_weight_by_sample_counts():
    out = weighted_results([{"acc": 1.0, "num_samples": 30}, {"acc": 0.0, "num_samples": 10}])
    assert out == {"acc": 0.75, "num_samples": 40}
    with pytest.raises(ValueError, match=r"worker 1's evaluate\(\) returned num_samples=None"):
        weighted_results([{"acc": 1.0, "num_samples": 3}, {"acc": 1.0}])
    with pytest.raises(ValueError, match="no worker evaluated any sample"):
        weighted_results([{"acc": 1.0, "num_samples": 0}])


def test_evaluate_combines_shards_weighted_by_samples():
    sizes = [36, 12]
    with RegressionTrainer(num_workers=2) as trainer:
        trainer.train(epochs=1, sizes=sizes)
        plain = trainer.evaluate()
        per_worker = [miniray.get(w.evaluate.remote()) for w in trainer.workers]
    assert plain["num_samples"] == 48
    expected = (per_worker[0]["mse"] * 36 + per_worker[1]["mse"] * 12) / 48
    assert math.isclose(plain["mse"], expected, rel_tol=1e-12)
    assert not math.isclose(plain["mse"], (per_worker[0]["mse"] + per_worker[1]["mse"]) / 2)


def test_set_worker_weight_before_training_reaches_the_server():
    with RegressionTrainer(num_workers=2, sync_strategy="weighted") as trainer:
        trainer.set_worker_weight(0, 1000)
        trainer.set_worker_weight(1, 3000)
        trainer.train(epochs=1)
        trainer.set_worker_weight(1, 2000)  # after setup: straight to the server
        stats = trainer.get_sync_stats()
    assert stats["worker_weights"] == {0: 1000.0, 1: 2000.0}
    assert stats["strategy"] == "WeightedStrategy"


def test_strategy_kwargs_reach_the_server():
    with RegressionTrainer(num_workers=2, sync_strategy="momentum", momentum=0.5) as trainer:
        trainer.train(epochs=1)
        assert trainer.get_sync_stats()["strategy"] == "MomentumStrategy"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_interval": 0}, r"sync_interval=0 must be an integer >= 1"),
        ({"sync_strategy": "nope"}, r"sync_strategy='nope' is unknown; known strategies are \["),
        ({"timeout_s": -1}, r"timeout_s=-1 must be a finite number of seconds > 0"),
        ({"num_workers": 0}, r"num_workers=0 must be an integer >= 1"),
        ({"checkpoint_interval": 1.5}, r"checkpoint_interval=1.5 must be an integer >= 1"),
        ({"progress": "yes"}, r"progress='yes' must be True, False or None"),
        ({"initial_broadcast": 1}, r"initial_broadcast=1 must be True or False"),
    ],
)
def test_bad_options_name_field_value_and_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataParallelTrainer(**kwargs)


def test_bad_worker_weight_and_epochs_are_refused():
    trainer = RegressionTrainer(num_workers=2)
    with pytest.raises(
        ValueError, match=r"worker_id=2 is out of range; this trainer has workers 0..1"
    ):
        trainer.set_worker_weight(2, 1.0)
    with pytest.raises(ValueError, match=r"weight=-1 for worker 0 must be a number >= 0"):
        trainer.set_worker_weight(0, -1)
    with pytest.raises(ValueError, match=r"epochs=-1 must be an integer >= 0"):
        trainer.train(epochs=-1)
    with pytest.raises(TypeError, match=r"unknown options \['chekpoint_dir'\]"):
        BaseTrainer(num_workers=1, chekpoint_dir="x")
    with pytest.raises(RuntimeError, match=r"get_sync_stats\(\) needs the parameter server"):
        trainer.get_sync_stats()


def test_create_worker_must_be_overridden():
    trainer = DataParallelTrainer(num_workers=1, backend="inline")
    with pytest.raises(NotImplementedError, match=r"DataParallelTrainer.create_worker\(worker_id"):
        trainer.train(epochs=1)
    trainer.shutdown()


class ClassReturningTrainer(DataParallelTrainer):
    def create_worker(self, worker_id, **kwargs):
        return RegressionWorker  # forgot .remote(...)


class NoSetWeightsTrainer(DataParallelTrainer):
    def create_worker(self, worker_id, **kwargs):
        return NoSetWeightsWorker.remote(worker_id)


def test_worker_contract_errors_name_the_method():
    trainer = ClassReturningTrainer(num_workers=1, backend="inline")
    with trainer, pytest.raises(WorkerContractError, match=r"not an actor; return an actor handle"):
        trainer.train(epochs=1)
    with NoSetWeightsTrainer(num_workers=2, backend="inline") as trainer:
        with pytest.raises(
            WorkerContractError,
            match=r"worker 0 \(NoSetWeightsWorker\) has no method set_weights\(\)",
        ):
            trainer.train(epochs=1)
        assert trainer.epoch == 0  # refused before any training
    with RegressionTrainer(num_workers=1) as trainer:
        trainer.train(epochs=1)
        trainer.require_worker_method("evaluate")
        with pytest.raises(WorkerContractError, match=r"has no method predict\(\)"):
            trainer.require_worker_method("predict")


def test_a_worker_exception_keeps_its_type_and_names_worker_and_epoch():
    faults = {1: {"raise_at_epoch": 1}}
    with RegressionTrainer(num_workers=2) as trainer:
        with pytest.raises(ValueError, match="bad batch in worker 1") as info:
            trainer.train(epochs=3, faults=faults)
        assert trainer.epoch == 1
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "raised by worker 1 in train_epoch() during epoch 1" in notes


def test_a_hung_worker_times_out_naming_worker_and_epoch():
    faults = {0: {"hang_at_epoch": 0}}  # sleeps 3 s; the limit is 0.5 s
    with (
        RegressionTrainer(num_workers=2, timeout_s=0.5) as trainer,
        pytest.raises(
            WorkerTimeoutError, match=r"workers \[0\] did not finish train_epoch\(\) during epoch 0"
        ) as info,
    ):
        trainer.train(epochs=1, faults=faults)
    assert info.value.worker_ids == [0] and info.value.epoch == 0
    assert isinstance(info.value, TimeoutError)


def test_a_sync_that_leaves_a_worker_out_stops_training_naming_it():
    faults = {1: {"nan_at_epoch": 1}}
    with RegressionTrainer(num_workers=2) as trainer:
        with pytest.raises(
            RuntimeError,
            match=r"parameter sync during epoch 1 .* failed for workers \{1: 'nonfinite",
        ):
            trainer.train(epochs=3, faults=faults)
        assert trainer.epoch == 1  # epoch 1 never completed
        assert 1 in trainer.last_sync.excluded  # the server left the NaN replica out


class KillingTrainer(RegressionTrainer):
    def on_epoch_start(self, epoch, **kwargs):
        if epoch == 1:
            miniray.kill(self.workers[1])


def test_a_killed_worker_is_reported_with_its_id_and_epoch():
    with (
        KillingTrainer(num_workers=2) as trainer,
        pytest.raises(
            WorkerDiedError,
            match=r"worker 1 \(RegressionWorker\) died while running train_epoch\(\) during epoch 1",
        ) as info,
    ):
        trainer.train(epochs=3)
    assert (info.value.worker_id, info.value.epoch, info.value.method) == (1, 1, "train_epoch")
    assert isinstance(info.value, miniray.exceptions.RayActorError)


class LocalPlainTrainer(BaseTrainer):
    """BaseTrainer's default epoch on the local backend: no server, one process fewer."""

    def create_worker(self, worker_id, **kwargs):
        return RegressionWorker.remote(worker_id, **kwargs.get("faults", {}).get(worker_id, {}))


@pytest.mark.slow
def test_a_worker_process_dying_mid_epoch_is_reported():
    faults = {1: {"die_at_epoch": 1}}
    trainer = LocalPlainTrainer(num_workers=2, timeout_s=120, backend="local")
    with trainer, pytest.raises(WorkerDiedError, match=r"worker 1 .* during epoch 1") as info:
        trainer.train(epochs=3, faults=faults)
    assert info.value.worker_id == 1 and info.value.epoch == 1


class CustomTrainer(BaseTrainer):
    """The seed's example 3: a fully custom epoch over BaseTrainer."""

    def create_worker(self, worker_id, **kwargs):
        return CounterWorker.remote(worker_id, **kwargs)

    def train_epoch(self, epoch, **kwargs):
        results = miniray.get([w.custom_method.remote(epoch) for w in self.workers])
        return {"custom_metric": sum(results) / len(results)}


def test_custom_base_trainer_loop():
    with CustomTrainer(num_workers=3, backend="inline") as trainer:
        out = trainer.train(epochs=2, scale=2)
    # workers return (id + 1) * 2 * (epoch + 1): mean over ids 0..2 is 4 * (epoch + 1)
    assert [h["custom_metric"] for h in out["history"]] == [4.0, 8.0]
    assert trainer.param_server is None


class DefaultEpochTrainer(BaseTrainer):
    def create_worker(self, worker_id, **kwargs):
        return CounterWorker.remote(worker_id)


def test_base_trainer_default_epoch_calls_workers_and_aggregates():
    with DefaultEpochTrainer(num_workers=2, backend="inline") as trainer:
        out = trainer.train(epochs=2)
    assert out["history"][1]["value"] == 6.0  # mean of 0 + 1 and 10 + 1
    assert out["history"][1]["tag"] == "same"


def test_a_runtime_the_user_started_stays_up_and_our_actors_go():
    miniray.init(backend="inline", num_workers=2)
    try:
        trainer = RegressionTrainer(num_workers=2)
        trainer.train(epochs=1)
        worker = trainer.workers[0]
        trainer.shutdown()
        assert miniray.is_initialized()
        with pytest.raises(miniray.exceptions.RayActorError):
            miniray.get(worker.get_weights.remote(), timeout=10)
        with pytest.raises(RuntimeError, match="was shut down; create a new one"):
            trainer.train(epochs=2)
    finally:
        miniray.shutdown()


def test_train_twice_continues_up_to_the_epoch_given():
    with RegressionTrainer(num_workers=2) as trainer:
        trainer.train(epochs=2)
        out = trainer.train(epochs=3)  # epochs is where to stop, as in Keras
        again = trainer.train(epochs=3)  # nothing left to do
    assert len(out["history"]) == 3 and len(again["history"]) == 3
    assert [e for e in trainer.events if e[0] == "on_epoch_start"] == [
        ("on_epoch_start", 0),
        ("on_epoch_start", 1),
        ("on_epoch_start", 2),
    ]
