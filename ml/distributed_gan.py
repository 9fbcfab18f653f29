"""A GAN on a 2-D mixture of Gaussians, trained by several workers synchronized by the PS.

The data is generated locally: 8 Gaussians on a circle (the classic mode-collapse benchmark).
Each worker owns a generator and a discriminator and its own sample stream; after every epoch
the parameter server averages both networks (``get_weights`` returns G's then D's parameters).
Quality is measured on the global generator: the share of samples within 3 sigma of a mode
("high quality") and how many of the 8 modes receive at least 1 % of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import miniray

NUM_MODES = 8
RADIUS = 2.0
STD = 0.05
LATENT = 2


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    modes = torch.randint(0, NUM_MODES, (n,), generator=generator)
    angle = modes.float() * (2 * math.pi / NUM_MODES)
    centers = torch.stack([RADIUS * torch.cos(angle), RADIUS * torch.sin(angle)], dim=1)
    return centers + STD * torch.randn(n, 2, generator=generator)


def mode_centers() -> torch.Tensor:
    angle = torch.arange(NUM_MODES).float() * (2 * math.pi / NUM_MODES)
    return torch.stack([RADIUS * torch.cos(angle), RADIUS * torch.sin(angle)], dim=1)


def quality(samples: torch.Tensor) -> tuple[float, int]:
    """(share of samples within 3 std of a mode, number of modes holding >= 1 % of samples)."""
    dist = torch.cdist(samples, mode_centers())
    nearest = dist.min(dim=1)
    good = nearest.values < 3 * STD
    counts = torch.bincount(nearest.indices[good], minlength=NUM_MODES)
    return float(good.float().mean()), int((counts >= 0.01 * len(samples)).sum())


def mlp(inp: int, out: int, generator: torch.Generator, hidden: int = 64) -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(inp, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out),
    )
    # Re-draw nn.Linear's default init from our own generator: the global RNG is shared by
    # every thread of the inline backend, so seeding it would not make a replica reproducible.
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
    return net


class GAN:
    """Generator + discriminator with the non-saturating GAN loss (plain, single process)."""

    def __init__(self, seed: int, lr: float = 1e-3):
        init = torch.Generator().manual_seed(seed)
        self.g = mlp(LATENT, 2, init)
        self.d = mlp(2, 1, init)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=lr, betas=(0.5, 0.999))
        self.rng = torch.Generator().manual_seed(seed + 12345)
        self.bce = nn.BCEWithLogitsLoss()

    def parameters(self) -> list[nn.Parameter]:
        return [*self.g.parameters(), *self.d.parameters()]

    def train_steps(self, steps: int, batch: int = 128) -> dict[str, float]:
        loss_d = loss_g = torch.tensor(0.0)
        for _ in range(steps):
            real = sample_data(batch, self.rng)
            fake = self.g(torch.randn(batch, LATENT, generator=self.rng))
            ones, zeros = torch.ones(batch, 1), torch.zeros(batch, 1)
            loss_d = self.bce(self.d(real), ones) + self.bce(self.d(fake.detach()), zeros)
            self.opt_d.zero_grad()
            loss_d.backward()
            self.opt_d.step()
            loss_g = self.bce(self.d(fake), ones)
            self.opt_g.zero_grad()
            loss_g.backward()
            self.opt_g.step()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item()}

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        with torch.no_grad():
            return self.g(torch.randn(n, LATENT, generator=torch.Generator().manual_seed(seed)))


@miniray.remote
class GANWorker:
    """One data-parallel GAN replica; the PS contract is get_weights/set_weights."""

    def __init__(self, worker_id: int, seed: int = 0):
        # Several workers share few cores: intra-op threads would only fight each other.
        torch.set_num_threads(1)
        self.gan = GAN(seed=seed * 100 + worker_id)

    def train_epoch(self, steps: int) -> dict[str, float]:
        return self.gan.train_steps(steps)

    def get_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.gan.parameters()]

    def set_weights(self, weights: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(self.gan.parameters(), weights):
                p.copy_(w)


def load_generator(weights: list[torch.Tensor]) -> GAN:
    gan = GAN(seed=0)
    with torch.no_grad():
        for p, w in zip(gan.parameters(), weights):
            p.copy_(w)
    return gan
