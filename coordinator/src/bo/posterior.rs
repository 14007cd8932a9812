//! The GP posterior for fixed hyperparameters, computed the way egobox-gp defines its
//! model (same normalisation, same Matérn 5/2 product form, same generalised least squares
//! for the constant mean, same `sigma2`), but with the inverse Cholesky factor kept
//! explicitly in contiguous rows. A prediction is then a row of dot products per point
//! instead of a triangular solve through ndarray, and a Kriging-believer point extends the
//! factor and its inverse in O(n²). egobox-gp still fits the hyperparameters; the test
//! `matches_egobox_predictions_and_updates` holds this module to its predictions.
//!
//! Model (x normalised per dimension by the training mean and sample standard deviation,
//! y likewise): `R = C + (1 + nugget) I`, `L = chol(R)`, `ft = L⁻¹ 1`, `yt = L⁻¹ y`,
//! `beta = ft·yt / ft·ft`, `rho = yt − beta ft`, `gamma = L⁻ᵀ rho`, `sigma2 = rho·rho / n`;
//! at x: mean `beta + c·gamma`, variance `sigma2 (1 − |L⁻¹c|² + u²)` with
//! `u = (ft·L⁻¹c − 1) / |ft|`.

use super::acquisition::{cdf, phi};

/// Dot product with four accumulators (so it vectorises).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Mean and sample standard deviation (ddof 1; 1 where it is 0), as egobox normalises.
fn mean_std(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = v.clone().count() as f64;
    let mean = v.clone().sum::<f64>() / n;
    let var = v.map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let std = var.sqrt();
    (
        mean,
        if std == 0.0 || !std.is_finite() {
            1.0
        } else {
            std
        },
    )
}

/// Draws of the joint posterior at pending points, for [`Posterior::score_joint`].
pub struct JointEi {
    /// Per pending point: normalised coordinates, `L⁻¹c`, `u`.
    pend: Vec<(Vec<f64>, Vec<f64>, f64)>,
    /// Lower Cholesky factor of their posterior covariance (normalised units).
    chol: Vec<Vec<f64>>,
    zp: Vec<Vec<f64>>,
    /// Per draw, the lowest value among the pending points.
    min_p: Vec<f64>,
    best: f64,
    fnorm: f64,
}

/// The standard normal quantile function (Acklam's rational approximation, relative error
/// below 1.2e-9; `p` in (0, 1)).
pub fn inv_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Lower Cholesky factor of a small symmetric matrix, `jitter` added to the diagonal
/// (growing tenfold, up to five times, until it is positive definite).
fn cholesky(a: &[Vec<f64>], jitter: f64) -> Option<Vec<Vec<f64>>> {
    let m = a.len();
    let mut eps = jitter;
    'attempt: for _ in 0..6 {
        let mut l = vec![vec![0.0; m]; m];
        for i in 0..m {
            for j in 0..=i {
                let s = a[i][j] + if i == j { eps } else { 0.0 } - dot(&l[i][..j], &l[j][..j]);
                if i == j {
                    if s <= 0.0 || !s.is_finite() {
                        eps *= 10.0;
                        continue 'attempt;
                    }
                    l[i][i] = s.sqrt();
                } else {
                    l[i][j] = s / l[j][j];
                }
            }
        }
        return Some(l);
    }
    None
}

#[derive(Clone, Debug)]
pub struct Posterior {
    theta: Vec<f64>,
    nugget: f64,
    x_mean: Vec<f64>,
    x_std: Vec<f64>,
    y_mean: f64,
    y_std: f64,
    /// Normalised training points.
    xs: Vec<Vec<f64>>,
    /// Rows of L⁻¹ (row i has i + 1 entries).
    linv: Vec<Vec<f64>>,
    ft: Vec<f64>,
    yt: Vec<f64>,
    beta: f64,
    gamma: Vec<f64>,
    /// In normalised y units.
    sigma2: f64,
}

impl Posterior {
    fn corr(&self, a: &[f64], b: &[f64]) -> f64 {
        const SQRT5: f64 = 2.236_067_977_499_79;
        let (mut prod, mut sum) = (1.0, 0.0);
        for k in 0..a.len() {
            let u = self.theta[k] * (a[k] - b[k]).abs();
            prod *= 1.0 + SQRT5 * u + 5.0 / 3.0 * u * u;
            sum += u;
        }
        prod * (-SQRT5 * sum).exp()
    }

    fn normalize(&self, x: &[f64]) -> Vec<f64> {
        x.iter()
            .enumerate()
            .map(|(k, v)| (v - self.x_mean[k]) / self.x_std[k])
            .collect()
    }

    /// The posterior of `y` at `x` for length-scale parameters `theta` (one per dimension,
    /// or one for all).
    pub fn new(x: &[Vec<f64>], y: &[f64], theta: &[f64], nugget: f64) -> Result<Posterior, String> {
        Posterior::with_noise(x, y, &[], theta, nugget)
    }

    /// As [`Posterior::new`], with point `i` observed with the extra noise variance
    /// `noise[i]` (in the units of `y`; missing entries are 0): a value estimated from part
    /// of the data (`ckmerge_common::race`). The diagonal of `R` at `i` gains
    /// `noise[i] / y_std²`, the variance in normalised units taken relative to a process
    /// variance of 1 (`sigma2` is estimated only after `R` is factored; on normalised
    /// values it is near 1).
    pub fn with_noise(
        x: &[Vec<f64>],
        y: &[f64],
        noise: &[f64],
        theta: &[f64],
        nugget: f64,
    ) -> Result<Posterior, String> {
        let d = x[0].len();
        let theta: Vec<f64> = if theta.len() == d {
            theta.iter().map(|t| t.abs()).collect()
        } else {
            vec![theta[0].abs(); d]
        };
        let (mut x_mean, mut x_std) = (vec![0.0; d], vec![1.0; d]);
        for k in 0..d {
            (x_mean[k], x_std[k]) = mean_std(x.iter().map(|p| p[k]));
        }
        let (y_mean, y_std) = mean_std(y.iter().copied());
        let mut p = Posterior {
            theta,
            nugget,
            x_mean,
            x_std,
            y_mean,
            y_std,
            xs: Vec::with_capacity(x.len()),
            linv: Vec::with_capacity(x.len()),
            ft: Vec::with_capacity(x.len()),
            yt: Vec::with_capacity(x.len()),
            beta: 0.0,
            gamma: Vec::new(),
            sigma2: 0.0,
        };
        for (i, (xi, &yi)) in x.iter().zip(y).enumerate() {
            let extra = noise.get(i).map_or(0.0, |v| v / (p.y_std * p.y_std));
            p.push(xi, yi, extra)?;
        }
        p.solve_mean();
        Ok(p)
    }

    /// Appends one point: the Cholesky factor grows by a row (`L⁻¹c`, and the pivot), and
    /// so does its inverse.
    fn push(&mut self, x: &[f64], y: f64, extra: f64) -> Result<(), String> {
        let xn = self.normalize(x);
        let yn = (y - self.y_mean) / self.y_std;
        let c: Vec<f64> = self.xs.iter().map(|t| self.corr(&xn, t)).collect();
        let l21: Vec<f64> = self.linv.iter().map(|row| dot(row, &c)).collect();
        let pivot = 1.0 + self.nugget + extra - dot(&l21, &l21);
        if pivot <= 0.0 || !pivot.is_finite() {
            return Err(
                "the correlation matrix is not positive definite (points too close for the nugget)"
                    .into(),
            );
        }
        let l22 = pivot.sqrt();
        // Row n of L⁻¹: -(l21ᵀ L⁻¹) / l22, then 1 / l22.
        let n = self.linv.len();
        let mut row = vec![0.0; n + 1];
        for (j, lj) in l21.iter().enumerate() {
            let r = &self.linv[j];
            for (k, v) in r.iter().enumerate() {
                row[k] -= lj * v;
            }
        }
        for v in row.iter_mut().take(n) {
            *v /= l22;
        }
        row[n] = 1.0 / l22;
        self.ft.push((1.0 - dot(&l21, &self.ft)) / l22);
        self.yt.push((yn - dot(&l21, &self.yt)) / l22);
        self.linv.push(row);
        self.xs.push(xn);
        Ok(())
    }

    /// Generalised least squares for the constant mean, then `gamma` and `sigma2`.
    fn solve_mean(&mut self) {
        let n = self.ft.len();
        self.beta = dot(&self.ft, &self.yt) / dot(&self.ft, &self.ft);
        let rho: Vec<f64> = self
            .yt
            .iter()
            .zip(&self.ft)
            .map(|(y, f)| y - self.beta * f)
            .collect();
        self.sigma2 = dot(&rho, &rho) / n as f64;
        // gamma = L⁻ᵀ rho: column sums of L⁻¹ weighted by rho.
        let mut gamma = vec![0.0; n];
        for (i, row) in self.linv.iter().enumerate() {
            for (k, v) in row.iter().enumerate() {
                gamma[k] += v * rho[i];
            }
        }
        self.gamma = gamma;
    }

    /// Adds points believed at `y` (hyperparameters and normalisation frozen), as
    /// egobox-gp's `update` does.
    pub fn add(&mut self, x: &[Vec<f64>], y: &[f64]) -> Result<(), String> {
        for (xi, &yi) in x.iter().zip(y) {
            self.push(xi, yi, 0.0)?;
        }
        self.solve_mean();
        Ok(())
    }

    /// Posterior mean and variance at one point (normalised units).
    fn predict_one(&self, p: &[f64], fnorm: f64, c: &mut [f64]) -> (f64, f64) {
        let xn = self.normalize(p);
        for (cj, t) in c.iter_mut().zip(&self.xs) {
            *cj = self.corr(&xn, t);
        }
        let m = self.beta + dot(c, &self.gamma);
        let (mut rr, mut fr) = (0.0, 0.0);
        for (i, row) in self.linv.iter().enumerate() {
            let r = dot(row, c);
            rr += r * r;
            fr += self.ft[i] * r;
        }
        let u = (fr - 1.0) / fnorm;
        (m, self.sigma2 * (1.0 - rr + u * u))
    }

    /// `L⁻¹c` and `u` at normalised point `xn` (see the module's formulas), and `c`.
    fn factors(&self, xn: &[f64], fnorm: f64) -> (Vec<f64>, Vec<f64>, f64) {
        let c: Vec<f64> = self.xs.iter().map(|t| self.corr(xn, t)).collect();
        let r: Vec<f64> = self.linv.iter().map(|row| dot(row, &c)).collect();
        let u = (dot(&self.ft, &r) - 1.0) / fnorm;
        (c, r, u)
    }

    /// Prepares the expected improvement a point adds to `pending` points (greedy q-EI, as
    /// BoTorch and Optuna's GPSampler treat running trials):
    /// `E[max(0, min(best, min f(pending)) - f(x))]`, which is
    /// `qEI(pending + x) - qEI(pending)`, so it has q-EI's maximiser, under the joint
    /// posterior, estimated with `samples` Latin-hypercube draws at the pending points,
    /// shared by every candidate (common random numbers, so candidates are compared on the
    /// same draws), and EI's closed form for the candidate given each draw. `best` is in the units of
    /// the `y` given; `seed` makes the draws deterministic.
    pub fn joint_ei(
        &self,
        pending: &[Vec<f64>],
        best: f64,
        samples: usize,
        seed: u64,
    ) -> Result<JointEi, String> {
        use rand::{Rng, SeedableRng};
        let fnorm = dot(&self.ft, &self.ft).sqrt();
        let m = pending.len();
        let mut pend = Vec::with_capacity(m);
        for p in pending {
            let xn = self.normalize(p);
            let (c, r, u) = self.factors(&xn, fnorm);
            let mean = self.beta + dot(&c, &self.gamma);
            pend.push((xn, r, u, mean));
        }
        // Covariance of the pending points, then its Cholesky factor (with jitter: a
        // pending point may sit on an observed one, where the variance is ~0).
        let mut cov = vec![vec![0.0; m]; m];
        for i in 0..m {
            for j in 0..=i {
                let k = if i == j {
                    1.0
                } else {
                    self.corr(&pend[i].0, &pend[j].0)
                };
                let v = self.sigma2 * (k - dot(&pend[i].1, &pend[j].1) + pend[i].2 * pend[j].2);
                cov[i][j] = v;
                cov[j][i] = v;
            }
        }
        let chol = cholesky(&cov, 1e-9 * self.sigma2.max(1e-300))
            .ok_or("the pending points' posterior covariance is not positive definite")?;
        // Latin-hypercube normal draws: each coordinate takes every 1/samples stratum once
        // (inverse normal CDF of a jittered stratum), which cuts the Monte-Carlo noise of
        // the smooth integrand well below that of independent draws.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let cols: Vec<Vec<f64>> = (0..m)
            .map(|_| {
                let mut c: Vec<f64> = (0..samples)
                    .map(|i| inv_cdf((i as f64 + rng.gen::<f64>()) / samples as f64))
                    .collect();
                for i in (1..samples).rev() {
                    c.swap(i, rng.gen_range(0..=i));
                }
                c
            })
            .collect();
        let mut zp = Vec::with_capacity(samples);
        let mut min_p = Vec::with_capacity(samples);
        for s in 0..samples {
            let z: Vec<f64> = cols.iter().map(|c| c[s]).collect();
            let lo = (0..m)
                .map(|i| pend[i].3 + dot(&chol[i][..=i], &z[..=i]))
                .fold(f64::INFINITY, f64::min);
            zp.push(z);
            min_p.push(lo);
        }
        Ok(JointEi {
            pend: pend.into_iter().map(|(xn, r, u, _)| (xn, r, u)).collect(),
            chol,
            zp,
            min_p,
            best: (best - self.y_mean) / self.y_std,
            fnorm,
        })
    }

    /// The expected improvement each point adds to `je`'s pending points, in the units of
    /// the `y` given.
    pub fn score_joint(&self, je: &JointEi, pts: &[Vec<f64>]) -> Vec<f64> {
        use rayon::prelude::*;
        let m = je.pend.len();
        let one = |p: &Vec<f64>| {
            let xn = self.normalize(p);
            let (c, r, u) = self.factors(&xn, je.fnorm);
            let mean = self.beta + dot(&c, &self.gamma);
            let var = self.sigma2 * (1.0 - dot(&r, &r) + u * u);
            // Covariance with the pending points, whitened by their factor.
            let mut w = vec![0.0; m];
            for i in 0..m {
                let (pxn, pr, pu) = &je.pend[i];
                let k = self.sigma2 * (self.corr(&xn, pxn) - dot(&r, pr) + u * pu);
                w[i] = (k - dot(&je.chol[i][..i], &w[..i])) / je.chol[i][i];
            }
            // Given a draw at the pending points, f(x) is normal with mean `mean + w·z`
            // and sd `sd`, and the improvement over the draw's threshold has EI's closed
            // form: only the pending points are sampled (exact EI when none is pending,
            // and no Monte-Carlo noise in the tail where a converging search lives).
            let sd = (var - dot(&w, &w)).max(0.0).sqrt();
            let total: f64 = (0..je.zp.len())
                .map(|s| {
                    let gap = je.best.min(je.min_p[s]) - (mean + dot(&w, &je.zp[s]));
                    if sd > 1e-300 {
                        let z = gap / sd;
                        gap * cdf(z) + sd * phi(z)
                    } else {
                        gap.max(0.0)
                    }
                })
                .sum();
            total / je.zp.len() as f64 * self.y_std
        };
        if pts.len() * (self.xs.len() + 4 * je.zp.len()) >= 4_096 {
            pts.par_iter().map(one).collect()
        } else {
            pts.iter().map(one).collect()
        }
    }

    /// Posterior mean and variance at each point, in the units of the `y` given. Large
    /// batches (candidate sets) are spread over the rayon pool; each point's result does
    /// not depend on how they are split.
    pub fn predict(&self, pts: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
        use rayon::prelude::*;
        let fnorm = dot(&self.ft, &self.ft).sqrt();
        let n = self.xs.len();
        let one = |p: &Vec<f64>, c: &mut Vec<f64>| {
            let (m, v) = self.predict_one(p, fnorm, c);
            (
                m * self.y_std + self.y_mean,
                (v * self.y_std * self.y_std).max(0.0),
            )
        };
        let out: Vec<(f64, f64)> = if pts.len() * n >= 16_384 {
            pts.par_iter()
                .map_init(|| vec![0.0; n], |c, p| one(p, c))
                .collect()
        } else {
            let mut c = vec![0.0; n];
            pts.iter().map(|p| one(p, &mut c)).collect()
        };
        out.into_iter().unzip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egobox_gp::correlation_models::Matern52Corr;
    use egobox_gp::mean_models::ConstantMean;
    use egobox_gp::{GaussianProcess, ThetaTuning};
    use linfa::prelude::*;
    use ndarray::{Array1, Array2};
    use rand::{Rng, SeedableRng};

    #[test]
    fn inverse_normal_cdf_inverts_the_cdf() {
        use crate::bo::acquisition::cdf;
        for p in [1e-10, 0.001, 0.02, 0.1, 0.3, 0.5, 0.77, 0.98, 0.999_999] {
            let z = inv_cdf(p);
            assert!(
                (cdf(z) - p).abs() < 1e-8 * p.max(1e-2),
                "p {p}: z {z}, cdf {}",
                cdf(z)
            );
        }
    }

    #[test]
    fn a_noisy_value_is_not_interpolated_and_leaves_its_point_uncertain() {
        // A smooth curve on dense points, one value off it by 0.05: exact, the posterior
        // goes through it; given as noisy (sd 0.05), it is pulled toward its neighbours.
        let x: Vec<Vec<f64>> = (0..21).map(|i| vec![i as f64 / 20.0]).collect();
        let mut y: Vec<f64> = x.iter().map(|p| (p[0] - 0.45).powi(2)).collect();
        let k = 12;
        let curve = y[k];
        y[k] += 0.05;
        let mut noise = vec![0.0; x.len()];
        noise[k] = 0.05f64.powi(2);
        let exact = Posterior::new(&x, &y, &[2.0], 1e-10).unwrap();
        let noisy = Posterior::with_noise(&x, &y, &noise, &[2.0], 1e-10).unwrap();
        let at = |p: &Posterior| {
            let (m, v) = p.predict(&[x[k].clone()]);
            (m[0], v[0])
        };
        let ((m_exact, v_exact), (m_noisy, v_noisy)) = (at(&exact), at(&noisy));
        assert!(
            (m_exact - y[k]).abs() < 1e-4,
            "exact values are interpolated: {m_exact}"
        );
        assert!(
            m_noisy < y[k] - 0.01 && m_noisy > curve - 0.01,
            "the noisy one is pulled toward the curve: {m_noisy} (value {}, curve {curve})",
            y[k]
        );
        assert!(
            v_noisy > 100.0 * v_exact.max(1e-12),
            "{v_noisy} vs {v_exact}"
        );
        // No noise given: the same posterior as `new`.
        let same = Posterior::with_noise(&x, &y, &[], &[2.0], 1e-10).unwrap();
        assert_eq!(at(&same), at(&exact));
    }

    #[test]
    fn joint_ei_is_ei_alone_and_discounts_points_near_pending_ones() {
        use crate::bo::acquisition::{AcqParams, Acquisition};
        let x: Vec<Vec<f64>> = (0..6).map(|i| vec![i as f64 / 5.0, 0.3]).collect();
        let y: Vec<f64> = x.iter().map(|p| (p[0] - 0.45).powi(2) - 0.1).collect();
        let post = Posterior::new(&x, &y, &[2.0, 2.0], 1e-8).unwrap();
        let best = y.iter().cloned().fold(f64::INFINITY, f64::min);
        let pts = vec![vec![0.5, 0.3], vec![0.5, 0.7], vec![0.9, 0.9]];
        let (m, v) = post.predict(&pts);
        let p = AcqParams::default();
        // No pending point: plain EI.
        let alone = post.joint_ei(&[], best, 64, 1).unwrap();
        let mc = post.score_joint(&alone, &pts);
        for i in 0..pts.len() {
            let ei = Acquisition::Ei.value(m[i], v[i].sqrt(), best, p);
            assert!((mc[i] - ei).abs() < 1e-9 * ei, "{i}: {} vs EI {ei}", mc[i]);
        }
        // A point pending at (0.5, 0.3): the joint gain of a point next to it is mostly
        // already counted, of a distant one hardly at all.
        let pend = vec![vec![0.5, 0.3]];
        let base = post.joint_ei(&pend, best, 40_000, 2).unwrap();
        let with_pend = post.score_joint(&base, &[vec![0.5, 0.3], vec![0.52, 0.3], vec![0.9, 0.9]]);
        let pend_alone = post.score_joint(&alone, &pend)[0];
        let gain = |i: usize| with_pend[i];
        assert!(
            gain(0).abs() < 1e-3 * pend_alone,
            "the pending point itself adds nothing: {}",
            gain(0)
        );
        assert!(
            gain(1) < 0.3 * mc[0],
            "next to the pending point: {} vs EI {}",
            gain(1),
            mc[0]
        );
        let far = post.score_joint(&alone, &[vec![0.9, 0.9]])[0];
        assert!(gain(2) > 0.8 * far, "far from it: {} vs EI {far}", gain(2));
    }

    // With the optimiser's nugget (1e-8) and close points R is ill-conditioned and the two
    // computations agree only to about 1e-7; a larger nugget shows they are the same model.
    const NUG: f64 = 1e-4;

    #[test]
    fn matches_egobox_predictions_and_updates() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for d in [1usize, 3, 6] {
            // Few enough points that R is well conditioned: with many close points both
            // computations are only as accurate as cond(R) allows (about 1e-6 here).
            let n = 10 * d + 5;
            let x: Vec<Vec<f64>> = (0..n)
                .map(|_| (0..d).map(|_| rng.gen::<f64>()).collect())
                .collect();
            let y: Vec<f64> = x
                .iter()
                .map(|p| p.iter().map(|v| (3.0 * v).sin()).sum::<f64>() + 0.3)
                .collect();
            let xa = Array2::from_shape_fn((n, d), |(i, j)| x[i][j]);
            let gp = GaussianProcess::<f64, ConstantMean, Matern52Corr>::params(
                ConstantMean::default(),
                Matern52Corr::default(),
            )
            .theta_tuning(ThetaTuning::default())
            .n_start(2)
            .nugget(NUG)
            .fit(&Dataset::new(xa, Array1::from(y.clone())))
            .unwrap();
            let theta = gp.theta().to_vec();
            let mut post = Posterior::new(&x, &y, &theta, NUG).unwrap();
            let q: Vec<Vec<f64>> = (0..50)
                .map(|_| (0..d).map(|_| rng.gen::<f64>()).collect())
                .collect();
            let qa = Array2::from_shape_fn((q.len(), d), |(i, j)| q[i][j]);
            let check =
                |post: &Posterior, gp: &GaussianProcess<f64, ConstantMean, Matern52Corr>| {
                    let (m, v) = post.predict(&q);
                    let (em, ev) = gp.predict_valvar(&qa).unwrap();
                    for i in 0..q.len() {
                        assert!(
                            (m[i] - em[i]).abs() < 1e-8,
                            "d={d} mean {} vs {}",
                            m[i],
                            em[i]
                        );
                        assert!(
                            (v[i] - ev[i]).abs() < 1e-8 * ev[i].max(1e-3),
                            "d={d} var {} vs {}",
                            v[i],
                            ev[i]
                        );
                    }
                };
            check(&post, &gp);
            // Kriging-believer points, frozen hyperparameters.
            let extra: Vec<Vec<f64>> = (0..3)
                .map(|_| (0..d).map(|_| rng.gen::<f64>()).collect())
                .collect();
            let ey = vec![0.1, -0.2, 0.05];
            post.add(&extra, &ey).unwrap();
            let ea = Array2::from_shape_fn((3, d), |(i, j)| extra[i][j]);
            let gp = gp.update(&ea, &Array1::from(ey)).unwrap();
            check(&post, &gp);
        }
    }
}
