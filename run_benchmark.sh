#!/usr/bin/env bash
# Sweeps of fully asynchronous RL (benchmarks/rl_sweep.py): staleness threshold, queue size,
# generation interval, sync vs async, the CPU split between trainer and rollouter, and
# pause/resume latency. Writes benchmark_results_<YYYYmmdd_HHMMSS>/ with performance_report.md
# (tables and PNG plots), summary.txt and logs/ (one log per run).
#
#   ./run_benchmark.sh              # QUICK=1 (default): a few minutes on a laptop CPU
#   QUICK=0 ./run_benchmark.sh      # longer runs, more trials, three CPU splits
#   SIZE=tiny ./run_benchmark.sh    # the smallest run (what the test uses)
#   OUT_DIR=somewhere ./run_benchmark.sh
set -euo pipefail

cd "$(dirname "$0")"
PYTHON=python3
if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
fi

if [[ -n "${SIZE:-}" ]]; then
    size="$SIZE"
elif [[ "${QUICK:-1}" == "0" ]]; then
    size=full
else
    size=quick
fi
case "$size" in
    tiny|quick|full) ;;
    *) echo "SIZE=$size is invalid: must be tiny, quick or full" >&2; exit 2 ;;
esac

out="${OUT_DIR:-benchmark_results_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$out/logs"
echo "run_benchmark.sh: size=$size, writing $out/"
# The driver's own output goes to the logs as well, so a failed sweep leaves its traceback.
"$PYTHON" benchmarks/rl_sweep.py --out "$out" --size "$size" 2>&1 | tee "$out/logs/rl_sweep.out"
