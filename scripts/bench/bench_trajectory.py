#!/usr/bin/env python3
"""Python peers for scripts/bench_trajectory.sh: Optuna (GPSampler, TPE), scikit-optimize
(GP, EI), CMA-ES (PyPI `cma`, as Cohere searched checkpoint weights) and random search on
the searches of coordinator/examples/bench_trajectory.rs, with the same objective: every
value a live evaluation of the merge by `bench_trajectory serve` (the same evaluator, the
same held-out data), none interpolated.

Problems, per trajectory (read from the Rust run's JSON: its checkpoints, baselines and
the families' grid optima):
- simplex4: the last four checkpoints, 15 evaluations, each peer starting from ckmerge's
  design (the uniform average, then halfway to each of the two latest checkpoints);
- simplex4_baselines: the same after the baselines of those four are told (not counted);
- ema_baselines: the EMA family (the same coordinate, decay 1/N..1 log-uniform), 8
  evaluations after the family's members among the baselines are told;
- simplex_all_baselines: all N checkpoints, 15 evaluations after every baseline is told.
Peers search the simplex in the unit cube through stick-breaking (uniform to uniform), the
usual parametrisation; CMA-ES cannot be told values: it starts at the best told point
(sigma 0.2), the warm start Cohere's setup implies. Every peer gets the same budget.
"""
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore")
SEEDS = int(os.environ.get("BENCH_SEEDS", "20"))
SEED0 = int(os.environ.get("BENCH_SEED0", "0"))
PEERS = [p for p in os.environ.get("BENCH_PEERS", "optuna-gp,optuna-tpe,skopt-gp,cma,random").split(",") if p]
# Problems to run (default all): simplex4, simplex4_baselines, ema_baselines,
# simplex_all_baselines.
PROBLEMS = [p for p in os.environ.get("BENCH_PROBLEMS", "").split(",") if p]


class Objective:
    """Mean NLL of a merge of `dirs`, from a `bench_trajectory serve` process."""

    def __init__(self, binary, dirs):
        self.p = subprocess.Popen([binary, "serve", *dirs], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.n = len(dirs)
        self.cache = {}

    def __call__(self, w):
        key = tuple(float(np.float32(x)) for x in w)
        if key not in self.cache:
            self.p.stdin.write(",".join(repr(float(x)) for x in w) + "\n")
            self.cache[key] = float(self.p.stdout.readline())
        return self.cache[key]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def stick(u):
    """Unit cube -> simplex, uniform to uniform (stick-breaking with Beta(1, n-1-k))."""
    n, w, rest = len(u) + 1, [], 1.0
    for k, uk in enumerate(u):
        v = 1 - (1 - min(max(uk, 0.0), 1.0)) ** (1.0 / (n - 1 - k))
        w.append(rest * v)
        rest *= 1 - v
    return w + [rest]


def unstick(w):
    n, u, rest = len(w), [], 1.0
    for k in range(n - 1):
        v = min(max(w[k] / rest, 0.0), 1.0) if rest > 1e-300 else 0.0
        u.append(1 - (1 - v) ** (n - 1 - k))
        rest -= w[k]
    return u


def ema_weights(n, u):
    a = (1.0 / n) ** (1 - min(max(u, 0.0), 1.0))
    w = [(1 - a) ** (n - 1 - i) for i in range(n)]
    s = sum(w)
    return [x / s for x in w]


def ema_coordinate(w):
    """The EMA coordinate of weights w if they are an EMA member of the family, else None."""
    n = len(w)
    if w[-1] <= 0:
        return None
    a = 1 - w[-2] / w[-1]
    if not (1.0 / n - 1e-12 <= a <= 1.0):
        return None
    u = 1 - math.log(a) / math.log(1.0 / n)
    back = ema_weights(n, u)
    return u if all(abs(x - y) < 1e-9 for x, y in zip(back, w)) else None


def average(kind, n, k=None, decay=None):
    """ckmerge_common::weights::Average::weights."""
    if kind == "ema":
        w = [(1 - decay) ** (n - 1 - i) for i in range(n)]
    else:
        k = max(1, min(k, n))
        if kind == "window":
            tail = [1.0] * k
        elif kind == "wma":
            tail = [float(j + 1) for j in range(k)]
        else:  # minus-sqrt
            d = lambda j: 1 - math.sqrt(j / k)
            tail = [1.0] if k == 1 else [1 - d(1)] + [d(j) - d(j + 1) for j in range(1, k - 1)] + [d(k - 1)]
        w = [0.0] * (n - k) + tail
    s = sum(w)
    return [x / s for x in w]


def baseline_weights(n):
    """Each source, then the averages a run scores first (report::trajectory_averages, with
    the uniform average first)."""
    out = []
    for i in range(n):
        w = [0.0] * n
        w[i] = 1.0
        out.append(w)
    out.append(average("window", n, k=n))
    out += [average("ema", n, decay=a) for a in (0.1, 0.2, 0.5)]
    out.append(average("wma", n, k=n))
    out += [average("window", n, k=k) for k in (2, 4, 8) if k < n]
    out.append(average("minus-sqrt", n, k=n))
    return out


def run_peer(peer, d, f, budget, told, start, seed):
    """`told`: (point, value) pairs known before; `start`: points to evaluate first (counted)."""
    vals = []
    if peer == "random":
        rng = np.random.default_rng(seed)
        for x in start:
            vals.append(f(x))
        while len(vals) < budget:
            vals.append(f(list(rng.random(d))))
        return vals
    if peer == "cma":
        import cma
        best = min(told, key=lambda t: t[1])[0] if told else (start[0] if start else [0.5] * d)
        if d == 1:
            # pycma needs two dimensions: a dummy second coordinate, ignored.
            g = lambda x: f([x[0]])
            x0 = [best[0], 0.5]
        else:
            g, x0 = f, list(best)
        es = cma.CMAEvolutionStrategy(x0, 0.2, {"bounds": [0, 1], "seed": seed + 1, "verbose": -9})
        for x in start:
            vals.append(f(x))
        while len(vals) < budget:
            xs = es.ask()
            ys = []
            for x in xs:
                if len(vals) >= budget:
                    ys.append(math.inf)
                    continue
                v = g(list(np.clip(x, 0, 1)))
                vals.append(v)
                ys.append(v)
            es.tell(xs, ys)
        return vals
    if peer == "skopt-gp":
        from skopt import Optimizer
        opt = Optimizer([(0.0, 1.0)] * d, base_estimator="GP", acq_func="EI",
                        n_initial_points=max(1, len(start)), random_state=seed)
        for x, v in told:
            opt.tell(list(x), v)
        for x in start:
            v = f(x); opt.tell(list(x), v); vals.append(v)
        while len(vals) < budget:
            x = opt.ask()
            v = f(x); opt.tell(x, v); vals.append(v)
        return vals
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_startup = max(1, len(start) + len(told)) if told else max(1, len(start))
    if peer == "optuna-gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
    study = optuna.create_study(sampler=sampler)
    dist = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(d)}
    for x, v in told:
        study.add_trial(optuna.trial.create_trial(params={f"x{i}": float(x[i]) for i in range(d)},
                                                  distributions=dist, value=v))
    for x in start:
        study.enqueue_trial({f"x{i}": x[i] for i in range(d)})
    while len(vals) < budget:
        t = study.ask()
        x = [t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(d)]
        v = f(x)
        study.tell(t, v)
        vals.append(v)
    return vals


def first(vals, target):
    for i, v in enumerate(vals):
        if v <= target:
            return i + 1
    return None


def main():
    rust = json.load(open(sys.argv[1]))["results"]
    binary, out_path = sys.argv[2], sys.argv[3]
    out = []
    only = [o for o in os.environ.get("BENCH_ONLY", "").split(",") if o]
    for r in rust:
        if only and not any(o in r["trajectory"] for o in only):
            continue
        dirs = r["dirs"]
        n = len(dirs)
        obj = Objective(binary, dirs)
        # The baselines, evaluated here (the same values as the Rust run's: a check).
        base = [(w, obj(w)) for w in baseline_weights(n)]
        assert abs(min(v for _, v in base) - r["best_baseline"]) < 1e-9, "baselines differ from the Rust run's"
        base4 = [(w, obj([0.0] * (n - 4) + w)) for w in baseline_weights(4)] if n >= 4 else []
        best_baseline = r["best_baseline"]
        res = {"trajectory": r["trajectory"], "peers": {}}
        problems = []
        if n >= 4 and "simplex4" in r:
            f4 = lambda u: obj([0.0] * (n - 4) + stick(u))
            design = [unstick([0.25] * 4), unstick([0.125, 0.125, 0.125, 0.625]), unstick([0.125, 0.125, 0.625, 0.125])]
            s4 = r["simplex4_baselines"]
            told4 = [(unstick(w), v) for w, v in base4]
            problems.append(("simplex4", 3, f4, 15, [], design, {"uniform": r["simplex4"]["uniform"], "best": s4["best_baseline"]}))
            problems.append(("simplex4_baselines", 3, f4, 15, told4, [], {"uniform": r["simplex4"]["uniform"], "best": s4["best_baseline"]}))
        fe = lambda u: obj(ema_weights(n, u[0]))
        told_e = []
        for w, v in base:
            u = ema_coordinate(w)
            if u is not None:
                told_e.append(([u], v))
        ema_target = r["families"]["ema"]["grid_best"] + math.log(1.001)
        problems.append(("ema_baselines", 1, fe, 8, told_e, [] if told_e else [[0.0], [1.0], [0.5]], {"target": ema_target}))
        fa = lambda u: obj(stick(u))
        told_a = [(unstick(w), v) for w, v in base]
        problems.append(("simplex_all_baselines", n - 1, fa, 15, told_a, [], {"best": best_baseline}))
        for name, d, f, budget, told, start, goal in problems:
            if PROBLEMS and name not in PROBLEMS:
                continue
            for peer in PEERS:
                runs = []
                for seed in range(SEED0, SEED0 + SEEDS):
                    vals = run_peer(peer, d, f, budget, told, start, seed)
                    run = {"seed": seed, "values": vals}
                    if "uniform" in goal:
                        run["beats_uniform_at"] = first(vals, goal["uniform"] - 1e-15)
                    if "best" in goal:
                        run["beats_best_baseline_at"] = first(vals, goal["best"] - 1e-15)
                    if "target" in goal:
                        run["within_0.1pct_at"] = first(vals, goal["target"])
                    runs.append(run)
                res["peers"].setdefault(name, {})[peer] = runs
                print(f"{r['trajectory']} {name} {peer}: done", file=sys.stderr, flush=True)
                # Written after every peer: a long run stopped early keeps what it did.
                json.dump({"results": out + [res]}, open(out_path, "w"))
        obj.close()
        out.append(res)
    json.dump({"results": out}, open(out_path, "w"))


if __name__ == "__main__":
    main()
