"""Memory of a real-sized RL run: a Qwen2.5-0.5B-shaped model through the CLI, async mode.

    python benchmarks/rl_memory.py [--prompts 8] [--n 4] [--response-length 512] [--steps 2]
                                   [--micro-batch 4] [--dtype bfloat16] [--limit-gib 16]

A model of Qwen2.5-0.5B's shape (vocabulary 151,936, random weights: nothing is downloaded) is
saved with ``save_pretrained`` and trained by ``python -m miniray.rl.main`` exactly as a user
runs it (``--config-name=e2e_minimal`` plus overrides), with ``prompts x n`` responses of up
to ``response-length`` tokens per step (a random model rarely samples EOS: they run to the
limit). While it runs, the benchmark samples the whole process tree every 0.5 s: the sum of
RSS (shared-memory pages count once per process that maps them, so this overstates) and of
PSS (each shared page split between its mappers: the tree's real footprint).

The peak per phase comes from the run itself: each role does one phase in its own process
and reports that process's peak RSS (``ru_maxrss``): the rollouter generates, the trainer rank
updates, the driver publishes (its snapshot of the weights in shared memory).

Last line: {"ok", "steps", "peak_rss_gib", "peak_pss_gib", "wall_s", "tokens_per_s",
"phases_peak_rss_gib": {"generate", "update", "publish"}, "limit_gib"}; ok means the run
completed its steps and the tree's peak sum of RSS (the stricter) stayed at or under
``limit-gib``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

from miniray.rl.models import char_tokenizer, qwen25_05b_shaped, save
from miniray.rl.tasks import ArithmeticTask, write_prompts

GIB = 2**30


class TreeSampler:
    """Peak sum of RSS and PSS over a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.5):
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.every_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--limit-gib", type=float, default=16.0)
    args = parser.parse_args()

    root = pathlib.Path(tempfile.mkdtemp(prefix="rl_memory_"))
    atexit.register(shutil.rmtree, root, True)  # the model: ~1 GB a run
    tokenizer = char_tokenizer(ArithmeticTask().alphabet)
    torch.manual_seed(0)
    model = qwen25_05b_shaped(tokenizer, dtype=getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    path = save(model, tokenizer, root / "model")
    del model
    write_prompts(ArithmeticTask().rows(4 * args.prompts * args.steps), root / "train.parquet")
    print(f"{params / 1e6:.0f} M parameters ({args.dtype}) at {path}", flush=True)
    command = [
        sys.executable,
        "-m",
        "miniray.rl.main",
        "--config-name=e2e_minimal",
        f"data.train_files=[{root / 'train.parquet'}]",
        f"actor_rollout_ref.model.path={path}",
        f"actor_rollout_ref.model.dtype={args.dtype}",
        f"data.train_batch_size={args.prompts}",
        f"data.max_response_length={args.response_length}",
        "data.max_prompt_length=32",
        f"actor_rollout_ref.rollout.n={args.n}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.micro_batch}",
        f"trainer.total_training_steps={args.steps}",
        f"trainer.default_local_dir={root / 'runs'}",
        "async_training.mode=async",
        f"async_training.max_queue_size={max(100, args.prompts)}",
        # A CPU generates 32 x 512 tokens of a 0.5B model in minutes, not the default 30 s.
        "async_training.generation_timeout=7200",
        "async_training.sync_timeout=1800",
    ]
    print(" ".join(command), flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines = []
    with TreeSampler(proc.pid) as sampler:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
    wall_s = time.monotonic() - start
    summary: dict = {}
    for line in reversed(lines):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    steps = int(summary.get("steps", 0))
    tokens = float(summary.get("response_tokens", 0))
    peaks = summary.get("peak_rss_gib", {})
    phases = {
        "generate": peaks.get("rollouter"),
        "update": peaks.get("trainer"),
        "publish": peaks.get("driver"),
    }
    peak_rss, peak_pss = sampler.peak_rss / GIB, sampler.peak_pss / GIB
    print(f"\n{'phase (process)':<28}{'peak RSS GiB':>14}")
    for phase, value in phases.items():
        shown = "-" if value is None else f"{value:.2f}"
        print(f"{phase:<28}{shown:>14}")
    print(f"{'whole tree, sum of RSS':<28}{peak_rss:>14.2f}   (limit {args.limit_gib:g})")
    print(f"{'whole tree, sum of PSS':<28}{peak_pss:>14.2f}")
    ok = proc.returncode == 0 and steps == args.steps and peak_rss <= args.limit_gib
    result = {
        "ok": ok,
        "steps": steps,
        "peak_rss_gib": round(peak_rss, 2),
        "peak_pss_gib": round(peak_pss, 2),
        "wall_s": round(wall_s, 1),
        "tokens_per_s": round(tokens / max(1e-9, float(summary.get("wall_s", wall_s))), 2),
        "phases_peak_rss_gib": phases,
        "limit_gib": args.limit_gib,
        "returncode": proc.returncode,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
