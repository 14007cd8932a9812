#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain:
# the release binary and the GPU kernel parity test binary, stripped, in target/gpu-check/
# (carry that folder to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release
out=target/gpu-check
mkdir -p "$out"
strip -o "$out/ckmerge" target/release/ckmerge
parity=$(cargo test --release -p ckmerge-kernels --test gpu_parity --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_parity" and m.get("executable"):
        print(m["executable"])')
strip -o "$out/gpu_parity" "$parity"
ls -la "$out"
