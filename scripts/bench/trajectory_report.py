#!/usr/bin/env python3
"""Summarises bench_trajectory's JSON (scripts/bench_trajectory.sh) as Markdown tables:
baselines per trajectory, the 4-way simplex search against the uniform average of the last
four, and each family search against the best of its fine grid and the best baseline."""
import json
import math
import statistics
import sys


def med(xs, missing):
    """Median with runs that never reached the target counted as `missing` (budget + 1)."""
    v = sorted(x if x is not None else missing for x in xs)
    m = statistics.median(v)
    return f">{missing - 1}" if m >= missing else f"{m:g}"


def main():
    res = json.load(open(sys.argv[1]))["results"]
    for r in res:
        print(f"\n### {r['trajectory']} ({r['checkpoints']} checkpoints; {r['role']})\n")
        base = r["baselines"]
        best = min(base.values())
        print("| baseline | held-out ppl |")
        print("|---|---|")
        for k, v in base.items():
            mark = " **(best)**" if v == best else ""
            print(f"| {k} | {math.exp(v):.3f}{mark} |")
        if "simplex4" in r:
            s = r["simplex4"]
            runs = s["runs"]
            n = len(runs[0]["values"])
            beat = [x["beats_uniform_at"] for x in runs]
            final = [min(x["values"]) for x in runs]
            print(f"\n4-way simplex (last four), {len(runs)} seeds, {n} evaluations: uniform average ppl "
                  f"{math.exp(s['uniform']):.3f}; beats it at evaluation {med(beat, n + 1)} (median; "
                  f"{sum(b is not None for b in beat)}/{len(beat)} seeds within {n}); best after {n}: median ppl "
                  f"{math.exp(statistics.median(final)):.3f} ({(math.exp(statistics.median(final) - s['uniform']) - 1) * 100:+.2f} % vs uniform); "
                  f"closest two trials {min(x['closest_weights'] for x in runs):.2e} apart in weights")
        print("\n| family | grid best ppl | vs best baseline | within 0.1 % of grid best at (median) | beats best baseline at (median) | best after budget (median ppl) |")
        print("|---|---|---|---|---|---|")
        for name, f in r["families"].items():
            runs = f["runs"]
            n = len(runs[0]["values"])
            within = [x["within_0.1pct_at"] for x in runs]
            beat = [x["beats_best_baseline_at"] for x in runs]
            final = statistics.median(min(x["values"]) for x in runs)
            print(f"| {name} | {math.exp(f['grid_best']):.3f} | {(math.exp(f['grid_best'] - best) - 1) * 100:+.2f} % | "
                  f"{med(within, n + 1)} | {med(beat, n + 1)} | {math.exp(final):.3f} |")


if __name__ == "__main__":
    main()
