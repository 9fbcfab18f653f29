#!/usr/bin/env bash
# End-to-end check of fully asynchronous training (seed 001's run_e2e_test.sh).
#
#   NUM_GPUS=0 ./run_e2e_test.sh                      # CPU: builds the tiny model itself
#   MODEL_ID=qwen MODEL_PATH=/models/Qwen2.5-0.5B-Instruct NUM_GPUS=2 ./run_e2e_test.sh
#
# MODEL_PATH must be a local directory (no downloads happen); without it a tiny Qwen2-style
# model is built and briefly pre-trained. The prompts are the arithmetic task, written as
# parquet. NUM_GPUS sets trainer/rollout.n_gpus_per_node (the transformers engine runs on the
# CPU; the vLLM adapter is not wired yet). Exits non-zero unless the run trained STEPS steps
# within the staleness bound and wrote its metrics.
set -euo pipefail
cd "$(dirname "$0")"
NUM_GPUS=${NUM_GPUS:-0}
MODEL_ID=${MODEL_ID:-tiny-qwen2}
MODEL_PATH=${MODEL_PATH:-}
STEPS=${STEPS:-8}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=${WORK_DIR:-$(mktemp -d -t miniray-e2e-XXXXXX)}
echo "e2e: model=$MODEL_ID gpus=$NUM_GPUS steps=$STEPS work=$WORK"

"$PY" - "$WORK" "$MODEL_PATH" <<'PYEOF'
import pathlib, sys
from miniray.rl.demo import TASK, prepare
from miniray.rl.tasks import write_prompts
work, model_path = pathlib.Path(sys.argv[1]), sys.argv[2]
if model_path:
    write_prompts(TASK.rows(2000), work / "train.parquet")
    write_prompts(TASK.rows(50, split="test"), work / "test.parquet")
else:
    prepare(work, pretrain_steps=25, seed=0)
PYEOF
MODEL_PATH=${MODEL_PATH:-$WORK/model}

"$PY" -m miniray.rl.main --config-name=e2e_minimal \
    "data.train_files=$WORK/train.parquet" \
    "data.val_files=$WORK/test.parquet" \
    "actor_rollout_ref.model.path=$MODEL_PATH" \
    "data.max_prompt_length=32" \
    "data.max_response_length=8" \
    "trainer.total_training_steps=$STEPS" \
    "trainer.n_gpus_per_node=$NUM_GPUS" \
    "rollout.n_gpus_per_node=$NUM_GPUS" \
    "trainer.default_local_dir=$WORK/run" | tee "$WORK/out.log"

"$PY" - "$WORK" "$STEPS" <<'PYEOF'
import json, pathlib, sys
work, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
summary = json.loads((work / "out.log").read_text().strip().splitlines()[-1])
metrics = (work / "run" / "metrics.jsonl").read_text().splitlines()
problems = []
if summary["steps"] != steps:
    problems.append(f"trained {summary['steps']} steps, expected {steps}")
if summary["max_age"] > 3:
    problems.append(f"trained on a sample {summary['max_age']} versions old (bound 3)")
if len(metrics) != steps:
    problems.append(f"metrics.jsonl has {len(metrics)} lines, expected {steps}")
if summary["mode"] != "async":
    problems.append(f"mode is {summary['mode']}")
if problems:
    sys.exit("E2E FAILED: " + "; ".join(problems))
print(f"E2E PASSED: {summary}")
PYEOF
