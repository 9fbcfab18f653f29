"""Parameter-server demo: every strategy, async push/pull, gradients, sharding, checkpoints.

Five workers fit the same linear regression on their own data shards (local SGD) and
synchronize through a parameter server every 10 local steps. Each section prints the loss of
the global weights on held-out data, so the strategies can be compared at a glance:

    python examples/parameter_server_demo.py               # default backend ('local')
    python examples/parameter_server_demo.py --backend inline
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn as nn

import miniray
from miniray.ps import create_parameter_server
from miniray.ps.deltas import pseudo_gradient

NUM_WORKERS = 5
DIM = 8
ROUNDS = 5
LOCAL_STEPS = 10
TIMEOUT_S = 60


def make_data(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    true_w = torch.arange(1, DIM + 1, dtype=torch.float32) / DIM
    x = torch.randn(n, DIM, generator=g)
    y = x @ true_w + 0.5 + 0.1 * torch.randn(n, generator=g)
    return x, y.unsqueeze(1)


@miniray.remote
class DemoWorker:
    """Trains a linear model on its own shard; a 'byzantine' worker reports garbage weights."""

    def __init__(self, worker_id: int):
        self.worker_id = worker_id
        self.model = nn.Linear(DIM, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.x, self.y = make_data(seed=worker_id)
        self.byzantine = False

    def set_byzantine(self, flag: bool) -> None:
        self.byzantine = flag

    def get_weights(self) -> list[torch.Tensor]:
        weights = [p.detach().clone() for p in self.model.parameters()]
        if self.byzantine:
            return [w * 0 + 100.0 for w in weights]
        return weights

    def set_weights(self, weights: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(self.model.parameters(), weights):
                p.copy_(w)

    def _loss(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.model(self.x[idx]), self.y[idx])

    def train(self, steps: int) -> float:
        g = torch.Generator().manual_seed(self.worker_id * 1000 + steps)
        loss = torch.tensor(0.0)
        for _ in range(steps):
            idx = torch.randint(0, len(self.x), (32,), generator=g)
            self.opt.zero_grad()
            loss = self._loss(idx)
            loss.backward()
            self.opt.step()
        return loss.item()

    def get_gradients(self) -> list[torch.Tensor]:
        self.opt.zero_grad()
        self._loss(torch.arange(len(self.x))).backward()
        return [p.grad.detach().clone() for p in self.model.parameters()]

    def async_round(self, ps, steps: int, delay_s: float) -> str:
        """Pull (version, weights), train, push a bf16 delta tagged with that version."""
        version, weights = miniray.get(ps.pull.remote(), timeout=TIMEOUT_S)
        self.set_weights(weights)
        self.train(steps)
        time.sleep(delay_s)  # a straggler
        delta = pseudo_gradient(weights, list(self.model.parameters()), torch.bfloat16)
        result = miniray.get(ps.push.remote(delta, version, self.worker_id), timeout=TIMEOUT_S)
        return result.status


def global_loss(weights: list[torch.Tensor]) -> float:
    x, y = make_data(seed=999, n=1024)
    return float(nn.functional.mse_loss(x @ weights[0].T + weights[1], y))


# (section, title, strategy, byzantine worker?, local steps per round, create_parameter_server kwargs)
SYNC_RUNS = [
    (1, "average", "average", False, LOCAL_STEPS, {}),
    (1, "weighted (by sample count)", "weighted", False, LOCAL_STEPS, {}),
    (1, "momentum (EMA, 0.5)", "momentum", False, LOCAL_STEPS, {"momentum": 0.5}),
    (1, "diloco (Nesterov, lr 0.7, mom 0.5)", "diloco", False, LOCAL_STEPS, {"momentum": 0.5}),
    (2, "average (breaks)", "average", True, LOCAL_STEPS, {}),
    (2, "median", "median", True, LOCAL_STEPS, {}),
    (2, "trimmed_mean (20%)", "trimmed_mean", True, LOCAL_STEPS, {}),
    (2, "krum (f=1)", "krum", True, LOCAL_STEPS, {"num_byzantine": 1}),
    (3, "average of gradients", "average", False, 0, {"mode": "gradients", "lr": 0.3}),
    (4, "average, num_shards=2", "average", False, LOCAL_STEPS, {"num_shards": 2}),
]
SECTIONS = {
    1: f"Synchronous strategies ({ROUNDS} rounds of {LOCAL_STEPS} local SGD steps)",
    2: "One worker sends garbage weights (all 100.0)",
    3: "Gradient aggregation (each round: full-batch gradients, server SGD lr 0.3)",
    4: "Sharding: parameters spread over 2 server actors",
}


def run_sync(title: str, ps, workers, initial, byzantine: bool, local_steps: int) -> None:
    miniray.get([w.set_weights.remote(initial) for w in workers], timeout=TIMEOUT_S)
    miniray.get(workers[-1].set_byzantine.remote(byzantine), timeout=TIMEOUT_S)
    stats = miniray.get(ps.get_stats.remote(), timeout=TIMEOUT_S)  # the server is up
    if stats["strategy"] == "WeightedStrategy":  # worker i has (i + 1) * 1000 samples
        refs = [ps.set_worker_weight.remote(i, (i + 1) * 1000) for i in range(len(workers))]
        miniray.get(refs, timeout=TIMEOUT_S)
    start = time.perf_counter()
    losses = []
    for _ in range(ROUNDS):
        if local_steps:
            miniray.get([w.train.remote(local_steps) for w in workers], timeout=TIMEOUT_S)
        miniray.get(ps.sync_from_workers.remote(workers), timeout=TIMEOUT_S)
        losses.append(global_loss(miniray.get(ps.pull_weights.remote(), timeout=TIMEOUT_S)))
    stats = miniray.get(ps.get_stats.remote(), timeout=TIMEOUT_S)
    curve = " ".join(f"{v:8.3g}" for v in losses)
    print(
        f"  {title:<34} loss/round: {curve}   v={stats['version']} "
        f"({stats['strategy']}, {time.perf_counter() - start:.2f}s)"
    )
    miniray.get(workers[-1].set_byzantine.remote(False), timeout=TIMEOUT_S)
    miniray.kill(ps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="local (default), inline or ray")
    args = parser.parse_args()
    t0 = time.perf_counter()
    miniray.init(backend=args.backend, num_workers=2)
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in nn.Linear(DIM, 1).parameters()]
    workers = [DemoWorker.remote(i) for i in range(NUM_WORKERS)]
    # Start every server now: actor processes then boot in parallel instead of one by one.
    servers = [create_parameter_server(strategy, **kw) for _, _, strategy, _, _, kw in SYNC_RUNS]
    async_ps = create_parameter_server("average", staleness_bound=1)
    restarted = create_parameter_server("average", staleness_bound=1)
    print(f"miniray parameter server demo: {NUM_WORKERS} workers, backend={miniray.backend_name()}")
    print(f"initial loss of the global weights: {global_loss(initial):.3f}")

    section = 0
    for (number, title, _, byzantine, steps, _), ps in zip(SYNC_RUNS, servers):
        if number != section:
            section = number
            print(f"\n{number}. {SECTIONS[number]}")
        run_sync(title, ps, workers, initial, byzantine, steps)

    print("\n5. Asynchronous push/pull (SSP, staleness bound 1, bf16 deltas, worker 4 slow)")
    print("   a push more than 1 version old is rejected; that worker pulls again next round")
    ps = async_ps
    miniray.get(ps.initialize.remote(initial), timeout=TIMEOUT_S)
    for _ in range(ROUNDS):
        refs = [
            w.async_round.remote(ps, LOCAL_STEPS, 0.3 if i == NUM_WORKERS - 1 else 0.0)
            for i, w in enumerate(workers)
        ]
        miniray.get(refs, timeout=TIMEOUT_S)
    stats = miniray.get(ps.get_stats.remote(), timeout=TIMEOUT_S)
    weights = miniray.get(ps.pull_weights.remote(), timeout=TIMEOUT_S)
    print(
        f"  pushes applied={stats['num_pushes_applied']} rejected as stale="
        f"{stats['num_pushes_rejected_stale']}  version={stats['version']}  "
        f"loss={global_loss(weights):.3g}"
    )

    print("\n6. Checkpoint and restart")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ps-ckpt")
        miniray.get(ps.save_checkpoint.remote(path), timeout=TIMEOUT_S)
        version = miniray.get(restarted.load_checkpoint.remote(path), timeout=TIMEOUT_S)
        restored = miniray.get(restarted.pull_weights.remote(), timeout=TIMEOUT_S)
        same = all(torch.equal(a, b) for a, b in zip(weights, restored))
        print(f"  restored version {version}, weights identical: {same}")

    miniray.shutdown()
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
