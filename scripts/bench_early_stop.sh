#!/usr/bin/env bash
# Early stopping (search.early_stop) against full scoring: the same searches run twice,
# with it off and on, on the fixture trajectories; per search, the tokens the trials
# scored and the best value found. Results in BENCHMARKS.md ("Early stopping").
#
#   scripts/bench_early_stop.sh [OUT.json]     # BENCH_SEEDS=3 by default; BENCH_CASES="task mix" selects cases
#   BENCH_MARGIN=0.001 scripts/bench_early_stop.sh   # early-stopped runs with search.early_stop_margin
#   BENCH_DATA=large scripts/bench_early_stop.sh     # ten times the held-out text (thousands of windows)
#   BENCH_TASK_ITEMS=3000 ...                        # the task mixture's task: N cloze items, not 400
#
# The looks, the alpha split and the minimum were set on the long/ simplex search (seed 0)
# and the fixtures' per-window NLLs; the llama/ and neox/ simplex searches and the lambda
# searches, and every other seed, were not looked at while choosing them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
out=${1:-target/bench-early-stop.json}
python3 scripts/bench/bench_early_stop.py target/release/ckmerge "$out"
