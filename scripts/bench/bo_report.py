#!/usr/bin/env python3
"""Tables and plots for scripts/bench_bo.sh from the Rust and Python result files."""
import json
import math
import statistics
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from cycler import cycler

plt.rcParams["axes.prop_cycle"] = cycler(color=plt.cm.tab20.colors)  # 11 optimisers, distinct colours

rust = json.load(open(sys.argv[1]))
plot_path = sys.argv[2]
py = {"results": [r for f in sys.argv[3:] for r in json.load(open(f))["results"]]}
mins = {r["problem"]: r["min"] for r in rust["results"]}
refs = {r["problem"]: r["reference"] for r in rust["results"]}
results = rust["results"] + py["results"]
problems = list(dict.fromkeys(r["problem"] for r in results))
PPL_TOL = math.log(1.001)  # within 0.1 % of the grid-best perplexity


def first_reach(trace, target):
    for i, v in enumerate(trace):
        if v <= target:
            return i + 1
    return math.inf


def fmt(x):
    return "never" if x == math.inf else (f"{x:g}" if isinstance(x, (int, float)) else str(x))


seeds = sorted({len(r["traces"]) for r in results})
seeds_txt = "/".join(str(n) for n in seeds)
print(f"### Median simple regret (best found minus optimum), {seeds_txt} seeds\n")
print("| problem | optimizer | q | after 5 | after 10 | after 20 | overhead ms/eval |")
print("|---|---|---|---|---|---|---|")
for p in problems:
    for r in [r for r in results if r["problem"] == p]:
        reg = [[v - mins[p] for v in t] for t in r["traces"]]
        med = [statistics.median(t[k - 1] for t in reg) for k in (5, 10, 20)]
        print(f"| {p} | {r['optimizer']} | {r['q']} | {med[0]:.3g} | {med[1]:.3g} | {med[2]:.3g} | "
              f"{1000 * r['seconds_per_eval']:.1f} |")

print(f"\n### Merge landscapes: evaluations needed (median over {seeds_txt} seeds; worst seed)\n")
print("Within 0.1 % of the grid-best perplexity (1-D and simplex); better than the uniform average\n"
      "(simplex).\n")
print("| landscape | optimizer | q | within 0.1 %: median | worst | seeds reaching | beat uniform: median | worst |")
print("|---|---|---|---|---|---|---|---|")
for p in problems:
    if "-1d-" not in p and "simplex" not in p:
        continue
    for r in [r for r in results if r["problem"] == p]:
        n = [first_reach(t, mins[p] + PPL_TOL) for t in r["traces"]]
        ok = sum(x != math.inf for x in n)
        row = f"| {p} | {r['optimizer']} | {r['q']} | {fmt(statistics.median(n))} | {fmt(max(n))} | {ok}/{len(n)} |"
        if "simplex" in p:
            u = [first_reach(t, refs[p] - 1e-12) for t in r["traces"]]
            row += f" {fmt(statistics.median(u))} | {fmt(max(u))} |"
        else:
            row += " | |"
        print(row)

lat = rust["latency_fit_plus_8_proposals_at_100"]
print("\nckmerge proposal latency (surrogate fit + q = 8 proposals at 100 observations, best of 3): "
      + "; ".join(f"d={l['dim']}: {1000 * l['seconds_first_fit']:.1f} ms with a first fit (restarts), "
                  f"{1000 * l['seconds_warm_refit']:.1f} ms with a warm refit, "
                  f"{1000 * l['seconds_fixed_hyperparameters']:.1f} ms with hyperparameters kept" for l in lat))

cols = 4
rows = math.ceil(len(problems) / cols)
fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
for ax, p in zip(axes.flat, problems):
    for r in [r for r in results if r["problem"] == p]:
        reg = [[max(v - mins[p], 1e-9) for v in t] for t in r["traces"]]
        med = [statistics.median(t[k] for t in reg) for k in range(len(reg[0]))]
        ax.semilogy(range(1, len(med) + 1), med, label=f"{r['optimizer']}", lw=2 if r["optimizer"].startswith("ckmerge") else 1)
    ax.set_title(p, fontsize=8)
    ax.set_xlabel("evaluations", fontsize=7)
    ax.tick_params(labelsize=6)
for ax in list(axes.flat)[len(problems):]:
    ax.axis("off")
axes.flat[0].legend(fontsize=5)
fig.suptitle(f"median simple regret over {seeds_txt} seeds", fontsize=10)
fig.tight_layout()
fig.savefig(plot_path, dpi=110)
print(f"\nplot: {plot_path}")
