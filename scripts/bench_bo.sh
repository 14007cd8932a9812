#!/usr/bin/env bash
# Benchmark: ckmerge's Bayesian optimiser against random search, scikit-optimize
# (gp_hedge, q = 1 and 4), Optuna (GPSampler, TPE) and bayes_opt, in one run: Forrester, Branin,
# Hartmann-3/6, and the real merge landscapes of tests/fixtures/trajectory (lambda between
# adjacent checkpoints; weights over the last three), 20 seeds, 20 evaluations, q = 1 and 4,
# and asynchronously with 4 workers (ckmerge and Optuna's GPSampler).
# Writes a Markdown table to stdout and docs/bench_bo.png.
#   RETABULATE=1  recompute tests/fixtures/trajectory/landscapes.json with the evaluator
#   BENCH_SEEDS=N seeds per optimiser and problem (default 20; medians over 20 seeds move
#                 by about the gaps between optimisers, so compare variants with 100)
#   BENCH_SEED0=K first seed (default 0), to check a choice made on seeds 0.. on fresh ones
#   BENCH_ONLY=a,b only the problems whose names contain one of these (e.g. hartmann)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/peers-venv.sh | tail -n 1)
"$venv/bin/python" -c "import skopt, optuna, bayes_opt, matplotlib" 2>/dev/null \
  || "$venv/bin/pip" install -q scikit-optimize optuna bayesian-optimization matplotlib
cargo build --release --quiet --example bench_bo
bin=target/release/examples/bench_bo
land=tests/fixtures/trajectory/landscapes.json
if [ ! -f "$land" ] || [ "${RETABULATE:-0}" = 1 ]; then
  "$bin" tabulate "$land"
fi
out=$(mktemp -d)
"$bin" run "$land" "$out/rust.json"
# The peers in two processes, one per core.
"$venv/bin/python" scripts/bench/bench_bo.py "$land" "$out/py-skopt.json" skopt-gp_hedge,skopt-gp_hedge-q4 &
"$venv/bin/python" scripts/bench/bench_bo.py "$land" "$out/py-rest.json" optuna-gp,optuna-gp-q4,optuna-gp-async4,optuna-tpe,bayes_opt
wait
mkdir -p docs
"$venv/bin/python" scripts/bench/bo_report.py "$out/rust.json" docs/bench_bo.png "$out/py-skopt.json" "$out/py-rest.json"
