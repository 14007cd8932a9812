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

    /// Rescale the weights to sum to 1.
    #[arg(long)]
    pub normalize: bool,
}

impl WeightArgs {
    /// Whether any weights were given.
    pub fn given(&self) -> bool {
        !self.weights.is_empty() || self.lambda.is_some()
    }

    /// The weights applied to `n` checkpoints, warning (in the log) where they do something
    /// the user may not intend: extrapolation, a sum other than 1. A single checkpoint
    /// needs none.
    pub fn resolve(&self, n: usize) -> Result<Vec<f32>, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::Grouping;

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
