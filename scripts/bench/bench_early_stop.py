"""Runs each search with search.early_stop off and on (see scripts/bench_early_stop.sh)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/trajectory"
SEEDS = int(os.environ.get("BENCH_SEEDS", "3"))


def steps(traj):
    d = FIX / traj
    return sorted((p for p in d.iterdir() if p.name.startswith("step-")),
                  key=lambda p: int(p.name.split("-")[1]))


# (name, tuned on?, checkpoints, space, max_evals)
CASES = [
    ("long simplex 12", True, steps("long"), 'kind = "simplex"', 15),
    ("llama simplex 6", False, steps("llama"), 'kind = "simplex"', 15),
    ("neox simplex 6", False, steps("neox"), 'kind = "simplex"', 15),
    ("llama lambda", False, steps("llama")[-2:], 'kind = "lambda"', 8),
    ("neox lambda", False, steps("neox")[-2:], 'kind = "lambda"', 8),
]


def run(binary, ckpts, space, evals, seed, early):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.toml"
        cfg.write_text(
            f"checkpoints = {json.dumps([str(c) for c in ckpts])}\n"
            f"[space]\n{space}\n"
            f"[data]\nobjective = [{json.dumps(str(FIX / 'data/heldout.txt'))}]\nseq_len = 128\n"
            f"[search]\nmax_evals = {evals}\nseed = {seed}\n"
            f"early_stop = {'true' if early else 'false'}\n"
            "[output]\nplots = false\nmerge = false\n")
        t0 = time.time()
        subprocess.run([binary, "search", "--config", str(cfg), "--run-dir",
                        str(Path(tmp) / "run")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.time() - t0
        rep = json.loads((Path(tmp) / "run/report.json").read_text())
        return {
            "tokens": rep["scored_tokens"],
            "stopped": rep["stopped_early"],
            "best": rep["best"]["mean_nll"],
            "best_weights": rep["best"]["weights"],
            "wall_s": wall,
        }


def main():
    binary, out = sys.argv[1], sys.argv[2]
    rows = []
    for name, tuned, ckpts, space, evals in CASES:
        for seed in range(SEEDS):
            off = run(binary, ckpts, space, evals, seed, False)
            on = run(binary, ckpts, space, evals, seed, True)
            r = {
                "case": name, "tuned_on": tuned, "seed": seed, "evals": evals,
                "tokens_off": off["tokens"], "tokens_on": on["tokens"],
                "ratio": off["tokens"] / on["tokens"], "stopped": on["stopped"],
                "best_off": off["best"], "best_on": on["best"],
                "best_change_pct": (on["best"] - off["best"]) / off["best"] * 100,
                "same_best_weights": off["best_weights"] == on["best_weights"],
            }
            rows.append(r)
            print(f"{name:16} seed {seed}: tokens {r['tokens_off']:7} -> {r['tokens_on']:7} "
                  f"({r['ratio']:.2f}x, {r['stopped']} of {evals} stopped), best "
                  f"{r['best_off']:.6f} -> {r['best_on']:.6f} ({r['best_change_pct']:+.4f} %)",
                  flush=True)
    tot_off = sum(r["tokens_off"] for r in rows)
    tot_on = sum(r["tokens_on"] for r in rows)
    print(f"all: {tot_off} -> {tot_on} tokens ({tot_off / tot_on:.2f}x); worst best change "
          f"{max(r['best_change_pct'] for r in rows):+.4f} %")
    Path(out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
