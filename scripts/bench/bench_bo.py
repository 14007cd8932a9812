#!/usr/bin/env python3
"""Python peers for scripts/bench_bo.sh: scikit-optimize (gp_hedge; EI on request), Optuna
(GPSampler, TPE) and bayes_opt on the problems of coordinator/examples/bench_bo.rs, with
the same objectives (the tabulated merge landscapes with the same interpolation, the
same unit-cube parametrisation of the simplex), the same budget and seeds. Each peer gets
as many initial points as ckmerge uses (1-D landscapes: the two ends, which every peer is
given first as the paper does, then one more; cube problems: d + 2), then runs on its own.
Writes every run's best-so-far trace; q = 4 runs use each library's batch interface
(scikit-optimize's constant liar `ask(n_points=4)`, Optuna asking 4 trials before telling).
"""
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

torch.set_num_threads(1)  # Optuna's GPSampler; the script runs as two processes on two cores

warnings.filterwarnings("ignore")
# BENCH_SEEDS and BENCH_ONLY as for the Rust side (coordinator/examples/bench_bo.rs).
SEEDS, BUDGET = int(os.environ.get("BENCH_SEEDS", "20")), 20
SEED0 = int(os.environ.get("BENCH_SEED0", "0"))
ONLY = [o for o in os.environ.get("BENCH_ONLY", "").split(",") if o]


def forrester(u): return (6 * u[0] - 2) ** 2 * math.sin(12 * u[0] - 4)


def branin(u):
    x1, x2 = 15 * u[0] - 5, 15 * u[1]
    b, c, t = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1 * x1 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def hartmann(u, A, P):
    alpha = [1.0, 1.2, 3.0, 3.2]
    return -sum(alpha[i] * math.exp(-sum(A[i][j] * (u[j] - P[i][j]) ** 2 for j in range(len(u)))) for i in range(4))


H3A = [[3, 10, 30], [0.1, 10, 35], [3, 10, 30], [0.1, 10, 35]]
H3P = [[0.3689, 0.1170, 0.2673], [0.4699, 0.4387, 0.7470], [0.1091, 0.8732, 0.5547], [0.0381, 0.5743, 0.8828]]
H6A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
H6P = [[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886], [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
       [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650], [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381]]


def interp1(grid, x):
    n = len(grid) - 1
    t = min(max(x, 0.0), 1.0) * n
    i = min(int(math.floor(t)), n - 1)
    a = t - i
    return grid[i] * (1 - a) + grid[i + 1] * a


def stick(u):
    """The cube-to-simplex map of SearchSpace::Simplex (3 weights, no lower bounds)."""
    n, w, rest = 3, [], 1.0
    for k, uk in enumerate(u):
        v = 1 - (1 - min(max(uk, 0.0), 1.0)) ** (1.0 / (n - 1 - k))
        w.append(rest * v)
        rest *= 1 - v
    return w + [rest]


def interp_simplex(g, w):
    n = len(g) - 1
    x, y = w[0] * n, w[1] * n
    i = min(int(math.floor(x)), n)
    j = min(int(math.floor(y)), n - i)
    a, b = x - i, y - j
    at = lambda i, j: g[min(i, n)][min(j, n - min(i, n))]
    if i + j >= n:
        return at(i, j)
    if a + b <= 1:
        return at(i, j) * (1 - a - b) + at(i + 1, j) * a + at(i, j + 1) * b
    return at(i + 1, j + 1) * (a + b - 1) + at(i, j + 1) * (1 - a) + at(i + 1, j) * (1 - b)


def problems(landscapes):
    ps = [("forrester-1d", 1, forrester), ("branin-2d", 2, branin),
          ("hartmann-3d", 3, lambda u: hartmann(u, H3A, H3P)), ("hartmann-6d", 6, lambda u: hartmann(u, H6A, H6P))]
    out = [(n, d, f, "cube") for n, d, f in ps]
    for name, l in landscapes.items():
        if l["kind"] == "lambda":
            out.append((name, 1, (lambda g: lambda u: interp1(g, u[0]))(l["grid"]), "lambda"))
        else:
            out.append((name, 2, (lambda g: lambda u: interp_simplex(g, stick(u)))(l["grid"]), "simplex"))
    return out


def initial(kind, d):
    """Points every optimiser starts with (as ckmerge's design), then counts of random ones."""
    if kind == "lambda":
        # The paper's two ends; each optimiser picks the third point itself (ckmerge's is
        # the middle of the better half, Optimizer::lambda_probe).
        return [[0.0], [1.0]], 0
    if kind == "simplex":
        # ckmerge's design (SearchSpace::anchor_points) in the peers' stick-breaking cube:
        # the uniform average (1/3, 1/3, 1/3), then halfway from it to the latest
        # checkpoint (1/6, 1/6, 2/3) and to the one before (1/6, 2/3, 1/6).
        return [[5.0 / 9.0, 0.5], [11.0 / 36.0, 0.2], [11.0 / 36.0, 0.8]], 0
    return [[0.5] * d], d + 1


def trace_of(values):
    best, out = math.inf, []
    for v in values[:BUDGET]:
        best = min(best, v)
        out.append(best)
    return out


def run_skopt(f, d, kind, seed, acq, q):
    from skopt import Optimizer
    fixed, n_random = initial(kind, d)
    # Told points count towards scikit-optimize's initial points.
    opt = Optimizer([(0.0, 1.0)] * d, base_estimator="GP", acq_func=acq, n_initial_points=max(len(fixed) + n_random, 1),
                    random_state=seed)
    vals = []
    for x in fixed:
        v = f(x); opt.tell(x, v); vals.append(v)
    while len(vals) < BUDGET:
        xs = opt.ask(n_points=min(q, BUDGET - len(vals))) if q > 1 else [opt.ask()]
        ys = [f(x) for x in xs]
        opt.tell(xs, ys)
        vals += ys
    return vals


def run_optuna(f, d, kind, seed, sampler_name, q):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fixed, n_random = initial(kind, d)
    n_startup = len(fixed) + n_random
    if sampler_name == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, constant_liar=q > 1)
    study = optuna.create_study(sampler=sampler)
    for x in fixed:
        study.enqueue_trial({f"x{i}": x[i] for i in range(d)})
    vals = []
    while len(vals) < BUDGET:
        # Optuna samples at suggest time: suggest the whole batch before telling any of it.
        trials = [study.ask() for _ in range(min(q, BUDGET - len(vals)))]
        xs = [[t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(d)] for t in trials]
        for t, x in zip(trials, xs):
            v = f(x)
            study.tell(t, v)
            vals.append(v)
    return vals


def run_optuna_async(f, d, kind, seed, workers=4):
    """The coordinator's main mode, as run_async in bench_bo.rs: `workers` trials running,
    each taking a time drawn uniformly from [0.5, 1.5); whenever one finishes it is told and
    one new trial is asked with the others still running (GPSampler then maximises qLogEI
    over them)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fixed, n_random = initial(kind, d)
    sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=len(fixed) + n_random)
    study = optuna.create_study(sampler=sampler)
    for x in fixed:
        study.enqueue_trial({f"x{i}": x[i] for i in range(d)})
    rng = np.random.default_rng(seed ^ 0xA5A5)
    running, vals, now, issued = [], [], 0.0, 0

    def launch():
        t = study.ask()
        x = [t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(d)]
        running.append((now + rng.uniform(0.5, 1.5), t, x))

    for _ in range(min(workers, BUDGET)):
        launch()
        issued += 1
    while len(vals) < BUDGET:
        running.sort(key=lambda r: r[0])
        now, t, x = running.pop(0)
        v = f(x)
        study.tell(t, v)
        vals.append(v)
        if issued < BUDGET:
            launch()
            issued += 1
    return vals


def run_bayes_opt(f, d, kind, seed):
    from bayes_opt import BayesianOptimization
    fixed, n_random = initial(kind, d)
    bo = BayesianOptimization(f=None, pbounds={f"x{i}": (0.0, 1.0) for i in range(d)}, random_state=seed, verbose=0,
                              allow_duplicate_points=True)
    vals = []
    for x in fixed:
        v = f(x); bo.register(params={f"x{i}": x[i] for i in range(d)}, target=-v); vals.append(v)
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        x = list(rng.random(d)); v = f(x)
        bo.register(params={f"x{i}": x[i] for i in range(d)}, target=-v); vals.append(v)
    while len(vals) < BUDGET:
        p = bo.suggest()
        x = [p[f"x{i}"] for i in range(d)]
        v = f(x)
        bo.register(params=p, target=-v)
        vals.append(v)
    return vals


def main():
    landscapes = json.load(open(sys.argv[1]))
    out = []
    peers = [("skopt-gp_hedge", 1, lambda f, d, k, s: run_skopt(f, d, k, s, "gp_hedge", 1)),
             ("skopt-EI", 1, lambda f, d, k, s: run_skopt(f, d, k, s, "EI", 1)),
             ("skopt-gp_hedge-q4", 4, lambda f, d, k, s: run_skopt(f, d, k, s, "gp_hedge", 4)),
             ("optuna-gp", 1, lambda f, d, k, s: run_optuna(f, d, k, s, "gp", 1)),
             ("optuna-gp-q4", 4, lambda f, d, k, s: run_optuna(f, d, k, s, "gp", 4)),
             ("optuna-gp-async4", "4 async", lambda f, d, k, s: run_optuna_async(f, d, k, s)),
             ("optuna-tpe", 1, lambda f, d, k, s: run_optuna(f, d, k, s, "tpe", 1)),
             ("bayes_opt", 1, lambda f, d, k, s: run_bayes_opt(f, d, k, s))]
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    for name, d, f, kind in problems(landscapes):
        if ONLY and not any(o in name for o in ONLY):
            continue
        for peer, q, run in peers:
            if only and peer not in only:
                continue
            t = time.perf_counter()
            traces = [trace_of(run(f, d, kind, s)) for s in range(SEED0, SEED0 + SEEDS)]
            per_eval = (time.perf_counter() - t) / (SEEDS * BUDGET)
            out.append({"problem": name, "optimizer": peer, "q": q, "traces": traces, "seconds_per_eval": per_eval})
            print(f"{name} {peer}: {per_eval * 1000:.1f} ms/eval", flush=True)
            json.dump({"results": out}, open(sys.argv[2], "w"))  # after each, so a cut run keeps its results


if __name__ == "__main__":
    main()
