"""Scaling of miniray.train against PyTorch DDP (gloo) on the classification example.

For 1, 2 and 4 workers, in one run: the digits classifier of examples/train_framework_demo.py
trained by ``DataParallelTrainer`` (local backend, weights averaged through the parameter
server every ``--sync-interval`` epochs) and by ``torch.nn.parallel.DistributedDataParallel``
over gloo (gradients all-reduced every step). Same model, data shards (``[rank::N]``),
per-worker batch size, optimizer, learning rate and epochs; one intra-op thread per worker.
Each point is the mean over ``--seeds`` runs (initial weights and shuffling seeded alike on
both sides): the test set has 360 images, so one seed's accuracy moves by about a point.

Reported per run: mean epoch time (the first epoch, a warm-up, is left out; process start-up is
never counted), training samples per second (the whole training set per epoch divided by the
epoch time), and the final test accuracy. The last line is JSON:

    {"workers": [1, 2, 4], "miniray_samples_per_s": [...], "ddp_samples_per_s": [...],
     "miniray_acc": [...], "ddp_acc": [...], "miniray_acc_std": [...], "ddp_acc_std": [...]}

    python benchmarks/train_scaling.py                   # about a minute on 2 cores
    python benchmarks/train_scaling.py --epochs 20 --hidden 512 --plot scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from train_framework_demo import ClassificationWorker, load_dataset, make_model

from miniray.train import DataParallelTrainer


# -- miniray ----------------------------------------------------------------------------------
class ScalingTrainer(DataParallelTrainer):
    def __init__(self, num_workers, lr, hidden, seed, **options):
        super().__init__(num_workers=num_workers, **options)
        self.lr, self.hidden, self.seed = lr, hidden, seed

    def create_worker(self, worker_id, **kwargs):
        # Replicas start from worker 0's weights (the trainer broadcasts them), as DDP's ranks
        # start from rank 0's; batch shuffling is seeded seed * 1000 + rank on both sides.
        return ClassificationWorker.remote(
            worker_id, lr=self.lr, hidden=self.hidden, seed=self.seed
        )


def run_miniray(num_workers: int, seed: int, args: argparse.Namespace) -> dict:
    with ScalingTrainer(
        num_workers,
        args.lr,
        args.hidden,
        seed,
        sync_interval=args.sync_interval,
        syncs_per_epoch=args.syncs_per_epoch,
        backend=args.backend,
        progress=False,
        timeout_s=600,
    ) as trainer:
        out = trainer.train(epochs=args.epochs, batch_size=args.batch_size)
        test = trainer.evaluate(split="test")
    times = [h["epoch_time_s"] for h in out["history"]][1:]
    return {"epoch_s": statistics.mean(times), "acc": test["accuracy"]}


# -- DDP --------------------------------------------------------------------------------------
def _ddp_rank(
    rank: int, world: int, port: int, seed: int, args: argparse.Namespace, out_path: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        x_train, y_train, x_test, y_test = load_dataset("digits")
        x, y = x_train[rank::world], y_train[rank::world]
        model = nn.parallel.DistributedDataParallel(make_model(args.hidden, seed=seed))
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        times = []
        for _ in range(args.epochs):
            dist.barrier()
            start = time.perf_counter()
            # join(): shards may differ by one batch; the short rank shadows the all-reduces.
            with model.join():
                for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            with torch.no_grad():
                acc = (model.module(x_test).argmax(1) == y_test).float().mean().item()
            with open(out_path, "w") as f:
                json.dump({"epoch_s": statistics.mean(times[1:]), "acc": acc}, f)
    finally:
        dist.destroy_process_group()


def run_ddp(num_workers: int, seed: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "ddp.json")
        mp.spawn(
            _ddp_rank, args=(num_workers, free_port(), seed, args, out_path), nprocs=num_workers
        )
        with open(out_path) as f:
            return json.load(f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- report -----------------------------------------------------------------------------------
def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = report["workers"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    xs = range(len(workers))
    ax.bar([i - width / 2 for i in xs], report["miniray_samples_per_s"], width, label="miniray")
    ax.bar([i + width / 2 for i in xs], report["ddp_samples_per_s"], width, label="DDP (gloo)")
    ax.set_xticks(list(xs), [str(w) for w in workers])
    ax.set_xlabel("workers")
    ax.set_ylabel("training samples / s")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--sync-interval", type=int, default=1)
    parser.add_argument(
        "--seeds", type=int, default=3, help="runs per point (seeds 0..n-1); means reported"
    )
    parser.add_argument(
        "--syncs-per-epoch", type=int, default=1, help="parameter syncs within each epoch"
    )
    parser.add_argument("--backend", default="local")
    parser.add_argument("--plot", default=None, help="write a bar chart of samples/s here")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    num_train = len(load_dataset("digits")[0])
    print(
        f"digits: {num_train} training images/epoch, MLP 64-{args.hidden}-10, batch "
        f"{args.batch_size}/worker, {args.epochs} epochs, {os.cpu_count()} CPUs"
    )
    print(f"{'workers':>7} {'system':>8} {'epoch ms':>9} {'samples/s':>10} {'test acc':>15}")
    report: dict = {"workers": args.workers, "seeds": args.seeds}
    for key in ("samples_per_s", "acc", "acc_std"):
        for system in ("miniray", "ddp"):
            report[f"{system}_{key}"] = []
    for n in args.workers:
        for system, run in (("miniray", run_miniray), ("ddp", run_ddp)):
            # Test accuracy on 360 images moves by ~1 point between seeds: compare means.
            results = [run(n, seed, args) for seed in range(args.seeds)]
            epoch_s = statistics.mean(r["epoch_s"] for r in results)
            accs = [r["acc"] for r in results]
            acc, std = statistics.mean(accs), statistics.pstdev(accs)
            rate = num_train / epoch_s
            report[f"{system}_samples_per_s"].append(round(rate, 1))
            report[f"{system}_acc"].append(round(acc, 4))
            report[f"{system}_acc_std"].append(round(std, 4))
            print(
                f"{n:>7} {system:>8} {epoch_s * 1e3:>9.1f} {rate:>10.0f} {acc:>8.2%} ± {std:.2%}",
                flush=True,
            )
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
