//! Search spaces: the coordinates the surrogate works in ("points"), and the merge weights
//! a worker applies for each point.
//!
//! - [`SearchSpace::Lambda`]: the paper's two-checkpoint space, `lambda` in `[lo, hi]`
//!   (`[alpha, 1]`; bounds outside `[0, 1]` extrapolate and must be asked for), weights
//!   `[1 - lambda, lambda]` for `[prev, cur]`.
//! - [`SearchSpace::Simplex`]: N checkpoints, weights `w_i >= l_i` summing to one. The
//!   point is the first N - 1 of the free shares `s_i = (w_i - l_i) / (1 - sum l)`, the
//!   last share implied: an affine image of the simplex, so nearby weights are nearby
//!   points and no region of the space is many-to-one. (It used to be the unit cube mapped
//!   by stick-breaking, which maps whole faces of the cube onto one vertex: a search
//!   evaluated the same vertex twice, and the surrogate's length scales meant different
//!   things in different corners.) Points are drawn uniformly on the simplex (Dirichlet(1))
//!   and moved locally by projecting back onto it ([`SearchSpace::sample`],
//!   [`SearchSpace::project`]).
//! - [`SearchSpace::Grouped`]: one such simplex per tensor group.
//! - [`SearchSpace::Family`]: one of the averages practitioners take over a run of N
//!   checkpoints (EMA, WMA, last-k windows, Megatron's minus-sqrt), searched over its one
//!   parameter: a 1-D search like lambda's, whatever N is.
//! - [`SearchSpace::Cube`]: the unit cube itself, for benchmark functions and tests.
//!
//! Two points are the same merge when their weights are (see `Optimizer::taken`): the
//! optimiser keeps proposals apart in weights, never in these coordinates alone.

use ckmerge_common::weights::Average;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A family of trajectory averages searched over its parameter (see [`Average`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// The decay `a`, log-uniform from `1 / N` to 1: the EMA's effective length `1 / a`
    /// runs from all N checkpoints to the latest alone, on a log scale. (From `1 / (10 N)`,
    /// nearly the uniform average, half the range was a plateau of near-uniform averages
    /// and the searches took 6-8 evaluations to come within 0.1 % of the family's best on
    /// the tuning trajectories; BENCHMARKS.md.)
    Ema,
    /// The window `k` of the linearly weighted average, 1 to N.
    Wma,
    /// The window `k` of the uniform average, 1 to N.
    Window,
    /// The window `k` of Megatron's minus-sqrt coefficients, 1 to N.
    MinusSqrt,
}

impl Family {
    /// The family member at coordinate `u` in `[0, 1]` over `n` checkpoints: 0 is the
    /// widest average, 1 the latest checkpoint alone.
    pub fn average(&self, n: usize, u: f64) -> Average {
        let u = u.clamp(0.0, 1.0);
        let k = n - ((u * (n - 1) as f64).round() as usize).min(n - 1);
        match self {
            Family::Ema => Average::Ema {
                decay: Self::min_decay(n).powf(1.0 - u),
            },
            Family::Wma => Average::Wma { k },
            Family::Window => Average::Window { k },
            Family::MinusSqrt => Average::MinusSqrt { k },
        }
    }

    fn min_decay(n: usize) -> f64 {
        1.0 / n as f64
    }

    /// Whether the parameter is a whole number of checkpoints.
    pub fn discrete(&self) -> bool {
        !matches!(self, Family::Ema)
    }

    /// The coordinate of window `k` (discrete families).
    fn coordinate_of(n: usize, k: usize) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        (n - k.clamp(1, n)) as f64 / (n - 1) as f64
    }
}

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
    /// Per-group weights: `groups` blocks, each N weights on the simplex (coordinates as
    /// [`SearchSpace::Simplex`] per block); weights are the blocks laid end to end (see
    /// [`SearchSpace::split_groups`]).
    Grouped {
        groups: usize,
        n: usize,
    },
    /// A family of trajectory averages over `n` checkpoints (oldest first), one
    /// coordinate (see [`Family::average`]).
    Family {
        family: Family,
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

    /// A family of averages over `n` checkpoints in training order.
    pub fn family(family: Family, n: usize) -> Result<SearchSpace, String> {
        if n < 2 {
            return Err(format!(
                "an average along a run needs at least two checkpoints (oldest first); got {n}"
            ));
        }
        Ok(SearchSpace::Family { family, n })
    }

    /// Dimension of the points the surrogate works in.
    pub fn dim(&self) -> usize {
        match self {
            SearchSpace::Lambda { .. } | SearchSpace::Family { .. } => 1,
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
            SearchSpace::Family { n, .. } => *n,
        }
    }

    /// How many distinct points the space has, when finitely many (a family over whole
    /// windows has one per window).
    pub fn finite_points(&self) -> Option<usize> {
        match self {
            SearchSpace::Family { family, n } if family.discrete() => Some(*n),
            _ => None,
        }
    }

    /// Merge weights of point `u` (a point outside the space is projected onto it first).
    pub fn weights(&self, u: &[f64]) -> Vec<f64> {
        assert_eq!(u.len(), self.dim());
        match self {
            SearchSpace::Lambda { lo, hi } => {
                let l = lo + (hi - lo) * u[0].clamp(0.0, 1.0);
                vec![1.0 - l, l]
            }
            SearchSpace::Simplex { lower } => {
                let free = 1.0 - lower.iter().sum::<f64>();
                let x = self.project(u);
                let last = (1.0 - x.iter().sum::<f64>()).max(0.0);
                x.iter()
                    .chain([last].iter())
                    .zip(lower)
                    .map(|(s, l)| l + free * s)
                    .collect()
            }
            SearchSpace::Cube { .. } => u.to_vec(),
            SearchSpace::Grouped { n, .. } => {
                let b = Self::block(*n);
                u.chunks(n - 1).flat_map(|c| b.weights(c)).collect()
            }
            SearchSpace::Family { family, n } => family.average(*n, u[0]).weights(*n),
        }
    }

    /// The point of weights `w` (inverse of [`SearchSpace::weights`]; for a family, the
    /// member whose weights these are, found from the ratio of the two newest weights).
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
                    .take(n - 1)
                    .map(|(w, l)| ((w - l) / free).max(0.0))
                    .collect();
                self.project(&s)
            }
            SearchSpace::Cube { .. } => w.to_vec(),
            SearchSpace::Grouped { n, .. } => {
                let b = Self::block(*n);
                w.chunks(*n).flat_map(|c| b.cube(c)).collect()
            }
            SearchSpace::Family { family, n } => {
                let n = *n;
                if family.discrete() {
                    let k = w.iter().filter(|&&x| x > 1e-12).count();
                    return vec![Family::coordinate_of(n, k)];
                }
                // EMA: w_{n-2} / w_{n-1} = 1 - a, a = min^(1 - u).
                let a = (1.0 - w[n - 2] / w[n - 1]).clamp(Family::min_decay(n), 1.0);
                vec![1.0 - a.ln() / Family::min_decay(n).ln()]
            }
        }
    }

    /// The point whose merge weights are `w`, when `w` is a merge of this space (its
    /// point's weights within 1e-9 of `w`): how a run tells which baselines the optimiser
    /// can use.
    pub fn point_of(&self, w: &[f64]) -> Option<Vec<f64>> {
        let u = self.cube(w);
        let back = self.weights(&u);
        (back.len() == w.len() && back.iter().zip(w).all(|(a, b)| (a - b).abs() < 1e-9))
            .then_some(u)
    }

    /// A journal's point `u` of weights `w` in the current coordinates: `u` itself when it
    /// is the point of `w` (bit for bit, so a resume stays exact), else recomputed from the
    /// weights (a journal written with the simplex's former stick-breaking coordinates).
    pub fn current_point(&self, u: &[f64], w: &[f64]) -> Vec<f64> {
        let p = self.cube(w);
        if p.len() == u.len() && p.iter().zip(u).all(|(a, b)| (a - b).abs() < 1e-9) {
            u.to_vec()
        } else {
            p
        }
    }

    /// The nearest point of the space to `u`: clamped to the cube, projected onto the
    /// simplex (Euclidean projection of the free shares, Duchi et al. 2008), snapped to a
    /// whole window for the discrete families.
    pub fn project(&self, u: &[f64]) -> Vec<f64> {
        match self {
            SearchSpace::Simplex { .. } => {
                if u.iter().all(|&x| x >= 0.0) && u.iter().sum::<f64>() <= 1.0 {
                    // Already on it: unchanged, bit for bit.
                    return u.to_vec();
                }
                let mut s: Vec<f64> = u.to_vec();
                s.push(1.0 - u.iter().sum::<f64>());
                let p = project_to_simplex(&s);
                p[..u.len()].to_vec()
            }
            SearchSpace::Grouped { n, .. } => {
                let b = Self::block(*n);
                u.chunks(n - 1).flat_map(|c| b.project(c)).collect()
            }
            SearchSpace::Family { family, n } if family.discrete() => {
                let k = match family.average(*n, u[0]) {
                    Average::Wma { k } | Average::Window { k } | Average::MinusSqrt { k } => k,
                    Average::Ema { .. } => unreachable!("EMA is continuous"),
                };
                vec![Family::coordinate_of(*n, k)]
            }
            _ => u.iter().map(|x| x.clamp(0.0, 1.0)).collect(),
        }
    }

    /// A point drawn uniformly from the space: uniform on the cube, Dirichlet(1, ..., 1)
    /// on each simplex.
    pub fn sample(&self, rng: &mut impl Rng) -> Vec<f64> {
        match self {
            SearchSpace::Simplex { lower } => {
                let e: Vec<f64> = (0..lower.len())
                    .map(|_| -(1.0 - rng.gen::<f64>()).ln())
                    .collect();
                let t: f64 = e.iter().sum();
                e[..lower.len() - 1].iter().map(|x| x / t).collect()
            }
            SearchSpace::Grouped { groups, n } => {
                let b = Self::block(*n);
                (0..*groups).flat_map(|_| b.sample(rng)).collect()
            }
            _ => {
                let u: Vec<f64> = (0..self.dim()).map(|_| rng.gen::<f64>()).collect();
                self.project(&u)
            }
        }
    }

    /// The initial design: the paper's two ends in 1-D (plus the middle when
    /// `with_center`; the optimiser moves it to the better half once the ends have
    /// values); on the simplex the uniform average (with `with_center`) and the points
    /// halfway between it and each of the two latest checkpoints, where trajectories'
    /// best merges lie, rather than every vertex (N evaluations before the surrogate can
    /// learn anything, each a merge no one wants).
    pub fn anchor_points(&self, with_center: bool) -> Vec<Vec<f64>> {
        match self {
            SearchSpace::Lambda { .. } | SearchSpace::Family { .. } => {
                let mut p = vec![vec![0.0], vec![1.0]];
                if with_center {
                    p.push(vec![0.5]);
                }
                p.into_iter().map(|u| self.project(&u)).collect()
            }
            SearchSpace::Simplex { lower } => {
                let n = lower.len();
                let c = vec![1.0 / n as f64; n - 1];
                let mut pts = Vec::new();
                if with_center {
                    pts.push(c.clone());
                }
                for j in [n - 1, n - 2] {
                    // Halfway from the centroid to vertex j (the implied last share is
                    // vertex n - 1).
                    let mut v = vec![0.0; n - 1];
                    if j < n - 1 {
                        v[j] = 1.0;
                    }
                    pts.push(c.iter().zip(&v).map(|(a, b)| 0.5 * (a + b)).collect());
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
            // Every group at the same design point.
            SearchSpace::Grouped { groups, n } => Self::block(*n)
                .anchor_points(with_center)
                .into_iter()
                .map(|u| u.repeat(*groups))
                .collect(),
        }
    }
}

/// The Euclidean projection of `v` onto the probability simplex (sort-based, Duchi,
/// Shalev-Shwartz, Singer and Chandra 2008).
fn project_to_simplex(v: &[f64]) -> Vec<f64> {
    let mut u: Vec<f64> = v.to_vec();
    u.sort_by(|a, b| b.total_cmp(a));
    let mut css = 0.0;
    let mut theta = 0.0;
    for (j, &x) in u.iter().enumerate() {
        css += x;
        let t = (css - 1.0) / (j + 1) as f64;
        if x - t > 0.0 {
            theta = t;
        }
    }
    v.iter().map(|x| (x - theta).max(0.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn simplex_points_are_the_free_shares_and_map_back() {
        let s = SearchSpace::simplex(vec![0.1, 0.0, 0.05, 0.0]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..1000 {
            let u = s.sample(&mut rng);
            assert!(u.iter().all(|&x| x >= 0.0) && u.iter().sum::<f64>() <= 1.0 + 1e-12);
            let w = s.weights(&u);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
            assert!(w[0] >= 0.1 - 1e-12 && w[2] >= 0.05 - 1e-12 && w.iter().all(|&x| x >= -1e-12));
            let back = s.cube(&w);
            for (a, b) in u.iter().zip(&back) {
                assert!((a - b).abs() < 1e-9, "{u:?} -> {w:?} -> {back:?}");
            }
        }
        // Weights are affine in the point: nearby points are nearby weights, and distinct
        // points are distinct merges (stick-breaking sent every point with u_0 = 1 to one
        // vertex).
        let a = s.weights(&[1.0, 0.0, 0.0]);
        let b = s.weights(&[0.999, 0.0, 0.0]);
        let d: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((d - 0.001 * 0.85 * 2f64.sqrt()).abs() < 1e-9, "{d}");
    }

    #[test]
    fn samples_are_uniform_on_the_simplex() {
        // Dirichlet(1,1,1): each weight has mean 1/3 and P(w_i > 1/2) = 1/4.
        let s = SearchSpace::simplex(vec![0.0; 3]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let n = 40_000;
        let mut mean = [0.0; 3];
        let mut over = [0usize; 3];
        for _ in 0..n {
            let w = s.weights(&s.sample(&mut rng));
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
    fn projection_lands_on_the_simplex_and_keeps_its_points() {
        let s = SearchSpace::simplex(vec![0.0; 4]).unwrap();
        assert_eq!(s.project(&[0.2, 0.3, 0.1]), vec![0.2, 0.3, 0.1]);
        let p = s.project(&[0.9, 0.6, -0.2]);
        assert!(p.iter().all(|&x| x >= 0.0) && p.iter().sum::<f64>() <= 1.0 + 1e-12);
        // The nearest point: (0.9, 0.6, -0.2, -0.3) -> (0.65, 0.35, 0, 0).
        for (a, b) in p.iter().zip([0.65, 0.35, 0.0]) {
            assert!((a - b).abs() < 1e-12, "{p:?}");
        }
    }

    #[test]
    fn grouped_space_is_one_simplex_per_group() {
        let s = SearchSpace::Grouped { groups: 3, n: 4 };
        assert_eq!(s.dim(), 9);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let u = s.sample(&mut rng);
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
        assert_eq!(anchors.len(), 3);
        let first = s.split_groups(&s.weights(&anchors[0]));
        assert!(
            first
                .iter()
                .all(|w| w.iter().all(|x| (x - 0.25).abs() < 1e-12)),
            "all groups uniform first: {first:?}"
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
    }

    #[test]
    fn simplex_design_is_the_uniform_average_and_towards_the_latest() {
        let t = SearchSpace::simplex(vec![0.0; 4]).unwrap();
        let anchors: Vec<Vec<f64>> = t.anchor_points(true).iter().map(|u| t.weights(u)).collect();
        let expect = [
            [0.25, 0.25, 0.25, 0.25],
            [0.125, 0.125, 0.125, 0.625],
            [0.125, 0.125, 0.625, 0.125],
        ];
        assert_eq!(anchors.len(), 3);
        for (w, e) in anchors.iter().zip(expect) {
            for (a, b) in w.iter().zip(e) {
                assert!((a - b).abs() < 1e-12, "{anchors:?}");
            }
        }
    }

    #[test]
    fn family_spaces_run_from_the_widest_average_to_the_latest_checkpoint() {
        let n = 12;
        for family in [Family::Ema, Family::Wma, Family::Window, Family::MinusSqrt] {
            let s = SearchSpace::family(family, n).unwrap();
            assert_eq!(s.dim(), 1);
            let last = s.weights(&[1.0]);
            assert!(
                (last[n - 1] - 1.0).abs() < 1e-12,
                "{family:?} at 1: {last:?}"
            );
            let widest = s.weights(&[0.0]);
            assert!(
                widest.iter().all(|&x| x > 0.0),
                "{family:?} at 0: {widest:?}"
            );
            // The point of a member's weights is that member.
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            for _ in 0..50 {
                let u = s.sample(&mut rng);
                let back = s.cube(&s.weights(&u));
                assert!(
                    (back[0] - u[0]).abs() < 1e-9,
                    "{family:?}: {u:?} -> {back:?}"
                );
            }
        }
        // The widest EMA has decay 1/N: the oldest weight is (1 - 1/N)^(N-1) of the newest.
        let w = SearchSpace::family(Family::Ema, n).unwrap().weights(&[0.0]);
        let r = (1.0 - 1.0 / n as f64).powi(n as i32 - 1);
        assert!((w[0] / w[n - 1] - r).abs() < 1e-12, "{w:?}");
        // Windows are whole: every point snaps to one of the n windows.
        let s = SearchSpace::family(Family::Window, n).unwrap();
        let mut ks: Vec<usize> = (0..=1000)
            .map(|i| {
                let w = s.weights(&[i as f64 / 1000.0]);
                w.iter().filter(|&&x| x > 0.0).count()
            })
            .collect();
        ks.dedup();
        assert_eq!(ks, (1..=n).rev().collect::<Vec<_>>());
        assert_eq!(s.project(&[0.52]), s.project(&[0.5]));
        assert!(SearchSpace::family(Family::Ema, 1).is_err());
    }
}
