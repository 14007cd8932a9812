#!/usr/bin/env bash
# Benchmark: multiple-choice scoring, `ckmerge eval --task` against lm-evaluation-harness's
# Hugging Face model (fp32, CPU, torch threads = cores) on the same requests, one run: the
# fixture task on the fixture Llama and NeoX and on the ~25M-parameter Llama of
# scripts/bench_eval.sh (random weights; made once outside the repository).
#   CKMERGE_BENCH_MODEL  where the 25M model is (default ~/.cache/ckmerge/bench-llama-25m)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/peers-venv.sh | tail -n 1)
"$venv/bin/python" -c "import lm_eval" 2>/dev/null || "$venv/bin/pip" install -q lm_eval
model=${CKMERGE_BENCH_MODEL:-$HOME/.cache/ckmerge/bench-llama-25m}
cargo build --release --quiet
if [ ! -f "$model/config.json" ]; then
  echo "making the 25M model once, outside the repository (the fixtures are not touched)" >&2
  "$venv/bin/python" scripts/fixtures/make_trajectory.py --bench-model "$model"
fi
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$venv/bin/python" scripts/bench/bench_choice.py \
  --ckmerge "$PWD/target/release/ckmerge" --task tests/fixtures/trajectory/tasks/cloze.jsonl \
  --model fixture-llama=tests/fixtures/trajectory/llama/step-1500 \
  --model fixture-neox=tests/fixtures/trajectory/neox/step-1500 \
  --model llama-25m="$model"
