//! Sample efficiency of ckmerge's optimiser, for scripts/bench_bo.sh.
//!
//! `bench_bo tabulate OUT.json` evaluates the real merge landscapes of the committed
//! trajectories with the in-memory evaluator (held-out mean NLL): lambda on a 0.01 grid
//! for every adjacent pair, and the simplex over the last three checkpoints on a
//! barycentric grid of step 0.02. `bench_bo run LANDSCAPES.json OUT.json` runs the
//! optimiser (EI, GP-Hedge; q = 1 and 4) and random search on those landscapes and on
//! Forrester, Branin, Hartmann-3 and Hartmann-6, 20 seeds each, writing every run's
//! best-so-far trace. The Python peers (bench_bo.py) read the same landscapes and use the
//! same interpolation; on the simplex each searches its own parametrisation (the peers
//! the unit cube through stick-breaking, ckmerge the free shares), the objective being
//! the same function of the weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckmerge_coordinator::bo::acquisition::Acquisition;
use ckmerge_coordinator::bo::optimizer::{Batch, Strategy};
use ckmerge_coordinator::bo::{BoConfig, Optimizer, SearchSpace};
use ckmerge_worker::eval::{EvalOptions, Evaluator};
use ckmerge_worker::test_support::fixtures;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Seeds per optimiser and problem: 20 unless `BENCH_SEEDS` says otherwise (medians over
/// 20 seeds move by about the gaps between optimisers; use more to compare variants).
fn seeds() -> u64 {
    std::env::var("BENCH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}
/// The first seed (`BENCH_SEED0`, default 0): a run on seeds not used while choosing a
/// default checks that choice on fresh draws.
fn seed0() -> u64 {
    std::env::var("BENCH_SEED0")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
const BUDGET: usize = 20;
const GRID_1D: usize = 100;
const GRID_2D: usize = 50;

fn tabulate(out: &Path) {
    let data = vec![ckmerge_common::protocol::DatasetSpec::new(
        "heldout",
        vec![fixtures().join("data/heldout.txt")],
    )];
    let mut land = serde_json::Map::new();
    for arch in ["llama", "neox"] {
        let steps = [
            "step-250",
            "step-500",
            "step-750",
            "step-1000",
            "step-1250",
            "step-1500",
        ];
        let dirs: Vec<PathBuf> = steps
            .iter()
            .map(|s| fixtures().join(arch).join(s))
            .collect();
        let mut ev = Evaluator::load(&dirs, &data, &EvalOptions::default()).unwrap();
        for k in 1..steps.len() {
            let mut grid = Vec::new();
            for i in 0..=GRID_1D {
                let lam = i as f64 / GRID_1D as f64;
                let mut w = vec![0f32; 6];
                let lw = ckmerge_kernels::merge::lerp_weights(lam);
                w[k - 1] = lw[0];
                w[k] = lw[1];
                grid.push(ev.evaluate(&w).unwrap().mean_nll);
            }
            land.insert(
                format!("{arch}-1d-{}-{}", steps[k - 1], steps[k]),
                json!({"kind": "lambda", "grid": grid}),
            );
            eprintln!("tabulated {arch} {}..{}", steps[k - 1], steps[k]);
        }
        // Simplex over the last three checkpoints: f[i][j] at weights (i h, j h, 1 - (i + j) h).
        let mut rows = Vec::new();
        for i in 0..=GRID_2D {
            let mut row = Vec::new();
            for j in 0..=(GRID_2D - i) {
                let (a, b) = (i as f32 / GRID_2D as f32, j as f32 / GRID_2D as f32);
                let w = [0.0, 0.0, 0.0, a, b, 1.0 - a - b];
                row.push(ev.evaluate(&w).unwrap().mean_nll);
            }
            rows.push(row);
        }
        land.insert(
            format!("{arch}-simplex-3"),
            json!({"kind": "simplex3", "grid": rows}),
        );
        eprintln!("tabulated {arch} simplex");
    }
    std::fs::write(out, serde_json::to_string(&Value::Object(land)).unwrap()).unwrap();
}

/// An objective on the unit cube.
type Objective = Box<dyn Fn(&[f64]) -> f64>;

/// A problem: its space, objective on the cube, minimum, and reference value.
struct Problem {
    name: String,
    space: SearchSpace,
    f: Objective,
    min: f64,
    /// For merge landscapes: the uniform average's value (for the simplex) or none.
    reference: Option<f64>,
}

fn interp1(grid: &[f64], x: f64) -> f64 {
    let n = grid.len() - 1;
    let t = x.clamp(0.0, 1.0) * n as f64;
    let i = (t.floor() as usize).min(n - 1);
    let a = t - i as f64;
    grid[i] * (1.0 - a) + grid[i + 1] * a
}

/// Linear interpolation on the barycentric grid (weights of the last three checkpoints).
fn interp_simplex(g: &[Vec<f64>], w: &[f64]) -> f64 {
    let n = g.len() - 1;
    let (x, y) = (w[0] * n as f64, w[1] * n as f64);
    let i = (x.floor() as usize).min(n);
    let j = (y.floor() as usize).min(n - i);
    let (a, b) = (x - i as f64, y - j as f64);
    let at = |i: usize, j: usize| g[i.min(n)][j.min(n - i.min(n))];
    if i + j >= n {
        return at(i, j);
    }
    if a + b <= 1.0 {
        at(i, j) * (1.0 - a - b) + at(i + 1, j) * a + at(i, j + 1) * b
    } else {
        at(i + 1, j + 1) * (a + b - 1.0) + at(i, j + 1) * (1.0 - a) + at(i + 1, j) * (1.0 - b)
    }
}

fn standard() -> Vec<Problem> {
    let forrester = |u: &[f64]| (6.0 * u[0] - 2.0).powi(2) * (12.0 * u[0] - 4.0).sin();
    let branin = |u: &[f64]| {
        let (x1, x2) = (15.0 * u[0] - 5.0, 15.0 * u[1]);
        let (a, b, c) = (
            1.0,
            5.1 / (4.0 * std::f64::consts::PI.powi(2)),
            5.0 / std::f64::consts::PI,
        );
        let (r, s, t) = (6.0, 10.0, 1.0 / (8.0 * std::f64::consts::PI));
        a * (x2 - b * x1 * x1 + c * x1 - r).powi(2) + s * (1.0 - t) * x1.cos() + s
    };
    fn hartmann(u: &[f64], a: &[&[f64]], p: &[&[f64]]) -> f64 {
        let alpha = [1.0, 1.2, 3.0, 3.2];
        -(0..4)
            .map(|i| {
                alpha[i]
                    * (-(0..u.len())
                        .map(|j| a[i][j] * (u[j] - p[i][j]).powi(2))
                        .sum::<f64>())
                    .exp()
            })
            .sum::<f64>()
    }
    let h3 = |u: &[f64]| {
        let a: [&[f64]; 4] = [
            &[3.0, 10.0, 30.0],
            &[0.1, 10.0, 35.0],
            &[3.0, 10.0, 30.0],
            &[0.1, 10.0, 35.0],
        ];
        let p: [&[f64]; 4] = [
            &[0.3689, 0.1170, 0.2673],
            &[0.4699, 0.4387, 0.7470],
            &[0.1091, 0.8732, 0.5547],
            &[0.0381, 0.5743, 0.8828],
        ];
        hartmann(u, &a, &p)
    };
    let h6 = |u: &[f64]| {
        let a: [&[f64]; 4] = [
            &[10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
            &[0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
            &[3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
            &[17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
        ];
        let p: [&[f64]; 4] = [
            &[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
            &[0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
            &[0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
            &[0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
        ];
        hartmann(u, &a, &p)
    };
    vec![
        Problem {
            name: "forrester-1d".into(),
            space: SearchSpace::Cube { dim: 1 },
            f: Box::new(forrester),
            min: -6.020_740_055,
            reference: None,
        },
        Problem {
            name: "branin-2d".into(),
            space: SearchSpace::Cube { dim: 2 },
            f: Box::new(branin),
            min: 0.397_887_357_7,
            reference: None,
        },
        Problem {
            name: "hartmann-3d".into(),
            space: SearchSpace::Cube { dim: 3 },
            f: Box::new(h3),
            min: -3.862_779_787,
            reference: None,
        },
        Problem {
            name: "hartmann-6d".into(),
            space: SearchSpace::Cube { dim: 6 },
            f: Box::new(h6),
            min: -3.322_368_011,
            reference: None,
        },
    ]
}

fn landscapes(path: &Path) -> Vec<Problem> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for (name, l) in v.as_object().unwrap() {
        match l["kind"].as_str().unwrap() {
            "lambda" => {
                let grid: Vec<f64> = serde_json::from_value(l["grid"].clone()).unwrap();
                let min = grid.iter().cloned().fold(f64::INFINITY, f64::min);
                out.push(Problem {
                    name: name.clone(),
                    space: SearchSpace::lambda(0.0).unwrap(),
                    f: Box::new(move |u| interp1(&grid, u[0])),
                    min,
                    reference: None,
                });
            }
            _ => {
                let grid: Vec<Vec<f64>> = serde_json::from_value(l["grid"].clone()).unwrap();
                let min = grid.iter().flatten().cloned().fold(f64::INFINITY, f64::min);
                let space = SearchSpace::simplex(vec![0.0; 3]).unwrap();
                let sp = space.clone();
                let g2 = grid.clone();
                let uniform = interp_simplex(&grid, &[1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]);
                out.push(Problem {
                    name: name.clone(),
                    space,
                    f: Box::new(move |u| interp_simplex(&g2, &sp.weights(u))),
                    min,
                    reference: Some(uniform),
                });
            }
        }
    }
    out
}

fn optimizer(p: &Problem, seed: u64, strategy: Strategy, batch: Batch) -> Optimizer {
    let d = p.space.dim();
    let initial_random = if matches!(p.space, SearchSpace::Cube { .. }) {
        d + 1
    } else {
        0
    };
    let cfg = BoConfig {
        seed,
        max_evals: BUDGET,
        strategy,
        batch,
        initial_random,
        ..Default::default()
    };
    Optimizer::new(p.space.clone(), cfg)
}

/// Synchronous batches of `q`: each batch is proposed before any of it is told.
fn run_bo(p: &Problem, seed: u64, q: usize, strategy: Strategy, batch: Batch) -> (Vec<f64>, f64) {
    let mut o = optimizer(p, seed, strategy, batch);
    let mut trace = Vec::new();
    let mut best = f64::INFINITY;
    let mut busy = 0.0;
    while trace.len() < BUDGET {
        let t = Instant::now();
        let batch = o.propose(q.min(BUDGET - trace.len()), &[]).unwrap();
        busy += t.elapsed().as_secs_f64();
        for u in batch {
            let v = (p.f)(&u);
            best = best.min(v);
            trace.push(best);
            o.tell(u, Ok(v));
        }
    }
    (trace, busy / BUDGET as f64)
}

/// The coordinator's main mode: `workers` evaluations in flight, each taking a time drawn
/// uniformly from [0.5, 1.5); whenever one finishes it is told and one new point is
/// proposed with the others pending. The trace is in order of completion.
fn run_async(
    p: &Problem,
    seed: u64,
    workers: usize,
    strategy: Strategy,
    batch: Batch,
) -> (Vec<f64>, f64) {
    let mut o = optimizer(p, seed, strategy, batch);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xA5A5);
    let mut running: Vec<(f64, Vec<f64>)> = Vec::new();
    let (mut now, mut busy, mut issued) = (0.0, 0.0, 0);
    let t = Instant::now();
    for u in o.propose(workers.min(BUDGET), &[]).unwrap() {
        running.push((now + rng.gen_range(0.5..1.5), u));
        issued += 1;
    }
    busy += t.elapsed().as_secs_f64();
    let mut trace = Vec::new();
    let mut best = f64::INFINITY;
    while trace.len() < BUDGET {
        let i = (0..running.len())
            .min_by(|&a, &b| running[a].0.partial_cmp(&running[b].0).unwrap())
            .unwrap();
        let (finish, u) = running.remove(i);
        now = finish;
        let v = (p.f)(&u);
        best = best.min(v);
        trace.push(best);
        o.tell(u, Ok(v));
        if issued < BUDGET {
            let pending: Vec<Vec<f64>> = running.iter().map(|r| r.1.clone()).collect();
            let t = Instant::now();
            let next = o.propose(1, &pending).unwrap().remove(0);
            busy += t.elapsed().as_secs_f64();
            running.push((now + rng.gen_range(0.5..1.5), next));
            issued += 1;
        }
    }
    (trace, busy / BUDGET as f64)
}

fn run_random(p: &Problem, seed: u64) -> Vec<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut best = f64::INFINITY;
    (0..BUDGET)
        .map(|_| {
            // Uniform on the space: the cube, or Dirichlet(1) on the simplex.
            let u = p.space.sample(&mut rng);
            best = best.min((p.f)(&u));
            best
        })
        .collect()
}

/// Latency of one surrogate fit plus q = 8 proposals at 100 observations in d dimensions,
/// best of 3: (the first fit, hyperparameters optimised from scratch with restarts; a
/// refit from the previous hyperparameters, as every `refit_every` observations past
/// `refit_all_until`; hyperparameters kept, as the other steps).
fn latency(d: usize) -> (f64, f64, f64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut obs = |o: &mut Optimizer, n: usize| {
        for _ in 0..n {
            let u: Vec<f64> = (0..d).map(|_| rng.gen()).collect();
            let v = u.iter().map(|x| (x - 0.4).powi(2)).sum::<f64>() + 0.01 * rng.gen::<f64>();
            o.tell(u, Ok(v));
        }
    };
    let (mut cold, mut warm, mut kept) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for rep in 0..3 {
        let cfg = BoConfig {
            seed: rep,
            refit_every: 2,
            ..Default::default()
        };
        let mut o = Optimizer::new(SearchSpace::Cube { dim: d }, cfg);
        obs(&mut o, 98);
        let t = Instant::now();
        o.propose(8, &[]).unwrap();
        cold = cold.min(t.elapsed().as_secs_f64());
        obs(&mut o, 1);
        let t = Instant::now();
        o.propose(8, &[]).unwrap();
        kept = kept.min(t.elapsed().as_secs_f64());
        obs(&mut o, 1);
        let t = Instant::now();
        o.propose(8, &[]).unwrap();
        warm = warm.min(t.elapsed().as_secs_f64());
    }
    (cold, warm, kept)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("tabulate") => tabulate(Path::new(&args[2])),
        Some("latency") => {
            for d in [1, 3, 6] {
                let (cold, warm, kept) = latency(d);
                println!(
                    "d = {d}: fit + 8 proposals at about 100 observations: {:.1} ms with a first fit, {:.1} ms with a warm refit, {:.1} ms with hyperparameters kept",
                    cold * 1e3,
                    warm * 1e3,
                    kept * 1e3
                );
            }
        }
        Some("run") => {
            let mut problems = standard();
            problems.extend(landscapes(Path::new(&args[2])));
            // `BENCH_ONLY=branin,hartmann` (substrings of problem names) narrows the run.
            if let Ok(only) = std::env::var("BENCH_ONLY") {
                problems.retain(|p| only.split(',').any(|o| p.name.contains(o)));
            }
            let n_seeds = seeds();
            let mut results = Vec::new();
            for p in &problems {
                for (name, q, strategy, batch) in [
                    ("ckmerge-ei", 1, Some(Strategy::Single(Acquisition::Ei)), Batch::Believer),
                    ("ckmerge-ei-q4", 4, Some(Strategy::Single(Acquisition::Ei)), Batch::JointEi),
                    ("ckmerge-ei-q4-believer", 4, Some(Strategy::Single(Acquisition::Ei)), Batch::Believer),
                    // q = 0 here means asynchronous with 4 workers (run_async).
                    ("ckmerge-ei-async4", 0, Some(Strategy::Single(Acquisition::Ei)), Batch::JointEi),
                    ("ckmerge-ei-async4-believer", 0, Some(Strategy::Single(Acquisition::Ei)), Batch::Believer),
                    ("ckmerge-hedge", 1, Some(Strategy::Hedge), Batch::Believer),
                    ("ckmerge-hedge-q4", 4, Some(Strategy::Hedge), Batch::Believer),
                    ("random", 1, None, Batch::Believer),
                ] {
                    let mut traces = Vec::new();
                    let mut per_eval = 0.0;
                    for seed in seed0()..seed0() + n_seeds {
                        match strategy {
                            Some(s) => {
                                let (t, busy) = match q {
                                    0 => run_async(p, seed, 4, s, batch),
                                    _ => run_bo(p, seed, q, s, batch),
                                };
                                per_eval += busy / n_seeds as f64;
                                traces.push(t);
                            }
                            None => traces.push(run_random(p, seed)),
                        }
                    }
                    eprintln!("{} {name}: done", p.name);
                    results.push(
                        json!({"problem": p.name, "optimizer": name, "q": if q == 0 { json!("4 async") } else { json!(q) }, "min": p.min,
                        "reference": p.reference, "traces": traces, "seconds_per_eval": per_eval}),
                    );
                }
            }
            let lat: Vec<Value> = [1, 3, 6]
                .iter()
                .map(|&d| {
                    let (cold, warm, kept) = latency(d);
                    json!({"dim": d, "seconds_first_fit": cold, "seconds_warm_refit": warm, "seconds_fixed_hyperparameters": kept})
                })
                .collect();
            let out = json!({"results": results, "latency_fit_plus_8_proposals_at_100": lat});
            std::fs::write(&args[3], serde_json::to_string(&out).unwrap()).unwrap();
        }
        _ => eprintln!(
            "usage: bench_bo tabulate OUT.json | bench_bo run LANDSCAPES.json OUT.json | bench_bo latency"
        ),
    }
}
