#!/usr/bin/env bash
# The Slurm scripts, run on a real Slurm (scripts/slurm/local-cluster.sh: slurmctld and
# three slurmd on loopback), as CI runs them:
#   1. search.sbatch on the fixture trajectory over 3 nodes with CPU workers; the report
#      shows a merge better than both ends; resubmitting the same RUN_DIR with a larger
#      MAX_EVALS resumes and keeps every completed trial;
#   2. a search where one worker's job step is cancelled (scancel) mid-run still completes
#      its trials, none lost or run twice;
#   3. merge.sbatch over 3 tasks writes the same bytes as a single-process merge.
# Needs root (it starts the daemons). Leaves its files in $WORK.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-$(mktemp -d /tmp/ckmerge-slurm-test.XXXX)}
scripts/slurm/local-cluster.sh install >/dev/null
eval "$(scripts/slurm/local-cluster.sh start)"
trap 'scripts/slurm/local-cluster.sh stop >/dev/null 2>&1 || true' EXIT
# The binary: CKMERGE if set (a path, or a name on PATH such as the `ckmerge` of an
# environment the wheel is installed in), else cargo's release build.
if [ -z "${CKMERGE:-}" ]; then
  cargo build --release --quiet
  export CKMERGE=$ROOT/target/release/ckmerge
fi
command -v "$CKMERGE" >/dev/null || { echo "slurm test: $CKMERGE not found" >&2; exit 2; }
echo "== ckmerge: $(command -v "$CKMERGE")"
FIX=$ROOT/tests/fixtures/trajectory
cd "$WORK"

fail() { echo "slurm test FAILED: $*" >&2; exit 1; }

# Waits until job $1 has left the queue; fails after $2 seconds.
wait_job() {
  for _ in $(seq 1 $(( $2 * 5 ))); do
    squeue -h -j "$1" 2>/dev/null | grep -q . || return 0
    sleep 0.2
  done
  scancel "$1" || true
  fail "job $1 still running after $2 s"
}

# The state of a finished job (COMPLETED, FAILED, ...).
job_state() { scontrol show job "$1" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }

echo "== 1. search.sbatch over 3 nodes, then a resubmission that resumes"
job=$(RUN_DIR=$WORK/run1 CONFIG=$FIX/search.toml MAX_EVALS=5 sbatch --parsable "$ROOT/scripts/slurm/search.sbatch")
wait_job "$job" 300
[ "$(job_state "$job")" = COMPLETED ] || { cat "ckmerge-search-$job.out"; fail "search job $job: $(job_state "$job")"; }
cp run1/trials.jsonl first.jsonl
job=$(RUN_DIR=$WORK/run1 MAX_EVALS=7 sbatch --parsable "$ROOT/scripts/slurm/search.sbatch")
wait_job "$job" 300
[ "$(job_state "$job")" = COMPLETED ] || { cat "ckmerge-search-$job.out"; fail "resumed job $job: $(job_state "$job")"; }
grep -q "resuming the run" "ckmerge-search-$job.out" || fail "the resubmission did not resume"
python3 - "$WORK" <<'EOF' || fail "run1 checks"
import json, sys
w = sys.argv[1]
rep = json.load(open(f"{w}/run1/report.json"))
ppl = {r["label"]: r["scores"][0]["perplexity"] for r in rep["references"]}
assert ppl["best found"] < min(ppl["step-1250"], ppl["step-1500"]), ppl
assert len(rep["workers"]) == 3, rep["workers"]
done = lambda f: {r["trial"]: r["mean_nll"] for r in map(json.loads, open(f)) if r["event"] == "done"}
first, after = done(f"{w}/first.jsonl"), done(f"{w}/run1/trials.jsonl")
assert len(first) == 5 and len(after) == 7, (len(first), len(after))
assert all(after[k] == v for k, v in first.items()), "a completed trial changed"
n_done = sum(1 for r in map(json.loads, open(f"{w}/run1/trials.jsonl")) if r["event"] == "done")
assert n_done == 7, "a trial was done twice"
print(f"ok: best ppl {ppl['best found']:.4f} vs ends {ppl['step-1250']:.4f} / {ppl['step-1500']:.4f}; 5 trials, then 7 after the resubmission")
EOF

echo "== 2. one worker step cancelled mid-run"
objective=$(for _ in 1 2 3 4 5 6 7 8; do printf '"%s", ' "$FIX/data/heldout.txt"; done)
cat >slow.toml <<EOF
checkpoints = ["$FIX/llama/step-1250", "$FIX/llama/step-1500"]
[data]
objective = [${objective%, }]
seq_len = 128
[search]
max_evals = 6
[workers]
heartbeat_s = 0.5
heartbeat_timeout_s = 3
[output]
plots = false
EOF
job=$(RUN_DIR=$WORK/run2 CONFIG=$WORK/slow.toml WORKER_THREADS=1 sbatch --parsable "$ROOT/scripts/slurm/search.sbatch")
# Wait for a first result, then cancel the first worker's step.
for _ in $(seq 1 600); do
  [ -f run2/trials.jsonl ] && grep -q '"event":"done"' run2/trials.jsonl && break
  sleep 0.2
done
step=$(squeue -h -s -j "$job" -o '%i %j' | awk '$2 == "ckmerge-worker-n1" {print $1}')
[ -n "$step" ] || fail "no worker step for n1 in: $(squeue -h -s -j "$job" -o '%i %j')"
scancel "$step"
echo "cancelled step $step"
wait_job "$job" 300
[ "$(job_state "$job")" = COMPLETED ] || { cat "ckmerge-search-$job.out"; fail "search job $job: $(job_state "$job")"; }
python3 - "$WORK" <<'EOF' || { cat "ckmerge-search-$job.out"; fail "run2 checks"; }
import json, sys
recs = [json.loads(l) for l in open(f"{sys.argv[1]}/run2/trials.jsonl")]
done = [r["trial"] for r in recs if r["event"] == "done"]
assert len(done) == 6 and len(set(done)) == 6, done
print(f"ok: 6 trials done once each; {sum(r['event'] == 'retry' for r in recs)} requeued after the cancel")
EOF

echo "== 3. merge.sbatch over 3 tasks against a single-process merge"
T=$ROOT/tests/fixtures/tiny-llama
"$CKMERGE" merge "$T/step-100" "$T/step-200" "$T/step-300" --weights 0.2,0.3,0.5 \
  --max-shard-size 50KB --out single >/dev/null 2>&1
job=$(OUT=$WORK/split WEIGHTS=0.2,0.3,0.5 MAX_SHARD_SIZE=50KB sbatch --parsable \
  "$ROOT/scripts/slurm/merge.sbatch" "$T/step-100" "$T/step-200" "$T/step-300")
wait_job "$job" 120
[ "$(job_state "$job")" = COMPLETED ] || { cat "ckmerge-merge-$job.out"; fail "merge job $job"; }
n=0
for f in single/*.safetensors single/model.safetensors.index.json single/config.json; do
  cmp "$f" "split/$(basename "$f")" || fail "$(basename "$f") differs"
  n=$((n + 1))
done
[ "$n" -gt 3 ] || fail "expected several shards, compared $n files"
echo "ok: $n files identical"
echo "slurm tests passed ($WORK)"
