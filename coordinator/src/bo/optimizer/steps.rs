//! Model steps: the minimum of a low-order model through the observations (a parabola
//! along lambda, a quadratic on a 3-way simplex), proposed beside the acquisition's picks
//! where merge landscapes are smooth enough for it.

use super::{Optimizer, Taken};
use crate::bo::space::SearchSpace;

impl Optimizer {
    /// Merge landscapes along lambda are smooth with one interior basin (the fixtures'
    /// ten landscapes all are), so once the best point is bracketed by observed neighbours
    /// the vertex of the parabola through the three is where the minimum most likely is:
    /// successive parabolic interpolation, as in Brent's method. Starting from the ends
    /// and the probe in the better half, the first vertex already lands within 0.1 % of the
    /// best perplexity on the fixtures' landscapes. Returns `None` (the acquisition decides) when
    /// the space is not 1-D lambda, the best point is not bracketed, the parabola is not
    /// convex, or the vertex is too close to a point already taken.
    pub(super) fn parabolic_step(
        &self,
        xs: &[Vec<f64>],
        ys: &[f64],
        taken: &Taken,
    ) -> Option<Vec<f64>> {
        let one_d = matches!(
            self.space,
            SearchSpace::Lambda { .. } | SearchSpace::Family { .. }
        );
        if !one_d || xs.len() < 3 {
            return None;
        }
        let mut pts: Vec<(f64, f64)> = xs.iter().map(|x| x[0]).zip(ys.iter().copied()).collect();
        pts.sort_by(|a, b| a.0.partial_cmp(&b.0).expect("finite"));
        let b = (0..pts.len()).min_by(|&i, &j| pts[i].1.partial_cmp(&pts[j].1).expect("finite"))?;
        // Bracketed: the best point and its neighbours. At an end of the range: the end
        // and the two points next to it (extrapolating towards the end).
        let mid = b.clamp(1, pts.len() - 2);
        let ((x0, f0), (x1, f1), (x2, f2)) = (pts[mid - 1], pts[mid], pts[mid + 1]);
        let num = (x1 - x0).powi(2) * (f1 - f2) - (x1 - x2).powi(2) * (f1 - f0);
        let den = (x1 - x0) * (f1 - f2) - (x1 - x2) * (f1 - f0);
        if den.abs() < 1e-300 {
            return None;
        }
        let v = x1 - 0.5 * num / den;
        // Convex through a bracketed minimum means the vertex lies inside the bracket; at
        // an end, the vertex must lie between the best point and that end.
        let convex = den.abs() > 0.0 && (f0 - f1) * (x2 - x1) + (f2 - f1) * (x1 - x0) > 0.0;
        let (lo, hi) = if b == mid {
            (x0, x2)
        } else if b < mid {
            (0.0, x1)
        } else {
            (x1, 1.0)
        };
        if !(convex && v > lo && v < hi) {
            return None;
        }
        let x = self.space.project(&[v]);
        taken.far(&self.space, &x).then_some(x)
    }

    /// On the simplex: least-squares fit of the isotropic quadratic
    /// `f(w) = a + sum_i b_i w_i + c sum_i w_i^2` (`b_N = 0`; N + 1 parameters, exact on the
    /// initial design of vertices and centroid), whose minimum on `sum w = 1` is
    /// `w_i = 1/N + (mean(b) - b_i) / (2c)`. On the design alone this is
    /// `w_i = 1/N + (mean f - f_i) / (2c)` with `c = (mean of vertices - centroid) N/(N-1)`:
    /// better checkpoints get more weight, the more so the flatter the bowl. `None` when
    /// the fit is not convex (`c <= 0`: merging does not help), the minimum violates a lower
    /// bound, or it is too close to a point already taken.
    pub(super) fn quadratic_step(
        &self,
        xs: &[Vec<f64>],
        ys: &[f64],
        taken: &Taken,
    ) -> Option<Vec<f64>> {
        let SearchSpace::Simplex { lower } = &self.space else {
            return None;
        };
        let n = lower.len();
        let p = n + 1;
        if xs.len() < p {
            return None;
        }
        let feats: Vec<Vec<f64>> = xs
            .iter()
            .map(|u| {
                let w = self.space.weights(u);
                let mut f = vec![1.0];
                f.extend_from_slice(&w[..n - 1]);
                f.push(w.iter().map(|x| x * x).sum());
                f
            })
            .collect();
        // Normal equations (p is small), solved by Gaussian elimination with pivoting.
        let mut a = vec![vec![0.0; p + 1]; p];
        for (f, y) in feats.iter().zip(ys) {
            for i in 0..p {
                for j in 0..p {
                    a[i][j] += f[i] * f[j];
                }
                a[i][p] += f[i] * y;
            }
        }
        let coef = solve(a)?;
        let c = coef[n];
        if c.is_nan() || c <= 1e-12 {
            return None;
        }
        let mut b: Vec<f64> = coef[1..n].to_vec();
        b.push(0.0);
        let mean_b = b.iter().sum::<f64>() / n as f64;
        let w: Vec<f64> = b
            .iter()
            .map(|bi| 1.0 / n as f64 + (mean_b - bi) / (2.0 * c))
            .collect();
        if w.iter().zip(lower).any(|(wi, l)| *wi < *l) {
            return None;
        }
        let x = self.space.cube(&w);
        taken.far(&self.space, &x).then_some(x)
    }
}

/// Solves the augmented system `a` (`p` rows of `p + 1`); `None` if singular.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let p = a.len();
    for col in 0..p {
        let piv = (col..p).max_by(|&i, &j| {
            a[i][col]
                .abs()
                .partial_cmp(&a[j][col].abs())
                .expect("finite")
        })?;
        if a[piv][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, piv);
        let pivot = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot[col];
                for (x, pv) in row.iter_mut().zip(&pivot).skip(col) {
                    *x -= f * pv;
                }
            }
        }
    }
    Some((0..p).map(|i| a[i][p] / a[i][i]).collect())
}
