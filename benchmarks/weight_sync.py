"""Weight sync trainer -> rollouter at Qwen2.5-0.5B size, through the product's own path.

    python benchmarks/weight_sync.py [--dtype bfloat16] [--repeats 3]

A model of Qwen2.5-0.5B's shape with random weights (no download) is saved with
``save_pretrained`` and loaded back by the real classes: ``FullyAsyncTrainer`` in the driver,
``FullyAsyncRollouter`` in an actor with its transformers engine, and the loop's publishing
(``weight_publisher.weights_of`` + ``put`` into a ``PublishedWeights`` snapshot) feeding the
``UnifiedParameterSynchronizer``, as a run does. Each round: one real optimizer step (not
timed in the ratio), then the timed publish = take the weights (the one copy, into shared
memory) + sync (pause, transfer, load, resume), then the rollouter generates with them; its
behaviour log-prob is checked against the trainer's.

``memcpy_s`` is one copy of the model's bytes between preallocated tensors, the floor.

Last line: {"publish_s": x, "memcpy_s": y, "ratio": x / y, "bytes": n, "phases_ms": {...}}
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import torch

import miniray
from miniray.rl.engines.hf import sequence_logprobs
from miniray.rl.models import char_tokenizer, qwen25_05b_shaped, save
from miniray.rl.param_sync import UnifiedParameterSynchronizer
from miniray.rl.rollouter import FullyAsyncRollouter
from miniray.rl.tasks import ArithmeticTask, write_prompts
from miniray.rl.trainer import FullyAsyncTrainer
from miniray.rl.weight_publisher import PublishedWeights, check_finite_weights, weights_of


def write_model(root: pathlib.Path, dtype: torch.dtype) -> pathlib.Path:
    tokenizer = char_tokenizer(ArithmeticTask().alphabet)
    return save(qwen25_05b_shaped(tokenizer, dtype=dtype), tokenizer, root / "model")


def memcpy_seconds(weights: dict[str, torch.Tensor]) -> float:
    unique = list({t.data_ptr(): t for t in weights.values()}.values())
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
    dtype = getattr(torch, args.dtype)
    root = pathlib.Path(tempfile.mkdtemp(prefix="weight_sync_"))
    print(f"writing a {args.dtype} model of Qwen2.5-0.5B's shape to {root} ...", flush=True)
    path = write_model(root, dtype)
    write_prompts(ArithmeticTask().rows(16), root / "train.jsonl")
    cfg = {
        "data": {
            "train_files": [str(root / "train.jsonl")],
            "train_batch_size": 1,
            "max_prompt_length": 16,
            "max_response_length": 1,
        },
        "actor_rollout_ref": {
            "model": {"path": str(path), "dtype": args.dtype},
            "actor": {"optim": {"lr": 1e-4}},
            "rollout": {"n": 1, "temperature": 1.0},
        },
        "async_training": {"sync_timeout": 600.0, "max_sync_retries": 0, "max_queue_size": 4},
        "trainer": {"total_training_steps": args.repeats + 1},
    }
    torch.set_num_threads(1)
    trainer = FullyAsyncTrainer(cfg)
    nbytes = sum(
        t.numel() * t.element_size()
        for t in {t.data_ptr(): t for t in trainer.get_weights().values()}.values()
    )
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"{params / 1e6:.0f} M parameters, {nbytes / 2**30:.2f} GiB", flush=True)
    miniray.init(num_workers=1)
    publish_s, take_s, first_gen_s = [], [], []
    try:
        rollouter = FullyAsyncRollouter.remote(cfg)
        published = PublishedWeights()
        sync = UnifiedParameterSynchronizer(cfg, trainer_actor=published, rollouter_actor=rollouter)
        for version in range(1, args.repeats + 2):
            batch = miniray.get(rollouter.generate_batch.remote(1, version - 1), timeout=600)
            metrics = trainer.train_step(batch)  # a real optimizer step: new weights
            start = time.perf_counter()
            weights = weights_of(trainer, copy=False)
            check_finite_weights(weights, version, version - 1, metrics)
            published.take(miniray.put(weights))
            taken = time.perf_counter()
            assert sync.sync_to_rollouter(version)
            done = time.perf_counter()
            (sample,) = miniray.get(rollouter.generate_batch.remote(1, version), timeout=600)[0]
            first_gen_s.append(time.perf_counter() - done)
            expected = sequence_logprobs(
                trainer.model, sample.prompt_token_ids, sample.response_token_ids
            )
            got = torch.tensor(sample.response_logprobs)
            assert torch.allclose(got, expected.float(), atol=0.05), (got, expected)
            if version > 1:  # the first sync warms the segment pool and the actor up
                take_s.append(taken - start)
                publish_s.append(done - start)
        stats = sync.get_statistics()
    finally:
        miniray.shutdown()
    memcpy = memcpy_seconds(trainer.get_weights())
    publish = statistics.median(publish_s)
    phases = {"take": round(statistics.median(take_s) * 1e3, 1)}
    phases.update(
        {p: round(stats[f"{p}_s_p50"] * 1e3, 1) for p in ("pause", "transfer", "load", "resume")}
    )
    phases["first_generation"] = round(statistics.median(first_gen_s) * 1e3, 1)
    print(
        f"publish (median of {args.repeats}): {publish * 1e3:.0f} ms; one memcpy: "
        f"{memcpy * 1e3:.0f} ms; ratio {publish / memcpy:.2f}; phases (ms) {phases}"
    )
    print(
        json.dumps(
            {
                "publish_s": round(publish, 4),
                "memcpy_s": round(memcpy, 4),
                "ratio": round(publish / memcpy, 3),
                "bytes": nbytes,
                "phases_ms": phases,
            }
        )
    )


if __name__ == "__main__":
    main()
