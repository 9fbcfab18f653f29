"""Train the 2-D mixture-of-Gaussians GAN, alone or data-parallel through the parameter server.

python -m ml.train --mode distributed --workers 4 --epochs 10
python -m ml.train --mode local --epochs 10
"""

from __future__ import annotations

import argparse
import time

import miniray
from miniray.ps import create_parameter_server
from ml.distributed_gan import GAN, GANWorker, load_generator, quality

TIMEOUT_S = 120


def train_local(epochs: int, steps: int, seed: int) -> tuple[float, int]:
    gan = GAN(seed=seed)
    for epoch in range(epochs):
        losses = gan.train_steps(steps)
        hq, modes = quality(gan.sample(2000))
        print(
            f"epoch {epoch + 1:3d}  loss_d {losses['loss_d']:.3f}  loss_g {losses['loss_g']:.3f}  "
            f"high-quality {hq:6.1%}  modes {modes}/8"
        )
    return quality(gan.sample(2000))


def train_distributed(
    epochs: int,
    steps: int,
    sync_every: int,
    num_workers: int,
    strategy: str,
    seed: int,
    backend: str | None,
) -> tuple[float, int]:
    miniray.init(backend=backend, num_workers=num_workers)
    try:
        ps = create_parameter_server(strategy)
        workers = [GANWorker.remote(i, seed) for i in range(num_workers)]
        # Start from one set of weights, as data-parallel training does.
        miniray.get(ps.sync_from_workers.remote(workers), timeout=TIMEOUT_S)
        for epoch in range(epochs):
            # Local steps between syncs: GAN replicas drift apart fast, so sync often.
            for done in range(0, steps, sync_every):
                chunk = min(sync_every, steps - done)
                refs = [w.train_epoch.remote(chunk) for w in workers]
                losses = miniray.get(refs, timeout=TIMEOUT_S)
                result = miniray.get(ps.sync_from_workers.remote(workers), timeout=TIMEOUT_S)
            gan = load_generator(miniray.get(ps.pull_weights.remote(), timeout=TIMEOUT_S))
            hq, modes = quality(gan.sample(2000))
            loss_d = sum(r["loss_d"] for r in losses) / len(losses)
            loss_g = sum(r["loss_g"] for r in losses) / len(losses)
            print(
                f"epoch {epoch + 1:3d}  loss_d {loss_d:.3f}  loss_g {loss_g:.3f}  "
                f"high-quality {hq:6.1%}  modes {modes}/8  ps version {result.version} "
                f"({len(result.included)}/{num_workers} workers, sync {result.duration_s * 1e3:.0f} ms)"
            )
        stats = miniray.get(ps.get_stats.remote(), timeout=TIMEOUT_S)
        print(
            f"parameter server: {stats['strategy']}, version {stats['version']}, {stats['num_syncs']} syncs"
        )
        return hq, modes
    finally:
        miniray.shutdown()


def main(argv: list[str] | None = None) -> tuple[float, int]:
    parser = argparse.ArgumentParser(description="2-D mixture-of-Gaussians GAN")
    parser.add_argument("--mode", choices=["local", "distributed"], default="distributed")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="training steps per epoch")
    parser.add_argument("--sync-every", type=int, default=20, help="local steps between syncs")
    parser.add_argument("--strategy", default="average")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="miniray backend (default: local)")
    args = parser.parse_args(argv)
    if min(args.workers, args.epochs, args.steps, args.sync_every) < 1:
        parser.error("--workers, --epochs, --steps and --sync-every must be >= 1")
    start = time.perf_counter()
    if args.mode == "local":
        hq, modes = train_local(args.epochs, args.steps, args.seed)
    else:
        hq, modes = train_distributed(
            args.epochs,
            args.steps,
            args.sync_every,
            args.workers,
            args.strategy,
            args.seed,
            args.backend,
        )
    print(f"final: high-quality {hq:.1%}, modes {modes}/8, {time.perf_counter() - start:.1f}s")
    return hq, modes


if __name__ == "__main__":
    main()
