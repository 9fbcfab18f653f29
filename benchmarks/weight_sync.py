"""Weight sync trainer -> rollouter for a model of Qwen2.5-0.5B's size, on the local backend.

    python benchmarks/weight_sync.py [--dtype bfloat16] [--repeats 3]

The model is built locally from Qwen2.5-0.5B's configuration with random weights (no download).
The trainer lives in the driver, the rollouter in an actor process holding the same
architecture. One sync is ``UnifiedParameterSynchronizer.sync_to_rollouter``: pause, transfer
the state dict through shared memory, load it into the rollouter's model, resume. ``memcpy_s``
is one copy of the same bytes between preallocated tensors in one process, the floor.

Last line: {"sync_s": x, "memcpy_s": y, "bytes": n, "ratio": x / y, "phases_ms": {...}}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import miniray
from miniray.rl.param_sync import UnifiedParameterSynchronizer

QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}


def build(dtype: torch.dtype, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(dtype).eval()


class Trainer:
    def __init__(self, model):
        self.model = model

    def get_weights(self):
        return self.model.state_dict()


@miniray.remote(max_concurrency=4)
class Rollouter:
    """The rollout side of the protocol the synchronizer drives."""

    def __init__(self, dtype_name: str):
        torch.set_num_threads(1)
        self.model = build(getattr(torch, dtype_name), seed=1)
        self.version = 0

    def pause_rollout(self):
        return True

    def resume_rollout(self):
        return True

    def load_weights(self, weights, version):
        # The tensors arrive as private copy-on-write mappings of shared memory: take them as
        # the parameters (assign) instead of copying them once more.
        self.model.load_state_dict(weights, assign=True)
        self.model.tie_weights()  # assign replaced lm_head's Parameter: tie it to the embedding
        self.version = version
        return True

    def checksum(self):
        return float(sum(p.float().sum() for p in self.model.parameters()))


def memcpy_seconds(weights: dict[str, torch.Tensor]) -> float:
    unique = {t.data_ptr(): t for t in weights.values()}.values()
    targets = [torch.empty_like(t) for t in unique]
    for dst, src in zip(targets, unique):  # fault the destination pages in first
        dst.copy_(src)
    start = time.perf_counter()
    for dst, src in zip(targets, unique):
        dst.copy_(src)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"building a {args.dtype} model of Qwen2.5-0.5B's size ...", flush=True)
    trainer_model = build(dtype, seed=0)
    weights = trainer_model.state_dict()
    nbytes = sum(
        t.numel() * t.element_size() for t in {t.data_ptr(): t for t in weights.values()}.values()
    )
    params = sum(p.numel() for p in trainer_model.parameters())
    print(f"{params / 1e6:.0f} M parameters, {nbytes / 2**30:.2f} GiB", flush=True)
    miniray.init(num_workers=1)
    try:
        rollouter = Rollouter.remote(args.dtype)
        config = {"sync_timeout": 600.0, "max_sync_retries": 0}
        sync = UnifiedParameterSynchronizer(
            config, trainer_actor=Trainer(trainer_model), rollouter_actor=rollouter
        )
        sync.sync_to_rollouter(1)  # warm-up: the actor built its model; fresh segment pages
        seconds = []
        for version in range(2, 2 + args.repeats):
            with torch.no_grad():
                for p in trainer_model.parameters():
                    p.add_(1e-3)  # new weights each round, as after an optimizer step
            start = time.perf_counter()
            assert sync.sync_to_rollouter(version)
            seconds.append(time.perf_counter() - start)
        expected = float(sum(p.float().sum() for p in trainer_model.parameters()))
        got = miniray.get(rollouter.checksum.remote(), timeout=600)
        assert abs(got - expected) <= 1e-3 * max(1.0, abs(expected)), (got, expected)
        stats = sync.get_statistics()
    finally:
        miniray.shutdown()
    memcpy = memcpy_seconds(weights)
    sync_s = statistics.median(seconds)
    phases = {
        p: round(stats[f"{p}_s_p50"] * 1e3, 1) for p in ("pause", "transfer", "load", "resume")
    }
    print(
        f"sync (median of {args.repeats}): {sync_s * 1e3:.0f} ms; one memcpy: {memcpy * 1e3:.0f} ms; "
        f"ratio {sync_s / memcpy:.2f}; phases (ms) {phases}"
    )
    print(
        json.dumps(
            {
                "sync_s": round(sync_s, 4),
                "memcpy_s": round(memcpy, 4),
                "bytes": nbytes,
                "ratio": round(sync_s / memcpy, 3),
                "phases_ms": phases,
            }
        )
    )


if __name__ == "__main__":
    main()
