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
test_binary() { # package, test target: the path of its release test binary
  cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$2"
}
strip -o "$out/gpu_parity" "$(test_binary ckmerge-kernels gpu_parity)"
# The GPU evaluator's tests (worker/tests/gpu_eval.rs); they find the fixtures through
# CKMERGE_FIXTURES there.
strip -o "$out/gpu_eval" "$(test_binary ckmerge-worker gpu_eval)"
ls -la "$out"
