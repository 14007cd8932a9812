//! Searches over many checkpoints against the averages practitioners take, for
//! scripts/bench_trajectory.sh: on real trajectories, every objective value is a live
//! evaluation of the merge (held-out mean NLL, the in-memory evaluator), none interpolated.
//!
//! `bench_trajectory run OUT.json` runs, on each trajectory (the committed fixtures
//! `long/` (12 checkpoints, warm-up, constant and decay phases), `llama/` and `neox/`
//! (6 checkpoints each), and the directories in `BENCH_UNSEEN`, comma-separated, each
//! holding `step-*` checkpoints):
//! - the baselines: each checkpoint, the uniform average, EMA at 0.1, 0.2 and 0.5, WMA,
//!   the last 2, 4, 8 and Megatron's minus-sqrt over all;
//! - a 4-way simplex search over the last four checkpoints (`BENCH_SEEDS` seeds, 15
//!   evaluations): when it first beats their uniform average, and how close its closest
//!   two trials are (in weights);
//! - each family search (EMA, WMA, window, minus-sqrt over all checkpoints; 8
//!   evaluations): when it first comes within 0.1 % (perplexity) of the best of a fine grid
//!   over that family (101 decays for EMA, every window otherwise);
//! - each of these with the baselines given first, as a run does (`search.baselines`);
//! - the simplex over all checkpoints starting from every baseline (15 evaluations): when
//!   it first beats the best baseline.
//!
//! `bench_trajectory serve DIR...` answers on stdout, one line each, the mean NLL of the
//! merge whose weights (one per DIR, comma-separated) it reads from each stdin line: the
//! same objective for the Python peers (scripts/bench/bench_trajectory.py).

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use ckmerge_common::weights::Average;
use ckmerge_coordinator::bo::space::Family;
use ckmerge_coordinator::bo::{BoConfig, Optimizer, SearchSpace};
use ckmerge_worker::eval::{EvalOptions, Evaluator};
use ckmerge_worker::test_support::fixtures;
use serde_json::{json, Value};

const SIMPLEX_BUDGET: usize = 15;
const FAMILY_BUDGET: usize = 8;
const WHOLE_BUDGET: usize = 15;

fn seeds() -> u64 {
    std::env::var("BENCH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

fn seed0() -> u64 {
    std::env::var("BENCH_SEED0")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The `step-*` directories of a trajectory, in training order.
fn steps(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")
                .and_then(|s| s.parse().ok())
                .map(|k| (k, e.path()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// Live evaluations of merges of one trajectory, cached by their (f32) weights.
struct Objective {
    ev: Evaluator,
    cache: HashMap<Vec<u32>, f64>,
    evaluations: usize,
}

impl Objective {
    fn load(dirs: &[PathBuf]) -> Objective {
        let data = vec![ckmerge_common::protocol::DatasetSpec::new(
            "heldout",
            vec![fixtures().join("data/heldout.txt")],
        )];
        Objective {
            ev: Evaluator::load(dirs, &data, &EvalOptions::default()).unwrap(),
            cache: HashMap::new(),
            evaluations: 0,
        }
    }

    fn nll(&mut self, w: &[f64]) -> f64 {
        let w32: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        let key: Vec<u32> = w32.iter().map(|x| x.to_bits()).collect();
        if let Some(v) = self.cache.get(&key) {
            return *v;
        }
        let v = self.ev.evaluate(&w32).unwrap().mean_nll;
        self.evaluations += 1;
        self.cache.insert(key, v);
        v
    }
}

fn baselines(n: usize) -> Vec<Average> {
    // The sources alone are scored separately (by name).
    let mut v = vec![Average::Window { k: n }];
    for decay in [0.1, 0.2, 0.5] {
        v.push(Average::Ema { decay });
    }
    v.push(Average::Wma { k: n });
    for k in [2, 4, 8] {
        if k < n {
            v.push(Average::Window { k });
        }
    }
    v.push(Average::MinusSqrt { k: n });
    v
}

/// Runs `space` for `budget` evaluations (q = 1) on `f` over the weights; returns the
/// values in order and the smallest distance between two trials' weights.
fn search(
    space: &SearchSpace,
    seed: u64,
    budget: usize,
    priors: &[(Vec<f64>, f64)],
    f: &mut dyn FnMut(&[f64]) -> f64,
) -> (Vec<f64>, Vec<Vec<f64>>, f64) {
    let mut o = Optimizer::new(
        space.clone(),
        BoConfig {
            seed,
            max_evals: budget,
            ..Default::default()
        },
    );
    // As a run does with its baselines (search::baselines::tell): those in the space.
    for (w, v) in priors {
        if let Some(u) = space.point_of(w) {
            o.tell_prior(u, *v);
        }
    }
    let mut values = Vec::new();
    while o.stop_reason(0.0).is_none() {
        let Ok(pts) = o.propose(1, &[]) else { break };
        for u in pts {
            let v = f(&space.weights(&u));
            values.push(v);
            o.tell(u, Ok(v));
        }
    }
    let ws: Vec<Vec<f64>> = o.observations.iter().map(|x| x.weights.clone()).collect();
    let mut closest = f64::INFINITY;
    for i in 0..ws.len() {
        for j in 0..i {
            let d = ws[i]
                .iter()
                .zip(&ws[j])
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            closest = closest.min(d);
        }
    }
    (values, ws, closest)
}

/// The first evaluation (1-based) whose value is at most `target`, if any.
fn first_at_most(values: &[f64], target: f64) -> Option<usize> {
    values.iter().position(|&v| v <= target).map(|i| i + 1)
}

fn run_trajectory(name: &str, role: &str, dirs: &[PathBuf]) -> Value {
    let n = dirs.len();
    let mut obj = Objective::load(dirs);
    let mut out = serde_json::Map::new();
    out.insert("trajectory".into(), json!(name));
    out.insert("role".into(), json!(role));
    out.insert("checkpoints".into(), json!(n));
    // Baselines, as a run scores them first (search::baselines).
    let mut base = serde_json::Map::new();
    let mut priors: Vec<(Vec<f64>, f64)> = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let mut w = vec![0.0; n];
        w[i] = 1.0;
        let v = obj.nll(&w);
        base.insert(
            d.file_name().unwrap().to_string_lossy().into_owned(),
            json!(v),
        );
        priors.push((w, v));
    }
    for a in baselines(n) {
        let w = a.weights(n);
        let v = obj.nll(&w);
        base.insert(a.label(n), json!(v));
        priors.push((w, v));
    }
    let best_baseline = base
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    out.insert("baselines".into(), Value::Object(base));
    out.insert("baseline_points".into(), json!(priors));
    out.insert(
        "dirs".into(),
        json!(dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()),
    );
    out.insert("best_baseline".into(), json!(best_baseline));

    // 4-way simplex over the last four.
    if n >= 4 {
        let last4 = |w: &[f64]| -> Vec<f64> {
            let mut full = vec![0.0; n];
            full[n - 4..].copy_from_slice(w);
            full
        };
        let uniform = obj.nll(&last4(&[0.25; 4]));
        let space = SearchSpace::simplex(vec![0.0; 4]).unwrap();
        // The baselines a run over these four would score first.
        let mut priors4: Vec<(Vec<f64>, f64)> = Vec::new();
        for i in 0..4 {
            let mut w = vec![0.0; 4];
            w[i] = 1.0;
            priors4.push((w.clone(), obj.nll(&last4(&w))));
        }
        for a in baselines(4) {
            let w = a.weights(4);
            priors4.push((w.clone(), obj.nll(&last4(&w))));
        }
        let best_prior4 = priors4.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        for (key, with) in [("simplex4", false), ("simplex4_baselines", true)] {
            let mut runs = Vec::new();
            for seed in seed0()..seed0() + seeds() {
                let pri: &[(Vec<f64>, f64)] = if with { &priors4 } else { &[] };
                let (values, weights, closest) =
                    search(&space, seed, SIMPLEX_BUDGET, pri, &mut |w| {
                        obj.nll(&last4(w))
                    });
                runs.push(json!({
                    "seed": seed,
                    "values": values,
                    "weights": weights,
                    "closest_weights": closest,
                    "beats_uniform_at": values.iter().position(|&v| v < uniform).map(|i| i + 1),
                    "beats_best_baseline_at": values.iter().position(|&v| v < best_prior4).map(|i| i + 1),
                }));
            }
            out.insert(
                key.into(),
                json!({"uniform": uniform, "best_baseline": best_prior4, "baselines": priors4.len(), "points": priors4, "runs": runs}),
            );
        }
    }

    // Families over all checkpoints.
    let mut fams = serde_json::Map::new();
    for (label, family) in [
        ("ema", Family::Ema),
        ("wma", Family::Wma),
        ("window", Family::Window),
        ("minus-sqrt", Family::MinusSqrt),
    ] {
        let space = SearchSpace::family(family, n).unwrap();
        let grid: Vec<f64> = if family.discrete() {
            (0..n)
                .map(|i| space.weights(&[i as f64 / (n - 1) as f64]))
                .map(|w| obj.nll(&w))
                .collect()
        } else {
            (0..=100)
                .map(|i| space.weights(&[i as f64 / 100.0]))
                .map(|w| obj.nll(&w))
                .collect()
        };
        let grid_best = grid.iter().cloned().fold(f64::INFINITY, f64::min);
        // Within 0.1 % in perplexity: exp(v - best) <= 1.001.
        let target = grid_best + 1.001f64.ln();
        let mut entry = serde_json::Map::new();
        entry.insert("grid".into(), json!(grid));
        entry.insert("grid_best".into(), json!(grid_best));
        // With baselines, the family's members among them are known before the search:
        // a target they already meet is reached at evaluation 0.
        let prior_best = priors
            .iter()
            .filter(|(w, _)| space.point_of(w).is_some())
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min);
        for (key, with) in [("runs", false), ("runs_baselines", true)] {
            let mut runs = Vec::new();
            for seed in seed0()..seed0() + seeds() {
                let pri: &[(Vec<f64>, f64)] = if with { &priors } else { &[] };
                let (values, _, _) = search(&space, seed, FAMILY_BUDGET, pri, &mut |w| obj.nll(w));
                let within = if with && prior_best <= target {
                    Some(0)
                } else {
                    first_at_most(&values, target)
                };
                runs.push(json!({
                    "seed": seed,
                    "values": values,
                    "within_0.1pct_at": within,
                    "beats_best_baseline_at": values.iter().position(|&v| v < best_baseline).map(|i| i + 1),
                }));
            }
            entry.insert(key.into(), json!(runs));
        }
        fams.insert(label.into(), Value::Object(entry));
    }
    out.insert("families".into(), Value::Object(fams));

    // The whole search over all N: the simplex, starting from every baseline.
    let space = SearchSpace::simplex(vec![0.0; n]).unwrap();
    let mut runs = Vec::new();
    for seed in seed0()..seed0() + seeds() {
        let (values, _, closest) = search(&space, seed, WHOLE_BUDGET, &priors, &mut |w| obj.nll(w));
        runs.push(json!({
            "seed": seed,
            "values": values,
            "closest_weights": closest,
            "beats_best_baseline_at": values.iter().position(|&v| v < best_baseline).map(|i| i + 1),
        }));
    }
    out.insert(
        "simplex_all_baselines".into(),
        json!({"baselines": priors.len(), "runs": runs}),
    );
    out.insert("evaluations".into(), json!(obj.evaluations));
    eprintln!("{name}: {} evaluations", obj.evaluations);
    Value::Object(out)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("run") => {
            let mut trajectories: Vec<(String, String, Vec<PathBuf>)> = vec![
                (
                    "fixture-long".into(),
                    "tune".into(),
                    steps(&fixtures().join("long")),
                ),
                (
                    "fixture-llama".into(),
                    "tune".into(),
                    steps(&fixtures().join("llama")),
                ),
                (
                    "fixture-neox".into(),
                    "confirm".into(),
                    steps(&fixtures().join("neox")),
                ),
            ];
            if let Ok(unseen) = std::env::var("BENCH_UNSEEN") {
                for d in unseen.split(',').filter(|s| !s.is_empty()) {
                    let p = PathBuf::from(d);
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    trajectories.push((name, "confirm".into(), steps(&p)));
                }
            }
            if let Ok(only) = std::env::var("BENCH_ONLY") {
                trajectories.retain(|t| only.split(',').any(|o| t.0.contains(o)));
            }
            let results: Vec<Value> = trajectories
                .iter()
                .map(|(name, role, dirs)| run_trajectory(name, role, dirs))
                .collect();
            std::fs::write(
                &args[2],
                serde_json::to_string(&json!({"results": results})).unwrap(),
            )
            .unwrap();
        }
        Some("serve") => {
            let dirs: Vec<PathBuf> = args[2..].iter().map(PathBuf::from).collect();
            let mut obj = Objective::load(&dirs);
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let line = line.unwrap();
                let w: Vec<f64> = line
                    .split(',')
                    .map(|x| x.trim().parse().expect("a weight"))
                    .collect();
                assert_eq!(w.len(), dirs.len(), "one weight per checkpoint");
                println!("{}", obj.nll(&w));
            }
        }
        _ => eprintln!("usage: bench_trajectory run OUT.json | bench_trajectory serve DIR..."),
    }
}
