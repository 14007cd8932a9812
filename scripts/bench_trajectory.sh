#!/usr/bin/env bash
# Benchmark: searches over many checkpoints against the averages practitioners take
# (EMA, WMA, last-k windows, minus-sqrt, the uniform average), and against the Python
# peers on the same live objective (Optuna GP and TPE, scikit-optimize, CMA-ES, random),
# in one run. Trajectories: tests/fixtures/trajectory/{long,llama,neox} and, for
# confirmation on runs no default was chosen on, the directories in BENCH_UNSEEN
# (comma-separated; make them with scripts/fixtures/make_long_trajectory.py --out DIR).
# Writes Markdown to stdout (scripts/bench/trajectory_report.py).
#   BENCH_SEEDS=N seeds (default 20)   BENCH_ONLY=a,b trajectories whose names contain these
#   BENCH_PEERS=a,b peers to run (default all; empty: ckmerge only)
#   BENCH_PROBLEMS=a,b the peers' problems (default all: simplex4, simplex4_baselines,
#   ema_baselines, simplex_all_baselines)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example bench_trajectory
bin=target/release/examples/bench_trajectory
out=$(mktemp -d)
"$bin" run "$out/rust.json"
peers="$out/peers.json"
if [ -n "${BENCH_PEERS-x}" ]; then
  venv=$(scripts/peers-venv.sh | tail -n 1)
  "$venv/bin/python" -c "import skopt, optuna, cma" 2>/dev/null \
    || "$venv/bin/pip" install -q scikit-optimize optuna cma
  "$venv/bin/python" scripts/bench/bench_trajectory.py "$out/rust.json" "$bin" "$peers"
fi
python3 scripts/bench/trajectory_report.py "$out/rust.json" "$peers"
echo "raw results: $out" >&2
