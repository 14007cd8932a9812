#!/usr/bin/env bash
# Benchmark: `ckmerge merge` against mergekit (`mergekit-yaml`, linear method) on three
# synthetic checkpoints with Llama-3.2-1B's layout in bf16 (2.5 GB each), in one run,
# with this machine's memory bandwidth (STREAM-like triad) and disk read rate, warm and
# cold page cache. Results go to stdout; copy the table into BENCHMARKS.md.
#   CKMERGE_BENCH_DIR  where checkpoints and outputs go (default ~/.cache/ckmerge/bench;
#                      needs ~15 GB free)
#   RUNS               warm runs per tool (default 3)
# Dropping the page cache needs root; otherwise posix_fadvise(DONTNEED) is used.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/peers-venv.sh | tail -n 1)
dir=${CKMERGE_BENCH_DIR:-$HOME/.cache/ckmerge/bench}
mkdir -p "$dir"
cargo build --release --quiet
cargo build --release --quiet -p ckmerge-kernels --example merge_bandwidth
gcc -O3 -march=native -fopenmp scripts/bench/triad.c -o "$dir/triad"
"$venv/bin/python" scripts/bench/bench_merge.py --dir "$dir" --ckmerge "$PWD/target/release/ckmerge" \
  --mergekit-yaml "$venv/bin/mergekit-yaml" --triad "$dir/triad" --runs "${RUNS:-3}" \
  --kernel-bandwidth "$PWD/target/release/examples/merge_bandwidth"
