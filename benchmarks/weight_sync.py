"""Weight sync trainer -> rollouter at Qwen2.5-0.5B size, through the product's own path.

    python benchmarks/weight_sync.py [--dtype bfloat16] [--repeats 5]

A model of Qwen2.5-0.5B's shape with random weights (no download) is saved with
``save_pretrained`` and loaded back by the real classes, placed as ``python -m miniray.rl.main``
places them: the trainer as a one-rank ``TrainerGroup`` (an actor), ``FullyAsyncRollouter`` in
an actor with its transformers engine, and the loop's ``WeightPublisher`` (async mode) between
them. Each round: one real optimizer step on a batch the rollouter generated, then the timed
publish until ``wait()`` returns with the rollouter running the new version; then the
rollouter generates with them and its behaviour log-probs are checked against the trainer's
weights (a local copy, not timed). The rounds alternate between the two ways a run publishes:

- ``after_step``: the step is answered (not timed), then from ``publish()``: the rank takes
  and checks its weights as the answer is copied out, the driver hands the ref to the
  synchronizer, whose ``swap_weights`` call loads it (a run's first sync, or any rollouter that
  does not take its weights by value).
- ``with_step`` (``publish_with_step_s``), as ``rl.loop`` runs every later sync: the weights
  call and the rollouter's swap go out with the step (``prepare``, ``send_step``, ``sent``); the
  clock starts when the step's answer reaches the driver (the step's end plus one message;
  the rank's copy starts right behind the step) and stops when ``wait()`` returns.

``memcpy_s`` is one copy of the model's bytes between preallocated tensors on one thread, the
issue's reference, measured in every round before its publish (medians over the timed rounds,
publishes and copies alike); ``memcpy_parallel_s`` the same copy by torch on every core (the
runtime copies large values into shared memory on up to 4 threads, ``MINIRAY_COPY_THREADS``).

Last line: {"publish_s": x, "publish_with_step_s": w, "memcpy_s": y, "ratio": x / y,
"ratio_with_step": w / y, "memcpy_parallel_s": z, "bytes": n, "phases_ms": {...}}
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import pathlib
import shutil
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


class Memcpy:
    """One copy of every unique tensor of ``weights`` between preallocated tensors, timed: the
    issue's reference. Measured in every round right before its publish (the machine's memory
    bandwidth drifts by 20-30% over a run here; a reference taken once at the start compared
    later publishes with another machine)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.sources = list({t.data_ptr(): t for t in weights.values()}.values())
        self.targets = [torch.empty_like(t) for t in self.sources]
        self.seconds(1)  # fault the destination pages in first

    def seconds(self, threads: int) -> float:
        """The median of 3 copies on ``threads`` torch threads."""
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                for dst, src in zip(self.targets, self.sources):
                    dst.copy_(src)
                times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(before)
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each way")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    root = pathlib.Path(tempfile.mkdtemp(prefix="weight_sync_"))
    atexit.register(shutil.rmtree, root, True)  # the model: ~1 GB a run
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
        "trainer": {"total_training_steps": 2 * args.repeats + 1},
    }
    torch.set_num_threads(1)
    cfg = as_rl_config(cfg)
    miniray.init(num_workers=1)
    publish_s: dict[str, list[float]] = {"after_step": [], "with_step": []}
    blocking_s, first_gen_s = [], []
    memcpy_s: list[float] = []  # the reference, measured in each round before its publish
    memcpy_parallel_s: list[float] = []
    try:
        group = TrainerGroup.start(cfg)
        rollouter = FullyAsyncRollouter.remote(cfg)
        publisher = WeightPublisher.for_run(cfg, group, rollouter)
        local = qwen25_05b_shaped(char_tokenizer(ArithmeticTask().alphabet), dtype=dtype)
        weights = group.get_weights()
        nbytes = sum(
            t.numel() * t.element_size() for t in {id(t): t for t in weights.values()}.values()
        )
        reference = Memcpy(weights)
        del weights
        params = sum(p.numel() for p in local.parameters())
        print(f"{params / 1e6:.0f} M parameters, {nbytes / 2**30:.2f} GiB", flush=True)
        for version in range(1, 2 * args.repeats + 2):
            batch = miniray.get(rollouter.generate_batch.remote(1, version - 1), timeout=600)
            memcpy_s.append(reference.seconds(1))
            memcpy_parallel_s.append(reference.seconds(len(os.sched_getaffinity(0))))
            # The first sync (after_step) learns that the rollouter takes its weights by value.
            way = "with_step" if version % 2 == 0 else "after_step"
            if way == "with_step":
                publisher.prepare(version)
                group.send_step(batch, version - 1)  # a real optimizer step: new weights
                publisher.sent(version)
                metrics = group.step_result()
            else:
                metrics = group.train_step(batch)
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
                if way == "after_step":
                    blocking_s.append(blocked - start)
                publish_s[way].append(done - start)
        stats = publisher.statistics()
        publisher.close()
        group.close()
    finally:
        miniray.shutdown()
    memcpy = statistics.median(memcpy_s[1:])  # the rounds timed (the first warms up)
    memcpy_parallel = statistics.median(memcpy_parallel_s[1:])
    publish = statistics.median(publish_s["after_step"])
    with_step = statistics.median(publish_s["with_step"])
    phases = {"take_and_check": round(statistics.median(blocking_s) * 1e3, 1)}
    phases.update(
        {
            p: round(stats[f"{p}_s_p50"] * 1e3, 1)
            for p in ("pause", "transfer", "load", "resume", "total")
        }
    )
    phases["first_generation"] = round(statistics.median(first_gen_s) * 1e3, 1)
    print(
        f"publish after the step (median of {args.repeats}): {publish * 1e3:.0f} ms, with the "
        f"step: {with_step * 1e3:.0f} ms; one memcpy: {memcpy * 1e3:.0f} ms (on every core: "
        f"{memcpy_parallel * 1e3:.0f} ms); ratios {publish / memcpy:.2f} and "
        f"{with_step / memcpy:.2f}; phases (ms, over both ways) {phases}"
    )
    print(
        json.dumps(
            {
                "publish_s": round(publish, 4),
                "publish_with_step_s": round(with_step, 4),
                "memcpy_s": round(memcpy, 4),
                "ratio": round(publish / memcpy, 3),
                "ratio_with_step": round(with_step / memcpy, 3),
                "memcpy_parallel_s": round(memcpy_parallel, 4),
                "bytes": nbytes,
                "phases_ms": phases,
            }
        )
    )


if __name__ == "__main__":
    main()
