#!/usr/bin/env bash
# Benchmark: `ckmerge eval` against PyTorch (transformers, fp32, torch threads = cores)
# tokens/s on the same model, tokens and windows, one run: the tiny fixture Llama and a
# ~25M-parameter Llama (random weights) written by scripts/fixtures/make_trajectory.py.
#   CKMERGE_BENCH_MODEL  where the 25M model goes (default ~/.cache/ckmerge/bench-llama-25m)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/peers-venv.sh | tail -n 1)
model=${CKMERGE_BENCH_MODEL:-$HOME/.cache/ckmerge/bench-llama-25m}
cargo build --release --quiet
if [ ! -f "$model/config.json" ]; then
  echo "making the 25M model once, outside the repository (the fixtures are not touched)" >&2
  "$venv/bin/python" scripts/fixtures/make_trajectory.py --bench-model "$model"
fi
"$venv/bin/python" scripts/bench/bench_eval.py --ckmerge "$PWD/target/release/ckmerge" \
  --data tests/fixtures/trajectory/data/heldout.txt --batch 8 --repeats 3 \
  --model fixture-llama=tests/fixtures/trajectory/llama/step-1500 --seq-len 128 \
  --model fixture-neox=tests/fixtures/trajectory/neox/step-1500 --seq-len 128 \
  --model llama-25m="$model" --seq-len 512
