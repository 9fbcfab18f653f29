"""Data-parallel training is the algebra it claims to be.

With ``sync_interval=1``, plain SGD, one full-shard step per epoch and equal shards, N workers
end each epoch with ``mean_i(w - lr * g_i) = w - lr * mean_i(g_i)``, and ``mean_i(g_i)`` is the
gradient of the mean loss over all the data: exactly one process doing full-batch gradient
descent. Unequal shards need the 'weighted' strategy with each worker weighted by its sample
count. float64 models keep rounding differences near 1e-15, so the tolerance is tight enough
that local SGD (syncing every 2 epochs), which is a different algorithm, fails it.
"""

from __future__ import annotations

import pytest
import torch
from train_workers import PartsWorker, RegressionWorker, make_model, reference_run

import miniray
from miniray.train import DataParallelTrainer

EPOCHS = 6
LR = 0.2
TOLERANCE = 1e-10


class SGDTrainer(DataParallelTrainer):
    def create_worker(self, worker_id, **kwargs):
        return RegressionWorker.remote(worker_id, model=kwargs["model"], lr=LR)


def train_data_parallel(kind, num_workers, *, sync_interval=1, strategy="average", sizes=None):
    with SGDTrainer(
        num_workers=num_workers,
        sync_interval=sync_interval,
        sync_strategy=strategy,
        backend="inline",
    ) as trainer:
        if sizes is not None:
            for worker_id, size in enumerate(sizes):
                trainer.set_worker_weight(worker_id, size)
        trainer.train(epochs=EPOCHS, model=kind, sizes=sizes)
        return miniray.get(trainer.param_server.pull_weights.remote())


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("num_workers", [2, 4])
def test_n_workers_on_shards_match_one_process_on_all_data(kind, num_workers):
    want = reference_run(kind, LR, EPOCHS)
    got = train_data_parallel(kind, num_workers)
    assert max_diff(got, want) < TOLERANCE
    # The comparison means something: training moved the weights well past the tolerance.
    start = [p.detach() for p in make_model(kind, 0).parameters()]
    assert max_diff(want, start) > 1e-3


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_local_sgd_is_a_different_algorithm_and_the_test_sees_it(kind):
    want = reference_run(kind, LR, EPOCHS)
    got = train_data_parallel(kind, 2, sync_interval=2)
    assert max_diff(got, want) > 1e3 * TOLERANCE


def test_unequal_shards_match_with_weights_set_to_sample_counts():
    sizes = [36, 12]
    want = reference_run("mlp", LR, EPOCHS)
    weighted = train_data_parallel("mlp", 2, strategy="weighted", sizes=sizes)
    assert max_diff(weighted, want) < TOLERANCE
    # The plain average over-counts the small shard: a different result.
    plain = train_data_parallel("mlp", 2, strategy="average", sizes=sizes)
    assert max_diff(plain, want) > 1e3 * TOLERANCE


class PartsTrainer(DataParallelTrainer):
    def create_worker(self, worker_id, **kwargs):
        return PartsWorker.remote(worker_id, model=kwargs["model"], lr=LR)


def test_syncs_within_an_epoch_are_full_batch_steps():
    """syncs_per_epoch=k: k parts per epoch, a sync after each; k x the reference's steps."""
    parts = 3
    with PartsTrainer(num_workers=2, syncs_per_epoch=parts, backend="inline") as trainer:
        out = trainer.train(epochs=2, model="mlp")
        got = miniray.get(trainer.param_server.pull_weights.remote())
        calls = miniray.get(trainer.workers[1].get_calls.remote())
        stats = trainer.get_sync_stats()
    assert max_diff(got, reference_run("mlp", LR, 2 * parts)) < TOLERANCE
    assert [c for c in calls if c[0] == "train_epoch"] == [
        ("train_epoch", epoch, part, parts) for epoch in range(2) for part in range(parts)
    ]
    assert stats["num_syncs"] == 2 * parts
    # One result per epoch, its parts combined: this worker takes its whole shard (24 samples)
    # in every part, so each epoch counts 2 workers x 3 parts x 24.
    assert [h["num_samples"] for h in out["history"]] == [2 * parts * 24] * 2
    assert [h["ps_version"] for h in out["history"]] == [parts, 2 * parts]


def test_syncs_per_epoch_needs_every_epoch_synced():
    with pytest.raises(ValueError, match="syncs_per_epoch=2 needs sync_interval=1"):
        PartsTrainer(num_workers=2, syncs_per_epoch=2, sync_interval=2, backend="inline")
    with pytest.raises(ValueError, match="syncs_per_epoch=0"):
        PartsTrainer(num_workers=2, syncs_per_epoch=0, backend="inline")


@pytest.mark.slow
def test_equivalence_holds_across_processes():
    """The local backend moves weights through shared memory; the algebra must not change."""

    class LocalSGDTrainer(SGDTrainer):
        pass

    with LocalSGDTrainer(num_workers=2, sync_interval=1, backend="local", timeout_s=120) as t:
        t.train(epochs=EPOCHS, model="mlp")
        got = miniray.get(t.param_server.pull_weights.remote(), timeout=60)
    assert max_diff(got, reference_run("mlp", LR, EPOCHS)) < TOLERANCE
    assert all(g.dtype == torch.float64 for g in got)
