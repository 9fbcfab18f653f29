"""A GAN with miniray.train: the seed's GANTrainer on a 2-D mixture of 8 Gaussians.

Each worker owns a generator and a discriminator and a shard of a fixed data set of points
drawn from 8 Gaussians on a circle (the classic mode-collapse benchmark). The parameter server
averages both networks every ``sync_interval`` epochs. At the end the global generator draws
samples; the script reports how many of the 8 modes it covers and saves a PNG of them next to
the real data.

    python examples/train_gan.py                         # 4 workers, 30 epochs
    python examples/train_gan.py --workers 2 --epochs 10 --png gan.png --backend inline
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn

import miniray
from miniray.train import DataParallelTrainer

NUM_MODES = 8
RADIUS = 2.0
STD = 0.05
NUM_POINTS = 16384


def mixture(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    angle = torch.randint(0, NUM_MODES, (n,), generator=gen).float() * (2 * math.pi / NUM_MODES)
    centers = torch.stack([RADIUS * torch.cos(angle), RADIUS * torch.sin(angle)], dim=1)
    return centers + STD * torch.randn(n, 2, generator=gen)


def quality(samples: torch.Tensor) -> tuple[float, int]:
    """(share of samples within 3 std of a mode, modes that hold >= 1 % of the samples)."""
    angle = torch.arange(NUM_MODES).float() * (2 * math.pi / NUM_MODES)
    centers = torch.stack([RADIUS * torch.cos(angle), RADIUS * torch.sin(angle)], dim=1)
    nearest = torch.cdist(samples, centers).min(dim=1)
    good = nearest.values < 3 * STD
    counts = torch.bincount(nearest.indices[good], minlength=NUM_MODES)
    return float(good.float().mean()), int((counts >= 0.01 * len(samples)).sum())


def mlp(inp: int, out: int, seed: int, hidden: int = 128) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(inp, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out),
    )
    # PyTorch's default init from our own generator, not torch.manual_seed: on the inline
    # backend workers are threads sharing torch's global RNG and would interleave.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
    return model


@miniray.remote
class GANWorker:
    """One replica; ``get_weights`` is the generator's parameters, then the discriminator's."""

    def __init__(self, worker_id, latent_dim, lr):
        torch.set_num_threads(1)
        self.latent_dim = latent_dim
        self.g = mlp(latent_dim, 2, seed=2 * worker_id)
        self.d = mlp(2, 1, seed=2 * worker_id + 1)
        # beta1 = 0.5: the usual GAN setting; the default 0.9 oscillates more.
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=lr, betas=(0.5, 0.999))
        self.gen = torch.Generator().manual_seed(100 + worker_id)
        self.data = mixture(NUM_POINTS, seed=0)
        self.batch_size = 128

    def load_data_shard(self, shard_id, num_shards, batch_size=128, **kwargs):
        self.data = self.data[shard_id::num_shards]
        self.batch_size = batch_size

    def train_epoch(self, epoch):
        bce = nn.functional.binary_cross_entropy_with_logits
        for idx in torch.randperm(len(self.data), generator=self.gen).split(self.batch_size):
            real = self.data[idx]
            n = len(real)
            fake = self.g(torch.randn(n, self.latent_dim, generator=self.gen))
            ones, zeros = torch.ones(n, 1), torch.zeros(n, 1)
            d_loss = bce(self.d(real), ones) + bce(self.d(fake.detach()), zeros)
            self.opt_d.zero_grad()
            d_loss.backward()
            self.opt_d.step()
            g_loss = bce(self.d(fake), ones)  # the non-saturating generator loss
            self.opt_g.zero_grad()
            g_loss.backward()
            self.opt_g.step()
        return {"g_loss": g_loss.item(), "d_loss": d_loss.item()}

    def get_weights(self):
        return [p.detach().clone() for p in [*self.g.parameters(), *self.d.parameters()]]

    def set_weights(self, weights):
        with torch.no_grad():
            for p, w in zip([*self.g.parameters(), *self.d.parameters()], weights):
                p.copy_(w)

    def sample(self, n, seed=0):
        with torch.no_grad():
            return self.g(
                torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(seed))
            )


class GANTrainer(DataParallelTrainer):
    """The seed's example 1, as written (``**options`` passes trainer options through)."""

    def __init__(self, num_workers=4, latent_dim=100, lr=0.0002, sync_interval=5, **options):
        super().__init__(num_workers=num_workers, sync_interval=sync_interval, **options)
        self.latent_dim = latent_dim
        self.lr = lr

    def create_worker(self, worker_id, **kwargs):
        return GANWorker.remote(worker_id, self.latent_dim, self.lr)

    def on_epoch_end(self, epoch, result, **kwargs):
        super().on_epoch_end(epoch, result, **kwargs)
        print(f"  G_loss: {result['g_loss']:.4f}, D_loss: {result['d_loss']:.4f}")


def save_png(samples: torch.Tensor, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    real = mixture(2000, seed=1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(real[:, 0], real[:, 1], s=2, alpha=0.3, label="real")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, label="generated")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--sync-interval", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--png", default="gan_samples.png")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with GANTrainer(
        num_workers=args.workers,
        latent_dim=args.latent_dim,
        lr=args.lr,
        sync_interval=args.sync_interval,
        backend=args.backend,
    ) as trainer:
        trainer.train(epochs=args.epochs, batch_size=args.batch_size)
        # Training ends with a sync, so worker 0 holds the global generator.
        samples = miniray.get(trainer.workers[0].sample.remote(2000), timeout=60)
    high_quality, modes = quality(samples)
    title = f"{args.workers} workers, {args.epochs} epochs: {modes}/8 modes"
    save_png(samples, args.png, title)
    print(
        f"modes covered {modes}/{NUM_MODES}, high-quality samples {high_quality:.1%}, "
        f"{time.perf_counter() - start:.1f} s; samples plotted in {args.png}"
    )
    return {"high_quality": high_quality, "modes": modes, "samples": samples}


if __name__ == "__main__":
    main()
