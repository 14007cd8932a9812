#!/usr/bin/env bash
# Installs the wheel (dist/ckmerge-*.whl, from scripts/build-wheel.sh) into a fresh
# virtual environment and, with no Rust toolchain on PATH, runs the README's main command
# with the installed `ckmerge`; then checks that the installed binary reports the same
# scores as the cargo-built one (target/release/ckmerge) on the fixtures: the same search
# (every trial's value and the baselines) and the same evaluation. Used by CI.
set -euo pipefail
export RUST_LOG=${RUST_LOG:-warn}
cd "$(dirname "$0")/.."
whl=$(ls -t dist/ckmerge-*.whl | head -n 1)
cargo_bin=target/release/ckmerge
test -x "$cargo_bin" || { echo "test-wheel: build $cargo_bin first (cargo build --release)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$whl"

# Only the environment and the system's own directories: no cargo, no rustc.
clean="$work/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
if PATH=$clean command -v cargo >/dev/null || PATH=$clean command -v rustc >/dev/null; then
  echo "test-wheel: a Rust toolchain is on the clean PATH; the check would prove nothing" >&2
  exit 1
fi
installed=$(PATH=$clean command -v ckmerge)
case "$installed" in
  "$work/venv/bin/ckmerge") ;;
  *) echo "test-wheel: ckmerge resolves to $installed, not the wheel's" >&2; exit 1 ;;
esac
test -f "$work/venv/share/man/man1/ckmerge.1" || { echo "test-wheel: the wheel installed no man page" >&2; exit 1; }
PATH=$clean ckmerge --version
# manylinux2014: no glibc symbol newer than 2.17, and nothing of CUDA linked (the kernels
# are compiled at run time by the NVRTC the node has).
newest=$(objdump -T "$installed" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
if [ "$(printf '%s\n' GLIBC_2.17 "$newest" | sort -V | tail -n 1)" != GLIBC_2.17 ]; then
  echo "test-wheel: the binary needs $newest, newer than manylinux2014's glibc 2.17" >&2
  exit 1
fi
if objdump -p "$installed" | grep NEEDED | grep -iE 'cuda|nvrtc|cublas'; then
  echo "test-wheel: the binary links a CUDA library" >&2
  exit 1
fi

# The README's main command, with `ckmerge` for `cargo run --release --`, into its own run
# directory.
main=$(grep -m 1 '^cargo run --release -- search ' README.md)
args=${main#cargo run --release -- }
args=${args//target\/search-example/$work/wheel-run}
# shellcheck disable=SC2086 # the README's words, split as the shell splits them there
PATH=$clean ckmerge $args --json > "$work/wheel.json"
test -f "$work/wheel-run/merged/model.safetensors"
"$cargo_bin" ${args//$work\/wheel-run/$work/cargo-run} --json > "$work/cargo.json"

# The same evaluation by both binaries: a merge of three checkpoints on two data sets.
fx=tests/fixtures/trajectory
ev=(eval "$fx/llama/step-1000" "$fx/llama/step-1250" "$fx/llama/step-1500" --ema 0.5
    --data "$fx/data/heldout.txt" --extra-data "$fx/data/python-docs.txt" --json)
PATH=$clean ckmerge "${ev[@]}" > "$work/wheel-eval.json"
"$cargo_bin" "${ev[@]}" > "$work/cargo-eval.json"

python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
def load(name):
    with open(f"{w}/{name}") as f:
        return json.load(f)
wheel, cargo = load("wheel.json"), load("cargo.json")
# Every value the two searches saw and reported, in order: the same trials, bit for bit.
trials = lambda run: [(t["trial"], t["weights"], t["mean_nll"])
                      for t in load(f"{run}/report.json")["trials"]]
assert trials("wheel-run") == trials("cargo-run"), "the two searches' trials differ"
scores = lambda s: [(b["label"], [(x["name"], x["mean_nll"]) for x in b["scores"]])
                    for b in s["baselines"]] + [("best", s["best"]["scores"])]
assert scores(wheel) == scores(cargo), "the searches' reported scores differ"
ew, ec = load("wheel-eval.json"), load("cargo-eval.json")
sc = lambda e: [(d["name"], d["tokens_scored"], d["mean_nll"]) for d in e["datasets"]]
assert sc(ew) == sc(ec), f"eval differs: {sc(ew)} vs {sc(ec)}"
print(f"test-wheel: the installed wheel and the cargo build agree: "
      f"{len(trials('wheel-run'))} trials, best ppl {wheel['best']['perplexity']:.6f}; "
      f"eval {sc(ew)}")
PY
