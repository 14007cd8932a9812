//! Merge weights as every consumer applies them: one vector of per-source weights for a
//! plain merge, or one per tensor group. The same type travels from the search (which
//! turns an optimiser point into it, `SearchSpace::merge_weights`) over the wire
//! (`EvalRequest`, `StageRequest`) into the evaluator and the on-disk merge, which apply
//! tensor `i` with the vector of its group ([`MergeWeights::for_tensor`]).
//!
//! Weights are f32 because the merge kernels multiply in f32 (see
//! `ckmerge_kernels::merge`); the optimiser's f64 weights are rounded once, here.

use serde::{Deserialize, Serialize};

use crate::groups::GroupMap;

/// One weight per source checkpoint, per group (a plain merge is one group).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MergeWeights(Vec<Vec<f32>>);

impl MergeWeights {
    /// A plain merge: every tensor with `weights`.
    pub fn single(weights: Vec<f32>) -> MergeWeights {
        MergeWeights(vec![weights])
    }

    /// One vector per group, in the grouping's order.
    pub fn per_group(groups: Vec<Vec<f32>>) -> MergeWeights {
        MergeWeights(groups)
    }

    /// From the optimiser's f64 weights, one vector per group.
    pub fn from_f64(groups: &[Vec<f64>]) -> MergeWeights {
        MergeWeights(
            groups
                .iter()
                .map(|g| g.iter().map(|&x| x as f32).collect())
                .collect(),
        )
    }

    /// The vectors, one per group.
    pub fn groups(&self) -> &[Vec<f32>] {
        &self.0
    }

    /// Whether one vector applies to every tensor.
    pub fn is_single(&self) -> bool {
        self.0.len() == 1
    }

    /// Checks the shape against `sources` checkpoints and the groups of `map` (a single
    /// vector fits any grouping: it applies to every tensor), and that every weight is
    /// finite. The message names what is wrong.
    pub fn check(&self, sources: usize, map: &GroupMap) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("no weights given".into());
        }
        if !self.is_single() && self.0.len() != map.groups() {
            return Err(format!(
                "{} weight vectors for {} tensor groups; give one vector per group (or one for every tensor)",
                self.0.len(),
                map.groups()
            ));
        }
        for (g, w) in self.0.iter().enumerate() {
            if w.len() != sources {
                return Err(format!(
                    "{} weights for {sources} checkpoints{}; give exactly one weight per checkpoint",
                    w.len(),
                    self.group_label(g)
                ));
            }
            if let Some((i, x)) = w.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(format!(
                    "weight {} is {x}{}; weights must be finite numbers",
                    i + 1,
                    self.group_label(g)
                ));
            }
        }
        Ok(())
    }

    fn group_label(&self, g: usize) -> String {
        if self.is_single() {
            String::new()
        } else {
            format!(" in group {g}")
        }
    }

    /// The weights tensor `i` is merged with, under `map`.
    pub fn for_tensor(&self, map: &GroupMap, i: usize) -> &[f32] {
        if self.is_single() {
            &self.0[0]
        } else {
            &self.0[map.group(i)]
        }
    }
}

/// The paper's two-checkpoint merge `lambda * CKPT_T + (1 - lambda) * CKPT_PREV` as the
/// weights of `[CKPT_PREV, CKPT_T]`.
pub fn lerp_weights(lambda: f64) -> [f32; 2] {
    [(1.0 - lambda) as f32, lambda as f32]
}

/// The averages practitioners take over N checkpoints of one run, as merge weights in
/// training order (oldest first). Each sums to one; `k` counts the latest checkpoints
/// averaged (the rest get zero), clamped to `1..=n`.
///
/// - [`Average::Ema`]: exponential moving average with decay `a` in `(0, 1]`,
///   `w_i ∝ (1 - a)^(N - i)` (PMA: Tian et al. 2025, "Model Merging in Pre-training of
///   Large Language Models"); `a = 1` is the latest checkpoint alone, `a -> 0` the
///   uniform average.
/// - [`Average::Wma`]: linearly weighted over the latest `k`, `w ∝ 1, 2, ..., k` (PMA).
/// - [`Average::Window`]: uniform over the latest `k` (LAWA, Sanyal et al. 2023; SMA in
///   PMA when `k = N`).
/// - [`Average::MinusSqrt`]: Megatron-LM's `weighted_merge.py` `minus-sqrt` coefficients
///   over the latest `k`: the discrete differences of the learning-rate decay
///   `s(x) = 1 - sqrt(x)` at `x = j / k`, so merging emulates that decay (the oldest of the
///   window gets the largest weight, `1 - sqrt((k-1)/k)` goes to the newest).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Average {
    Ema { decay: f64 },
    Wma { k: usize },
    Window { k: usize },
    MinusSqrt { k: usize },
}

impl Average {
    /// The weights of `n` checkpoints (oldest first).
    pub fn weights(&self, n: usize) -> Vec<f64> {
        assert!(n >= 1, "an average of no checkpoints");
        let tail = |k: usize, f: &dyn Fn(usize, usize) -> f64| -> Vec<f64> {
            let k = k.clamp(1, n);
            let mut w = vec![0.0; n];
            for j in 0..k {
                w[n - k + j] = f(j, k);
            }
            let s: f64 = w.iter().sum();
            w.iter().map(|x| x / s).collect()
        };
        match *self {
            Average::Ema { decay } => {
                let a = decay.clamp(f64::MIN_POSITIVE, 1.0);
                let mut w: Vec<f64> = (0..n).map(|i| (1.0 - a).powi((n - 1 - i) as i32)).collect();
                let s: f64 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= s);
                w
            }
            Average::Wma { k } => tail(k, &|j, _| (j + 1) as f64),
            Average::Window { k } => tail(k, &|_, _| 1.0),
            Average::MinusSqrt { k } => tail(k, &|j, k| {
                // Megatron: d_j = 1 - sqrt(j / k); c_{k-1} = d_{k-1}, c_j = d_j - d_{j+1}
                // for 0 < j < k - 1, and c_0 takes the rest (1 - d_1).
                let d = |j: usize| 1.0 - (j as f64 / k as f64).sqrt();
                if k == 1 {
                    1.0
                } else if j == 0 {
                    1.0 - d(1)
                } else if j == k - 1 {
                    d(k - 1)
                } else {
                    d(j) - d(j + 1)
                }
            }),
        }
    }

    /// How the report and the log name it: `EMA 0.2`, `WMA 12`, `last 4`, `minus-sqrt 8`.
    pub fn label(&self, n: usize) -> String {
        match *self {
            Average::Ema { decay } => format!("EMA {decay}"),
            Average::Wma { k } => format!("WMA {}", k.clamp(1, n)),
            Average::Window { k } if k >= n => "uniform average".into(),
            Average::Window { k } => format!("last {k}"),
            Average::MinusSqrt { k } => format!("minus-sqrt {}", k.clamp(1, n)),
        }
    }
}

/// Merge weights as `ckmerge merge` and `ckmerge eval` take them on the command line.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct WeightArgs {
    /// One weight per checkpoint, comma-separated, in the order the checkpoints are given.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        conflicts_with = "lambda"
    )]
    pub weights: Vec<f64>,

    /// The paper's two-checkpoint merge: `lambda * CKPT_T + (1 - lambda) * CKPT_PREV`,
    /// with the checkpoints given as `CKPT_PREV CKPT_T` (earlier first).
    #[arg(long, allow_hyphen_values = true)]
    pub lambda: Option<f64>,

    /// The exponential moving average of the checkpoints (given oldest first) with decay
    /// A in (0, 1]: weight (1 - A)^(N - i) for checkpoint i, normalised (PMA's EMA).
    #[arg(long, value_name = "A", conflicts_with_all = ["weights", "lambda"])]
    pub ema: Option<f64>,

    /// The linearly weighted average of the latest K checkpoints (weights 1, 2, ..., K,
    /// normalised; PMA's WMA); without K, of all of them.
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "0",
          conflicts_with_all = ["weights", "lambda", "ema"])]
    pub wma: Option<usize>,

    /// The uniform average of the latest K checkpoints (LAWA; K = all: the simple average).
    #[arg(long, value_name = "K", conflicts_with_all = ["weights", "lambda", "ema", "wma"])]
    pub window: Option<usize>,

    /// Megatron-LM's `minus-sqrt` merge coefficients over the latest K checkpoints
    /// (without K, all of them).
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "0",
          conflicts_with_all = ["weights", "lambda", "ema", "wma", "window"])]
    pub minus_sqrt: Option<usize>,

    /// Rescale the weights to sum to 1.
    #[arg(long)]
    pub normalize: bool,
}

impl WeightArgs {
    /// Whether any weights were given.
    pub fn given(&self) -> bool {
        !self.weights.is_empty() || self.lambda.is_some() || self.average().is_some()
    }

    /// The trajectory average asked for (`--ema`, `--wma`, `--window`, `--minus-sqrt`);
    /// a `K` of 0 (the flag without a value) means all checkpoints.
    fn average(&self) -> Option<Average> {
        let all = |k: usize| if k == 0 { usize::MAX } else { k };
        if let Some(decay) = self.ema {
            return Some(Average::Ema { decay });
        }
        if let Some(k) = self.wma {
            return Some(Average::Wma { k: all(k) });
        }
        if let Some(k) = self.window {
            return Some(Average::Window { k });
        }
        self.minus_sqrt.map(|k| Average::MinusSqrt { k: all(k) })
    }

    /// The weights applied to `n` checkpoints, warning (in the log) where they do something
    /// the user may not intend: extrapolation, a sum other than 1. A single checkpoint
    /// needs none.
    pub fn resolve(&self, n: usize) -> Result<Vec<f32>, String> {
        if let Some(avg) = self.average() {
            return Self::resolve_average(avg, n);
        }
        let mut w: Vec<f64> = match self.lambda {
            Some(l) => {
                if !l.is_finite() {
                    return Err(format!("--lambda {l}: must be a finite number"));
                }
                if n != 2 {
                    return Err(format!("--lambda merges exactly two checkpoints (CKPT_PREV CKPT_T); got {n}: use --weights for more"));
                }
                if !(0.0..=1.0).contains(&l) {
                    tracing::warn!(
                        "lambda {l} is outside [0, 1]: this extrapolates beyond the checkpoints"
                    );
                }
                lerp_weights(l).iter().map(|&x| x as f64).collect()
            }
            None if self.weights.is_empty() && n == 1 => vec![1.0],
            None if self.weights.is_empty() => {
                return Err(format!(
                    "{n} checkpoints need --weights (one per checkpoint) or, for two, --lambda"
                ))
            }
            None => self.weights.clone(),
        };
        if w.len() != n {
            return Err(format!(
                "--weights has {} values for {n} checkpoints; give one weight per checkpoint",
                w.len()
            ));
        }
        if let Some(x) = w.iter().find(|x| !x.is_finite()) {
            return Err(format!("--weights contains {x}; weights must be finite"));
        }
        let sum: f64 = w.iter().sum();
        if self.normalize {
            if sum.abs() < 1e-12 {
                return Err(format!(
                    "--normalize: the weights sum to {sum}, which cannot be rescaled to 1"
                ));
            }
            w.iter_mut().for_each(|x| *x /= sum);
        } else if (sum - 1.0).abs() > 1e-6 {
            tracing::warn!("weights sum to {sum}, not 1: the merged parameters are scaled by {sum} (pass --normalize to rescale)");
        }
        if self.lambda.is_none() && w.iter().any(|&x| x < 0.0) {
            tracing::warn!("a weight is negative: this extrapolates beyond the checkpoints");
        }
        Ok(w.iter().map(|&x| x as f32).collect())
    }
}

impl WeightArgs {
    fn resolve_average(avg: Average, n: usize) -> Result<Vec<f32>, String> {
        match avg {
            Average::Ema { decay } if !(decay > 0.0 && decay <= 1.0) => {
                return Err(format!(
                    "--ema {decay}: the decay must be in (0, 1] (1: the latest checkpoint alone)"
                ));
            }
            Average::Window { k } if k == 0 || k > n => {
                return Err(format!(
                    "--window {k}: give the number of latest checkpoints to average, 1 to {n}"
                ));
            }
            Average::Wma { k } | Average::MinusSqrt { k } if k != usize::MAX && k > n => {
                return Err(format!(
                    "{k} latest checkpoints asked for, but {n} are given; give at most {n}"
                ));
            }
            _ => {}
        }
        if n < 2 {
            return Err(format!(
                "{} averages checkpoints along a run: give at least two, oldest first",
                avg.label(n)
            ));
        }
        let w = avg.weights(n);
        tracing::info!(
            "{}: weights {}",
            avg.label(n),
            w.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(w.iter().map(|&x| x as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::Grouping;

    #[test]
    fn trajectory_averages_match_their_definitions() {
        let close = |a: &[f64], b: &[f64]| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
            }
        };
        // EMA: (1-a)^(N-i), normalised; a = 1 is the last checkpoint.
        let s = 0.25 + 0.5 + 1.0;
        close(
            &Average::Ema { decay: 0.5 }.weights(3),
            &[0.25 / s, 0.5 / s, 1.0 / s],
        );
        close(&Average::Ema { decay: 1.0 }.weights(3), &[0.0, 0.0, 1.0]);
        close(
            &Average::Wma { k: 3 }.weights(4),
            &[0.0, 1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0],
        );
        close(&Average::Window { k: 2 }.weights(4), &[0.0, 0.0, 0.5, 0.5]);
        close(&Average::Window { k: 9 }.weights(2), &[0.5, 0.5]);
        // Megatron's own test case (tests of tools/checkpoint/weighted_merge.py): four
        // checkpoints, d_j = 1 - sqrt(j/4).
        let d: Vec<f64> = (0..4).map(|j| 1.0 - (j as f64 / 4.0).sqrt()).collect();
        let expected = [
            1.0 - ((d[1] - d[2]) + (d[2] - d[3]) + d[3]),
            d[1] - d[2],
            d[2] - d[3],
            d[3],
        ];
        close(&Average::MinusSqrt { k: 4 }.weights(4), &expected);
        close(&Average::MinusSqrt { k: 1 }.weights(3), &[0.0, 0.0, 1.0]);
        for avg in [
            Average::Ema { decay: 0.07 },
            Average::Wma { k: 12 },
            Average::Window { k: 5 },
            Average::MinusSqrt { k: 7 },
        ] {
            let w = avg.weights(12);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{avg:?}");
            assert!(w.iter().all(|&x| x >= 0.0), "{avg:?}");
        }
    }

    #[test]
    fn average_flags_are_checked_and_resolved() {
        let args = |f: &dyn Fn(&mut WeightArgs)| {
            let mut a = WeightArgs::default();
            f(&mut a);
            a
        };
        let w = args(&|a| a.window = Some(2)).resolve(4).unwrap();
        assert_eq!(w, vec![0.0, 0.0, 0.5, 0.5]);
        let w = args(&|a| a.wma = Some(0)).resolve(2).unwrap();
        assert_eq!(w, vec![1.0 / 3.0, 2.0 / 3.0]);
        let e = args(&|a| a.ema = Some(0.0)).resolve(3).unwrap_err();
        assert!(e.contains("--ema 0"), "{e}");
        let e = args(&|a| a.window = Some(5)).resolve(3).unwrap_err();
        assert!(e.contains("--window 5") && e.contains("1 to 3"), "{e}");
        let e = args(&|a| a.ema = Some(0.5)).resolve(1).unwrap_err();
        assert!(e.contains("at least two"), "{e}");
    }

    #[test]
    fn an_infinite_lambda_is_named_as_the_lambda_it_is() {
        for l in [f64::INFINITY, f64::NAN] {
            let args = WeightArgs {
                lambda: Some(l),
                ..Default::default()
            };
            let e = args.resolve(2).unwrap_err();
            assert!(e.starts_with(&format!("--lambda {l}:")), "{e}");
        }
    }

    #[test]
    fn one_vector_fits_every_grouping_and_group_vectors_must_match_it() {
        let names: Vec<String> = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let g = Grouping::parse(&["mlp".into(), "rest".into()]).unwrap();
        let map = g.resolve(&names).unwrap();
        let one = MergeWeights::single(vec![0.25, 0.75]);
        assert!(one.check(2, &map).is_ok());
        assert_eq!(one.for_tensor(&map, 1), &[0.25, 0.75]);
        let two = MergeWeights::per_group(vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert!(two.check(2, &map).is_ok());
        assert_eq!(two.for_tensor(&map, 0), &[1.0, 0.0]);
        assert_eq!(two.for_tensor(&map, 1), &[0.0, 1.0]);
        let e = two.check(2, &GroupMap::single(2)).unwrap_err();
        assert!(e.contains("2 weight vectors for 1 tensor groups"), "{e}");
        let e = one.check(3, &map).unwrap_err();
        assert!(e.contains("2 weights for 3 checkpoints"), "{e}");
        let e = MergeWeights::single(vec![f32::NAN, 1.0])
            .check(2, &map)
            .unwrap_err();
        assert!(e.contains("weight 1 is NaN"), "{e}");
        // The wire form is the bare list of vectors.
        assert_eq!(
            serde_json::to_value(&two).unwrap(),
            serde_json::json!([[1.0, 0.0], [0.0, 1.0]])
        );
    }
}
