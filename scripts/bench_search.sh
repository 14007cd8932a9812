#!/usr/bin/env bash
# Parallel efficiency of `ckmerge search` over k = 1, 2, 4 worker processes on loopback.
#
# Workers run in benchmark mode (`ckmerge worker --bench-fixed-cost-ms T`): every
# evaluation takes exactly T ms and returns a fixed smooth function of the weights, so the
# measured wall time can be set against the ideal B*T/k and what remains is the
# coordinator's own cost: proposing (GP fit + acquisition, conditioned on pending trials),
# two synced journal writes and the RPC round trip per trial.
#
# Usage: scripts/bench_search.sh [T_ms=1000] [B=24]
# Prints a Markdown table (for BENCHMARKS.md) and leaves the runs in $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-1000}
B=${2:-24}
WORK=${WORK:-$(mktemp -d /tmp/ckmerge-bench-search.XXXX)}
cargo build --release --quiet
BIN=$PWD/target/release/ckmerge
FIX=$PWD/tests/fixtures/trajectory
export CKMERGE_SECRET=bench-secret-$RANDOM-$RANDOM-0123456789

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

for k in 1 2 4; do
  d=$WORK/k$k
  rm -rf "$d"; mkdir -p "$d"
  pids=()
  for i in $(seq 1 "$k"); do
    "$BIN" worker --listen 127.0.0.1:0 --announce "$d/workers.txt" --threads 1 \
      --bench-fixed-cost-ms "$T" >/dev/null 2>"$d/worker$i.log" &
    pids+=($!)
  done
  for _ in $(seq 1 100); do
    [ -f "$d/workers.txt" ] && [ "$(wc -l <"$d/workers.txt")" -ge "$k" ] && break
    sleep 0.1
  done
  addrs=$(awk '{printf "%s\"%s\"", (NR>1?", ":""), $1}' "$d/workers.txt")
  cat >"$d/run.toml" <<EOF
checkpoints = ["$FIX/llama/step-250", "$FIX/llama/step-500", "$FIX/llama/step-750", "$FIX/llama/step-1000"]
[space]
kind = "simplex"
[data]
objective = ["$FIX/data/heldout.txt"]
seq_len = 128
[search]
max_evals = $B
[workers]
addresses = [$addrs]
[output]
merge = false
plots = false
EOF
  "$BIN" search --config "$d/run.toml" --run-dir "$d/run" >/dev/null 2>"$d/coordinator.log"
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
done

python3 - "$WORK" "$T" "$B" <<'EOF'
import json, sys, statistics
work, t, b = sys.argv[1], float(sys.argv[2]) / 1000, int(sys.argv[3])
print(f"| workers k | trials | wall s (first issue to last result) | ideal B*t/k s | efficiency | coordinator turnaround per trial, median / max ms |")
print("|---:|---:|---:|---:|---:|---|")
for k in (1, 2, 4):
    recs = [json.loads(l) for l in open(f"{work}/k{k}/run/trials.jsonl")]
    issued = [r for r in recs if r["event"] == "issued"]
    done = [r for r in recs if r["event"] == "done"]
    assert len(done) == b, (k, len(done))
    wall = max(r["time"] for r in done) - min(r["time"] for r in issued)
    ideal = b * t / k
    # Turnaround: from a result arriving to the same worker's next trial being issued.
    gaps = []
    for w in {r["worker"] for r in done}:
        ev = sorted((r["time"], r["event"]) for r in recs if r.get("worker") == w and r["event"] in ("issued", "done"))
        for (t0, e0), (t1, e1) in zip(ev, ev[1:]):
            if e0 == "done" and e1 == "issued":
                gaps.append((t1 - t0) * 1000)
    med = statistics.median(gaps) if gaps else 0
    print(f"| {k} | {b} | {wall:.2f} | {ideal:.2f} | {100 * ideal / wall:.1f}% | {med:.1f} / {max(gaps, default=0):.1f} |")
EOF
