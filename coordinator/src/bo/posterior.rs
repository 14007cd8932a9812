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
        for (xi, &yi) in x.iter().zip(y) {
            p.push(xi, yi)?;
        }
        p.solve_mean();
        Ok(p)
    }

    /// Appends one point: the Cholesky factor grows by a row (`L⁻¹c`, and the pivot), and
    /// so does its inverse.
    fn push(&mut self, x: &[f64], y: f64) -> Result<(), String> {
        let xn = self.normalize(x);
        let yn = (y - self.y_mean) / self.y_std;
        let c: Vec<f64> = self.xs.iter().map(|t| self.corr(&xn, t)).collect();
        let l21: Vec<f64> = self.linv.iter().map(|row| dot(row, &c)).collect();
        let pivot = 1.0 + self.nugget - dot(&l21, &l21);
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
            self.push(xi, yi)?;
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
