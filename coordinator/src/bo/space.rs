//! Search spaces, each a bijection between the unit cube the surrogate works in and the
//! merge weights a worker applies.
//!
//! - [`SearchSpace::Lambda`]: the paper's two-checkpoint space, `lambda` in `[lo, hi]`
//!   (`[alpha, 1]`; bounds outside `[0, 1]` extrapolate and must be asked for), weights
//!   `[1 - lambda, lambda]` for `[prev, cur]`.
//! - [`SearchSpace::Simplex`]: N checkpoints, weights `w_i >= l_i` summing to one. The cube
//!   `[0, 1]^(N-1)` maps to the simplex by stick-breaking with Beta(1, N-1-k) quantiles, so
//!   a uniform point of the cube is a uniform point of the simplex (Dirichlet(1, ..., 1)):
//!   space-filling designs in the cube stay space-filling on the simplex.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SearchSpace {
    Lambda {
        lo: f64,
        hi: f64,
    },
    Simplex {
        lower: Vec<f64>,
    },
    /// The unit cube itself, "weights" = the point: for benchmark functions and tests.
    Cube {
        dim: usize,
    },
    /// Per-group weights: `groups` blocks, each N weights on the simplex (stick-breaking
    /// per block); weights are the blocks laid end to end (see [`SearchSpace::split_groups`]).
    Grouped {
        groups: usize,
        n: usize,
    },
}

impl SearchSpace {
    /// The paper's space, `lambda` in `[alpha, 1]`.
    pub fn lambda(alpha: f64) -> Result<SearchSpace, String> {
        Self::lambda_range(alpha, 1.0, false)
    }

    /// `lambda` in `[lo, hi]`; leaving `[0, 1]` needs `extrapolate`.
    pub fn lambda_range(lo: f64, hi: f64, extrapolate: bool) -> Result<SearchSpace, String> {
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(format!("lambda range [{lo}, {hi}] is empty"));
        }
        if !extrapolate && (lo < 0.0 || hi > 1.0) {
            return Err(format!(
                "lambda range [{lo}, {hi}] leaves [0, 1]; extrapolation must be enabled explicitly"
            ));
        }
        Ok(SearchSpace::Lambda { lo, hi })
    }

    /// N weights on the simplex with per-weight lower bounds (zeros for none).
    pub fn simplex(lower: Vec<f64>) -> Result<SearchSpace, String> {
        if lower.len() < 2 {
            return Err("a simplex search needs at least two checkpoints".into());
        }
        if lower.iter().any(|l| !(0.0..1.0).contains(l)) || lower.iter().sum::<f64>() >= 1.0 {
            return Err(format!(
                "lower bounds {lower:?} must be in [0, 1) and sum to less than 1"
            ));
        }
        Ok(SearchSpace::Simplex { lower })
    }

    /// Dimension of the cube the surrogate works in.
    pub fn dim(&self) -> usize {
        match self {
            SearchSpace::Lambda { .. } => 1,
            SearchSpace::Simplex { lower } => lower.len() - 1,
            SearchSpace::Cube { dim } => *dim,
            SearchSpace::Grouped { groups, n } => groups * (n - 1),
        }
    }

    /// Splits weights of a [`SearchSpace::Grouped`] point into one vector per group.
    pub fn split_groups(&self, w: &[f64]) -> Vec<Vec<f64>> {
        match self {
            SearchSpace::Grouped { n, .. } => w.chunks(*n).map(<[f64]>::to_vec).collect(),
            _ => vec![w.to_vec()],
        }
    }

    /// The weights a worker or the on-disk merge applies for the point's weights `w`:
    /// one vector, or one per group.
    pub fn merge_weights(&self, w: &[f64]) -> ckmerge_common::MergeWeights {
        ckmerge_common::MergeWeights::from_f64(&self.split_groups(w))
    }

    fn block(n: usize) -> SearchSpace {
        SearchSpace::Simplex {
            lower: vec![0.0; n],
        }
    }

    /// Number of checkpoints (weights).
    pub fn n_weights(&self) -> usize {
        match self {
            SearchSpace::Lambda { .. } => 2,
            SearchSpace::Simplex { lower } => lower.len(),
            SearchSpace::Cube { dim } => *dim,
            SearchSpace::Grouped { groups, n } => groups * n,
        }
    }

    /// Merge weights of cube point `u`.
    pub fn weights(&self, u: &[f64]) -> Vec<f64> {
        assert_eq!(u.len(), self.dim());
        match self {
            SearchSpace::Lambda { lo, hi } => {
                let l = lo + (hi - lo) * u[0].clamp(0.0, 1.0);
                vec![1.0 - l, l]
            }
            SearchSpace::Simplex { lower } => {
                let n = lower.len();
                let free = 1.0 - lower.iter().sum::<f64>();
                let mut w = Vec::with_capacity(n);
                let mut rest = 1.0;
                for (k, &uk) in u.iter().enumerate() {
                    let v = 1.0 - (1.0 - uk.clamp(0.0, 1.0)).powf(1.0 / (n - 1 - k) as f64);
                    w.push(rest * v);
                    rest *= 1.0 - v;
                }
                w.push(rest);
                w.iter().zip(lower).map(|(s, l)| l + free * s).collect()
            }
            SearchSpace::Cube { .. } => u.to_vec(),
            SearchSpace::Grouped { n, .. } => {
                let b = Self::block(*n);
                u.chunks(n - 1).flat_map(|c| b.weights(c)).collect()
            }
        }
    }

    /// The cube point of weights `w` (inverse of [`SearchSpace::weights`]).
    pub fn cube(&self, w: &[f64]) -> Vec<f64> {
        assert_eq!(w.len(), self.n_weights());
        match self {
            SearchSpace::Lambda { lo, hi } => vec![((w[1] - lo) / (hi - lo)).clamp(0.0, 1.0)],
            SearchSpace::Simplex { lower } => {
                let n = lower.len();
                let free = 1.0 - lower.iter().sum::<f64>();
                let s: Vec<f64> = w
                    .iter()
                    .zip(lower)
                    .map(|(w, l)| ((w - l) / free).max(0.0))
                    .collect();
                let mut u = Vec::with_capacity(n - 1);
                let mut rest = 1.0;
                for (k, &sk) in s.iter().take(n - 1).enumerate() {
                    let v = if rest > 1e-300 {
                        (sk / rest).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    u.push(1.0 - (1.0 - v).powi((n - 1 - k) as i32));
                    rest -= sk;
                }
                u
            }
            SearchSpace::Cube { .. } => w.to_vec(),
            SearchSpace::Grouped { n, .. } => {
                let b = Self::block(*n);
                w.chunks(*n).flat_map(|c| b.cube(c)).collect()
            }
        }
    }

    /// The initial design, in the cube: the paper's two ends in 1-D (plus the middle when
    /// `with_center`; the optimiser moves it to the better half once the ends have values);
    /// in more dimensions the simplex's vertices and centroid.
    pub fn anchor_points(&self, with_center: bool) -> Vec<Vec<f64>> {
        match self {
            SearchSpace::Lambda { .. } => {
                let mut p = vec![vec![0.0], vec![1.0]];
                if with_center {
                    p.push(vec![0.5]);
                }
                p
            }
            SearchSpace::Simplex { lower } => {
                let n = lower.len();
                let free = 1.0 - lower.iter().sum::<f64>();
                let mut pts: Vec<Vec<f64>> = (0..n)
                    .map(|i| {
                        let w: Vec<f64> = lower
                            .iter()
                            .enumerate()
                            .map(|(j, l)| l + if i == j { free } else { 0.0 })
                            .collect();
                        self.cube(&w)
                    })
                    .collect();
                if with_center {
                    let w: Vec<f64> = lower.iter().map(|l| l + free / n as f64).collect();
                    pts.push(self.cube(&w));
                }
                pts
            }
            SearchSpace::Cube { dim } => {
                if with_center {
                    vec![vec![0.5; *dim]]
                } else {
                    vec![]
                }
            }
            // Every group at the same vertex (each source checkpoint), then all uniform.
            SearchSpace::Grouped { groups, n } => Self::block(*n)
                .anchor_points(with_center)
                .into_iter()
                .map(|u| u.repeat(*groups))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn simplex_map_is_a_bijection_onto_the_bounded_simplex() {
        let s = SearchSpace::simplex(vec![0.1, 0.0, 0.05, 0.0]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..1000 {
            let u: Vec<f64> = (0..3).map(|_| rng.gen()).collect();
            let w = s.weights(&u);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
            assert!(w[0] >= 0.1 - 1e-12 && w[2] >= 0.05 - 1e-12 && w.iter().all(|&x| x >= -1e-12));
            let back = s.cube(&w);
            for (a, b) in u.iter().zip(&back) {
                assert!((a - b).abs() < 1e-9, "{u:?} -> {w:?} -> {back:?}");
            }
        }
    }

    #[test]
    fn uniform_cube_gives_uniform_simplex() {
        // Dirichlet(1,1,1): each weight has mean 1/3 and P(w_i > 1/2) = 1/4.
        let s = SearchSpace::simplex(vec![0.0; 3]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let n = 40_000;
        let mut mean = [0.0; 3];
        let mut over = [0usize; 3];
        for _ in 0..n {
            let w = s.weights(&[rng.gen(), rng.gen()]);
            for i in 0..3 {
                mean[i] += w[i] / n as f64;
                over[i] += (w[i] > 0.5) as usize;
            }
        }
        for i in 0..3 {
            assert!((mean[i] - 1.0 / 3.0).abs() < 0.01, "mean {mean:?}");
            assert!(
                (over[i] as f64 / n as f64 - 0.25).abs() < 0.01,
                "tail {over:?}"
            );
        }
    }

    #[test]
    fn grouped_space_is_one_simplex_per_group() {
        let s = SearchSpace::Grouped { groups: 3, n: 4 };
        assert_eq!(s.dim(), 9);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let u: Vec<f64> = (0..9).map(|_| rng.gen()).collect();
        let w = s.weights(&u);
        let g = s.split_groups(&w);
        assert_eq!(g.len(), 3);
        assert!(g
            .iter()
            .all(|w| w.len() == 4 && (w.iter().sum::<f64>() - 1.0).abs() < 1e-12));
        for (a, b) in s.cube(&w).iter().zip(&u) {
            assert!((a - b).abs() < 1e-9);
        }
        let anchors = s.anchor_points(true);
        assert_eq!(anchors.len(), 5);
        let first = s.split_groups(&s.weights(&anchors[0]));
        assert!(
            first.iter().all(|w| (w[0] - 1.0).abs() < 1e-12),
            "all groups at checkpoint 0: {first:?}"
        );
    }

    #[test]
    fn lambda_space_and_anchors() {
        let s = SearchSpace::lambda(0.2).unwrap();
        assert_eq!(s.weights(&[0.0]), vec![0.8, 0.2]);
        assert_eq!(s.weights(&[1.0]), vec![0.0, 1.0]);
        assert_eq!(s.anchor_points(false), vec![vec![0.0], vec![1.0]]);
        assert!(SearchSpace::lambda_range(-0.5, 1.5, false).is_err());
        assert!(SearchSpace::lambda_range(-0.5, 1.5, true).is_ok());
        let t = SearchSpace::simplex(vec![0.0; 3]).unwrap();
        let anchors: Vec<Vec<f64>> = t.anchor_points(true).iter().map(|u| t.weights(u)).collect();
        assert_eq!(anchors.len(), 4);
        for (i, w) in anchors.iter().take(3).enumerate() {
            assert!((w[i] - 1.0).abs() < 1e-12, "vertex {i}: {w:?}");
        }
        assert!(anchors[3].iter().all(|x| (x - 1.0 / 3.0).abs() < 1e-12));
    }
}
