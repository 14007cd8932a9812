#!/usr/bin/env bash
# The GPU checks and benchmarks, in one run of under 10 minutes on one GPU machine with
# PyTorch and transformers but no Rust and no network. Build first, here:
#   scripts/gpu/build.sh        # -> target/gpu-check/{ckmerge,gpu_parity}
# then run this from the repository root on the GPU machine, with target/gpu-check
# carried. Results: one file per step and summary.md, printed last, in
# target/gpu-check/out, or archived as $OUT/gpu-check.tgz where OUT is set.
#
# 1. kernel parity: every CUDA kernel against its CPU reference (gpu_parity);
# 2. model parity: `ckmerge eval --gpus 0` vs the CPU on the fixture trajectory, bf16 and
#    f32, single checkpoints and merges (perplexity within 1e-3 / 1e-5 relative);
# 3. merge bandwidth against a device-to-device copy in the same run (bf16, 2 and 4
#    sources);
# 4. forward tokens/s against transformers (bf16, sdpa) on a ~1.1B Llama with random
#    weights, 1M tokens, and a whole trial (merge of 2 sources + evaluation) against the
#    forward pass alone.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/gpu-check/ckmerge}
PARITY=${PARITY:-target/gpu-check/gpu_parity}
WORK=${WORK:-/tmp/ckmerge-gpu-check}
if [ -n "${OUT:-}" ]; then
  # A machine that sends back only a few files from $OUT: work in $WORK/results and
  # archive it there at exit (also when a step times out), summary beside it.
  DEST=$OUT
  OUT=$WORK/results
  trap 'tar czf "$DEST/gpu-check.tgz" -C "$WORK" results; cp "$OUT/summary.md" "$DEST/" 2>/dev/null' EXIT
else
  OUT=target/gpu-check/out
fi
PY=${PY:-python3}
TOKENS=${TOKENS:-1048576}
mkdir -p "$OUT" "$WORK"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

# CUDA libraries: the toolkit's, else PyTorch's wheels (nvrtc, cublas).
libdirs=$(
  { ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib 2>/dev/null
    $PY -c 'import nvidia, os, glob
for p in nvidia.__path__:
    for d in glob.glob(os.path.join(p, "*", "lib")): print(d)' 2>/dev/null
  } | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
export CKMERGE_REQUIRE_GPU=1
nvidia-smi -L | tee "$OUT/gpus.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv

step "1. kernel parity"
if timeout 120 "$PARITY" --test-threads 1 2>&1 | tee "$OUT/kernel-parity.txt"; then
  kernel=pass
else
  kernel=FAIL; status=1
fi

step "2. model parity (fixtures)"
F=tests/fixtures/trajectory
for s in step-1250 step-1500; do
  [ -d "$WORK/f32/$s" ] || "$BIN" merge "$F/llama/$s" --weights 1 --dtype f32 --out "$WORK/f32/$s" >/dev/null
done
parity_run() { # name, then ckmerge eval arguments
  local name=$1; shift
  for dev in none 0; do
    timeout 120 "$BIN" eval "$@" --data "$F/data/heldout.txt" --extra-data "$F/data/python-docs.txt" \
      --seq-len 128 --json --gpus "$dev" >"$OUT/parity-$name-$dev.json" 2>>"$OUT/parity.log" || echo "eval failed: $name on $dev" | tee -a "$OUT/parity.log"
  done
}
parity_run llama-bf16 "$F/llama/step-1250"
parity_run llama-bf16-merge "$F/llama/step-1250" "$F/llama/step-1500" --weights 0.4,0.6
parity_run neox-bf16-merge "$F/neox/step-1250" "$F/neox/step-1500" --weights 0.4,0.6
parity_run llama-f32-merge "$WORK/f32/step-1250" "$WORK/f32/step-1500" --weights 0.4,0.6
$PY - "$OUT" <<'PYEOF' | tee "$OUT/model-parity.md"
import json, sys, os, glob
out = sys.argv[1]
ok = True
print("| case | data set | CPU ppl | GPU ppl | relative | limit | |")
print("|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(out, "parity-*-none.json"))):
    name = os.path.basename(f)[len("parity-"):-len("-none.json")]
    g = f.replace("-none.json", "-0.json")
    try:
        a, b = json.load(open(f)), json.load(open(g))
    except Exception as e:
        print(f"| {name} | - | - | - | - | - | FAIL ({e}) |"); ok = False; continue
    lim = 1e-5 if "f32" in name else 1e-3
    for x, y in zip(a["datasets"], b["datasets"]):
        r = abs(x["perplexity"] - y["perplexity"]) / x["perplexity"]
        good = r <= lim
        ok &= good
        print(f"| {name} | {x['name']} | {x['perplexity']:.6f} | {y['perplexity']:.6f} | {r:.2e} | {lim:.0e} | {'ok' if good else 'FAIL'} |")
sys.exit(0 if ok else 1)
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] && model=pass || { model=FAIL; status=1; }

step "3. merge bandwidth"
timeout 120 "$BIN" gpu-bench --bytes 4GB --sources 2,4 --dtype bf16 | tee "$OUT/merge-bandwidth.jsonl" || status=1

step "4. forward pass vs transformers (~1.1B Llama, random weights)"
timeout 180 $PY scripts/gpu/hf_bench.py make --dir "$WORK/llama1b" --tokens "$TOKENS" 2>&1 | tail -3
timeout 180 $PY scripts/gpu/hf_bench.py bench --dir "$WORK/llama1b" --seq 2048 --batch 8 --profile >"$OUT/hf.json" 2>"$OUT/hf.log" || { echo "transformers run failed"; tail -5 "$OUT/hf.log"; status=1; }
cat "$OUT/hf.json" 2>/dev/null
run_ck() { # name, ckmerge eval arguments
  local name=$1; shift
  timeout 180 "$BIN" eval "$@" --data "$WORK/llama1b/tokens.bin" --token-bits 16 --seq-len 2048 --batch 8 \
    --json --gpus 0 >"$OUT/$name.json" 2>"$OUT/$name.log" || { echo "ckmerge eval failed: $name"; tail -5 "$OUT/$name.log"; status=1; }
}
run_ck ck-forward "$WORK/llama1b/a"
run_ck ck-trial "$WORK/llama1b/a" "$WORK/llama1b/b" --weights 0.5,0.5
# The same forward pass with the materialised-scores attention (cuBLAS batched GEMMs and a
# softmax kernel) instead of the flash kernel, to show what the kernel is worth.
CKMERGE_GPU_ATTENTION=scores run_ck ck-forward-scores "$WORK/llama1b/a"
# Where the time goes: a profiled pass over 256k tokens (each span synchronises, so this
# run's speed is not the benchmark's), then transformers' kernels over two batches.
CKMERGE_GPU_PROFILE=1 run_ck ck-profile "$WORK/llama1b/a" --max-tokens 262144
grep '^profile:' "$OUT/ck-profile.log"
grep -A24 'Self CUDA' "$OUT/hf.log" | cut -c1-160 | head -26

step "summary"
$PY - "$OUT" "$kernel" "$model" <<'PYEOF' | tee "$OUT/summary.md"
import json, sys, os
out, kernel, model = sys.argv[1:4]
def load(n):
    try: return json.load(open(os.path.join(out, n)))
    except Exception: return None
gpu = open(os.path.join(out, "gpus.txt")).read().strip().splitlines()[0]
print(f"GPU: {gpu}\n")
print("| check | result |\n|---|---|")
print(f"| kernel parity (gpu_parity) | {kernel} |")
print(f"| model parity (fixtures, bf16 1e-3, f32 1e-5) | {model} |")
try:
    for l in open(os.path.join(out, "merge-bandwidth.jsonl")):
        m = json.loads(l)
        print(f"| fused merge bf16, {m['sources']} sources, {m['model_bytes']/1e9:.1f} GB model | {m['merge_gb_s']:.0f} GB/s vs copy {m['copy_gb_s']:.0f} GB/s = {m['ratio']:.2f} (goal >= 0.90) |")
except Exception as e:
    print(f"| fused merge | not measured ({e}) |")
hf, fw, tr = load("hf.json"), load("ck-forward.json"), load("ck-trial.json")
if hf and fw:
    d = fw["datasets"][0]
    print(f"| forward tokens/s, 1.1B Llama bf16 | ckmerge {d['tokens_per_s']:.0f} vs transformers {hf['tokens_per_s']:.0f} = {d['tokens_per_s']/hf['tokens_per_s']:.2f}x (goal >= 1.0) |")
    print(f"| mean NLL on the same tokens | ckmerge {d['mean_nll']:.5f}, transformers {hf['mean_nll']:.5f} |")
    sc = load("ck-forward-scores.json")
    if sc:
        s = sc["datasets"][0]
        print(f"| forward tokens/s with materialised-scores attention | {s['tokens_per_s']:.0f} = {s['tokens_per_s']/hf['tokens_per_s']:.2f}x transformers, mean NLL {s['mean_nll']:.5f} |")
else:
    print("| forward vs transformers | not measured |")
if fw and tr:
    f = fw["datasets"][0]["seconds"]
    t = tr["merge_seconds"] + tr["datasets"][0]["seconds"]
    print(f"| whole trial (merge 2 sources + eval {tr['datasets'][0]['tokens_scored']} tokens) vs forward alone | {t:.2f} s vs {f:.2f} s = {t/f:.2f}x (goal <= 1.5) |")
PYEOF
exit $status
