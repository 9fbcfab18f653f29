"""Weight sync trainer -> rollouter at Qwen2.5-0.5B size, through the product's own path.

    python benchmarks/weight_sync.py [--dtype bfloat16] [--repeats 3]

A model of Qwen2.5-0.5B's shape with random weights (no download) is saved with
``save_pretrained`` and loaded back by the real classes, placed as ``python -m miniray.rl.main``
places them: the trainer as a one-rank ``TrainerGroup`` (an actor), ``FullyAsyncRollouter`` in
an actor with its transformers engine, and the loop's ``WeightPublisher`` (async mode: take and
check the weights, snapshot, sync in the background) between them. Each round: one real
optimizer step on a batch the rollouter generated (not timed), then the timed publish: from
``publish()`` until ``wait()`` returns with the rollouter running the new version (take,
check, stage, pause, transfer, load, resume); then the rollouter generates with them and its
behaviour log-probs are checked against the trainer's weights (a local copy, not timed).

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
from miniray.rl.rollouter import FullyAsyncRollouter, as_rl_config
from miniray.rl.tasks import ArithmeticTask, write_prompts
from miniray.rl.trainer_group import TrainerGroup
from miniray.rl.weight_publisher import WeightPublisher


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
    cfg = as_rl_config(cfg)
    miniray.init(num_workers=1)
    publish_s, blocking_s, first_gen_s = [], [], []
    try:
        group = TrainerGroup.start(cfg)
        rollouter = FullyAsyncRollouter.remote(cfg)
        publisher = WeightPublisher.for_run(cfg, group, rollouter)
        local = qwen25_05b_shaped(char_tokenizer(ArithmeticTask().alphabet), dtype=dtype)
        weights = group.get_weights()
        nbytes = sum(
            t.numel() * t.element_size() for t in {id(t): t for t in weights.values()}.values()
        )
        memcpy = memcpy_seconds(weights)
        del weights
        params = sum(p.numel() for p in local.parameters())
        print(f"{params / 1e6:.0f} M parameters, {nbytes / 2**30:.2f} GiB", flush=True)
        for version in range(1, args.repeats + 2):
            batch = miniray.get(rollouter.generate_batch.remote(1, version - 1), timeout=600)
            metrics = group.train_step(batch)  # a real optimizer step: new weights
            start = time.perf_counter()
            publisher.publish(version, step=version, metrics=metrics)
            blocked = time.perf_counter()
            publisher.wait()
            done = time.perf_counter()
            group.set_version(version)
            (sample,) = miniray.get(rollouter.generate_batch.remote(1, version), timeout=600)[0]
            first_gen_s.append(time.perf_counter() - done)
            local.load_state_dict(group.get_weights(), strict=False)
            expected = sequence_logprobs(local, sample.prompt_token_ids, sample.response_token_ids)
            got = torch.tensor(sample.response_logprobs)
            assert torch.allclose(got, expected.float(), atol=0.05), (got, expected)
            if version > 1:  # the first sync warms the segment pools and the actors up
                blocking_s.append(blocked - start)
                publish_s.append(done - start)
        stats = publisher.statistics()
        publisher.close()
        group.close()
    finally:
        miniray.shutdown()
    publish = statistics.median(publish_s)
    phases = {"take_and_check": round(statistics.median(blocking_s) * 1e3, 1)}
    phases.update(
        {
            p: round(stats[f"{p}_s_p50"] * 1e3, 1)
            for p in ("pause", "transfer", "load", "resume", "total")
        }
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
