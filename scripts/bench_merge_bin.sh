#!/usr/bin/env bash
# Benchmark: `ckmerge merge` from pytorch_model.bin inputs against the same merge from
# safetensors inputs, and PyTorch (torch.load with mmap, the same weighted sum,
# save_file) as the peer, in one run. Two synthetic bf16 checkpoints (~1.1 GB each by
# default). Results go to stdout; copy the table into BENCHMARKS.md.
#   CKMERGE_BENCH_DIR  where checkpoints and outputs go (default ~/.cache/ckmerge/bench-bin)
#   RUNS               warm runs per variant (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/peers-venv.sh | tail -n 1)
dir=${CKMERGE_BENCH_DIR:-$HOME/.cache/ckmerge/bench-bin}
cargo build --release --quiet
"$venv/bin/python" scripts/bench/bench_merge_bin.py --dir "$dir" --ckmerge "$PWD/target/release/ckmerge" \
  --runs "${RUNS:-3}" "$@"
