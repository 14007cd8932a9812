#!/usr/bin/env python3
"""Summarises bench_trajectory's JSON (scripts/bench_trajectory.sh) as Markdown tables:
baselines per trajectory, the 4-way simplex search against the uniform average of the last
four, and each family search against the best of its fine grid and the best baseline."""
import json
import math
import os
import statistics
import sys


def med(xs, missing):
    """Median with runs that never reached the target counted as `missing` (budget + 1)."""
    v = sorted(x if x is not None else missing for x in xs)
    m = statistics.median(v)
    return f">{missing - 1}" if m >= missing else f"{m:g}"


def ckmerge_runs(r, problem):
    """ckmerge's runs of a peers problem, from the Rust results."""
    if problem == "ema_baselines":
        return r["families"]["ema"]["runs_baselines"]
    return r[problem]["runs"]


METRIC = {"simplex4": "beats_uniform_at", "simplex4_baselines": "beats_best_baseline_at",
          "ema_baselines": "within_0.1pct_at", "simplex_all_baselines": "beats_best_baseline_at"}
WHAT = {"simplex4": "4-way, no baselines: beats the uniform average at",
        "simplex4_baselines": "4-way after its baselines: beats the best of them at",
        "ema_baselines": "EMA after its baselines: within 0.1 % of the family's best at",
        "simplex_all_baselines": "all checkpoints after the baselines: beats the best of them at"}


def peers_table(r, peers):
    names = ["ckmerge"] + sorted({p for prob in peers["peers"].values() for p in prob})
    print(f"\nAgainst the peers on {r['trajectory']} (median evaluation; in brackets the median best perplexity after the budget):\n")
    print("| search | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for prob, by_peer in peers["peers"].items():
        cells = []
        for name in names:
            runs = ckmerge_runs(r, prob) if name == "ckmerge" else by_peer.get(name)
            if not runs:
                cells.append("–")
                continue
            n = len(runs[0]["values"])
            at = [x.get(METRIC[prob]) for x in runs]
            if prob == "ema_baselines" and name != "ckmerge":
                # Every peer was told the same baselines: where ckmerge's count is 0 (a
                # told member is already within 0.1 %), so is theirs.
                at = [0 if c.get(METRIC[prob]) == 0 else a for a, c in zip(at, ckmerge_runs(r, prob))]
            best = statistics.median(min(x["values"]) for x in runs)
            cells.append(f"{med(at, n + 1)} ({math.exp(best):.3f})")
        print(f"| {WHAT[prob]} | " + " | ".join(cells) + " |")


def main():
    res = json.load(open(sys.argv[1]))["results"]
    peers = {}
    if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):
        peers = {p["trajectory"]: p for p in json.load(open(sys.argv[2]))["results"]}
    for r in res:
        print(f"\n### {r['trajectory']} ({r['checkpoints']} checkpoints; {r['role']})\n")
        base = r["baselines"]
        best = min(base.values())
        print("| baseline | held-out ppl |")
        print("|---|---|")
        for k, v in base.items():
            mark = " **(best)**" if v == best else ""
            print(f"| {k} | {math.exp(v):.3f}{mark} |")
        for key, what in [("simplex4", "without baselines"), ("simplex4_baselines", "after its baselines")]:
            if key not in r:
                continue
            s = r[key]
            runs = s["runs"]
            n = len(runs[0]["values"])
            beat = [x["beats_uniform_at"] for x in runs]
            beat_b = [x["beats_best_baseline_at"] for x in runs]
            final = [min(x["values"]) for x in runs]
            extra = f" ({s['baselines']} baseline evaluations first)" if key.endswith("baselines") else ""
            print(f"\n4-way simplex over the last four, {what}{extra}, {len(runs)} seeds, {n} evaluations: "
                  f"beats their uniform average (ppl {math.exp(s['uniform']):.3f}) at evaluation {med(beat, n + 1)} (median; "
                  f"{sum(b is not None for b in beat)}/{len(beat)} seeds within {n}), their best baseline (ppl "
                  f"{math.exp(s['best_baseline']):.3f}) at {med(beat_b, n + 1)} ({sum(b is not None for b in beat_b)}/{len(beat_b)}); "
                  f"best after {n}: median ppl {math.exp(statistics.median(final)):.3f}; "
                  f"closest two trials {min(x['closest_weights'] for x in runs):.2e} apart in weights")
        print("\n| family | grid best ppl | vs best baseline | within 0.1 % of grid best at (median): alone / after baselines | beats best baseline at (median) | best after budget (median ppl) |")
        print("|---|---|---|---|---|---|")
        for name, f in r["families"].items():
            runs = f["runs"]
            n = len(runs[0]["values"])
            within = [x["within_0.1pct_at"] for x in runs]
            within_b = [x["within_0.1pct_at"] for x in f.get("runs_baselines", runs)]
            beat = [x["beats_best_baseline_at"] for x in f.get("runs_baselines", runs)]
            final = statistics.median(min(x["values"]) for x in runs)
            print(f"| {name} | {math.exp(f['grid_best']):.3f} | {(math.exp(f['grid_best'] - best) - 1) * 100:+.2f} % | "
                  f"{med(within, n + 1)} / {med(within_b, n + 1)} | {med(beat, n + 1)} | {math.exp(final):.3f} |")
        if "simplex_all_baselines" in r:
            s = r["simplex_all_baselines"]
            runs = s["runs"]
            n = len(runs[0]["values"])
            beat = [x["beats_best_baseline_at"] for x in runs]
            final = statistics.median(min(x["values"]) for x in runs)
            print(f"\nWhole search (simplex over all {r['checkpoints']}, after its {s['baselines']} baselines), {n} evaluations: "
                  f"beats the best baseline at evaluation {med(beat, n + 1)} (median; {sum(b is not None for b in beat)}/{len(beat)} seeds "
                  f"within {n}); best after {n}: median ppl {math.exp(final):.3f} ({(math.exp(final - best) - 1) * 100:+.2f} % vs best baseline); "
                  f"closest two trials {min(x['closest_weights'] for x in runs):.2e} apart")
        if r["trajectory"] in peers:
            peers_table(r, peers[r["trajectory"]])


if __name__ == "__main__":
    main()
