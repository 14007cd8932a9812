//! The Gaussian-process surrogate: egobox-gp in f64, Matérn 5/2 correlation with a
//! constant mean, inputs in the unit cube, outputs standardised here (mean 0, sd 1) so
//! posterior means and standard deviations are in standardised units whatever the NLL's
//! scale. Hyperparameters (length scales) are re-optimised with a few restarts on a full
//! refit, and kept fixed for the cheap refits in between and for Kriging-believer updates.
//! egobox-gp fits the hyperparameters; predictions and updates go through
//! [`Posterior`], the same model with an explicit inverse Cholesky factor (several times
//! faster per prediction than egobox's triangular solves; see `posterior`).

use egobox_gp::correlation_models::Matern52Corr;
use egobox_gp::mean_models::ConstantMean;
use egobox_gp::{GaussianProcess, ThetaTuning};
use linfa::prelude::*;
use ndarray::{Array1, Array2};

use super::posterior::{JointEi, Posterior};

/// Bounds of the correlation parameters `theta` (inverse length scales, cube units) that
/// the maximum-likelihood fit may choose. egobox-gp's default lower bound, 0.01 (length
/// scales up to 100 cube widths), lets the fit declare a dimension irrelevant whenever a
/// handful of points barely vary along it, which they often do early in a search; EI then
/// stops exploring that dimension. Optuna's GPSampler keeps its length scales in range with
/// a prior instead (a penalty `0.1 / rho` on `rho = 1 / l^2`, steep above `l` of about 3).
/// egobox-gp takes no prior, so the length scale is bounded at 5 cube widths (theta >= 0.2).
/// Chosen among lower bounds 0.01 (egobox's), 0.03, 0.1, 0.2, 0.3, 0.5 and 1 on seeds 0-99,
/// then checked on seeds 100-399 (BENCHMARKS.md): median regret after 20 evaluations,
/// 0.01 -> 0.2, Hartmann-6 0.99 -> 0.74 and Hartmann-3 0.0008 -> 0.0006, Branin and
/// Forrester unchanged, the merge landscapes unchanged. Larger bounds help Hartmann-6 more
/// and hurt Hartmann-3 (0.3: 0.71 and 0.0026). The upper bound (length scale 0.1) is
/// egobox's.
pub const THETA_BOUNDS: (f64, f64) = (0.2, 10.0);

/// How a fit gets its hyperparameters.
#[derive(Clone, Copy, Debug)]
pub enum Hyper<'a> {
    /// Kept from an earlier fit.
    Fixed(&'a [f64]),
    /// Re-optimised by maximum likelihood: from `from` alone when given (a warm refit),
    /// else from the default start plus `n_start` restarts. (egobox-gp draws a single
    /// restart from system entropy, so use 0 or at least 2 for determinism.)
    Fit {
        n_start: usize,
        from: Option<&'a [f64]>,
    },
}

pub struct Surrogate {
    post: Posterior,
    theta: Vec<f64>,
    y_mean: f64,
    y_std: f64,
}

impl Surrogate {
    /// Fits on cube points `x` with values `y`, the hyperparameters as `hyper` says, within
    /// `bounds` (see [`THETA_BOUNDS`]). `nugget` regularises (noise). With fixed parameters
    /// egobox is not called: the posterior is computed directly.
    pub fn fit(
        x: &[Vec<f64>],
        y: &[f64],
        hyper: Hyper,
        nugget: f64,
        bounds: (f64, f64),
    ) -> Result<Surrogate, String> {
        Surrogate::fit_noisy(x, y, &[], hyper, nugget, bounds)
    }

    /// As [`Surrogate::fit`], with point `i` observed with the extra noise variance
    /// `noise[i]` (units of `y`; see [`Posterior::with_noise`]). The length scales are
    /// fitted as if every value were exact: the noisy values are few, and each lies well
    /// above the incumbent by construction.
    pub fn fit_noisy(
        x: &[Vec<f64>],
        y: &[f64],
        noise: &[f64],
        hyper: Hyper,
        nugget: f64,
        bounds: (f64, f64),
    ) -> Result<Surrogate, String> {
        assert!(!x.is_empty() && x.len() == y.len());
        let dim = x[0].len();
        let y_mean = y.iter().sum::<f64>() / y.len() as f64;
        let var = y.iter().map(|v| (v - y_mean).powi(2)).sum::<f64>() / y.len() as f64;
        let y_std = if var > 0.0 { var.sqrt() } else { 1.0 };
        let ys: Vec<f64> = y.iter().map(|v| (v - y_mean) / y_std).collect();
        let theta = match hyper {
            Hyper::Fixed(t) => t.to_vec(),
            Hyper::Fit { n_start, from } => {
                // Warm: one local optimisation from the previous optimum. Cold: egobox's
                // start at the longest length scale allowed plus `n_start` Latin-hypercube
                // starts (seeded inside egobox, so deterministic).
                let init = match from {
                    Some(t) if t.len() == dim => t.to_vec(),
                    _ => vec![bounds.0; dim],
                };
                let xa = Array2::from_shape_fn((x.len(), dim), |(i, j)| x[i][j]);
                let gp = GaussianProcess::<f64, ConstantMean, Matern52Corr>::params(
                    ConstantMean::default(),
                    Matern52Corr::default(),
                )
                .theta_tuning(ThetaTuning::Full {
                    init: Array1::from(init),
                    bounds: Array1::from(vec![bounds; dim]),
                })
                .n_start(if from.is_some() { 0 } else { n_start })
                .nugget(nugget)
                .fit(&Dataset::new(xa, Array1::from(ys.clone())))
                .map_err(|e| format!("Gaussian-process fit failed: {e}"))?;
                gp.theta().to_vec()
            }
        };
        let noise_std: Vec<f64> = noise.iter().map(|v| v / (y_std * y_std)).collect();
        let post = Posterior::with_noise(x, &ys, &noise_std, &theta, nugget)
            .map_err(|e| format!("Gaussian-process fit failed: {e}"))?;
        Ok(Surrogate {
            post,
            theta,
            y_mean,
            y_std,
        })
    }

    /// The fitted length-scale parameters (to fix them in later refits).
    pub fn theta(&self) -> Vec<f64> {
        self.theta.clone()
    }

    /// Standardises an objective value.
    pub fn standardize(&self, y: f64) -> f64 {
        (y - self.y_mean) / self.y_std
    }

    /// Posterior mean and standard deviation in objective units (for plots and reports).
    pub fn predict_objective(&self, pts: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
        let (m, sd) = self.predict(pts);
        (
            m.iter().map(|m| m * self.y_std + self.y_mean).collect(),
            sd.iter().map(|s| s * self.y_std).collect(),
        )
    }

    /// Posterior mean and standard deviation (standardised units) at each point.
    pub fn predict(&self, pts: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
        let (m, v) = self.post.predict(pts);
        (m, v.iter().map(|v| v.max(0.0).sqrt()).collect())
    }

    /// Draws for the expected improvement jointly with `pending` points (q-EI); `best`
    /// in standardised units. See [`Posterior::joint_ei`].
    pub fn joint_ei(
        &self,
        pending: &[Vec<f64>],
        best: f64,
        samples: usize,
        seed: u64,
    ) -> Result<JointEi, String> {
        self.post.joint_ei(pending, best, samples, seed)
    }

    /// Joint expected improvement (standardised units) of each point with the pending
    /// points of `je`.
    pub fn score_joint(&self, je: &JointEi, pts: &[Vec<f64>]) -> Vec<f64> {
        self.post.score_joint(je, pts)
    }

    /// Adds points with (standardised) values, hyperparameters and normalisation frozen,
    /// for Kriging-believer batches: O(n²) per point.
    pub fn add_believed(&mut self, pts: &[Vec<f64>], y_std_units: &[f64]) -> Result<(), String> {
        if pts.is_empty() {
            return Ok(());
        }
        self.post
            .add(pts, y_std_units)
            .map_err(|e| format!("Gaussian-process update failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_its_data() {
        let x: Vec<Vec<f64>> = (0..7).map(|i| vec![i as f64 / 6.0]).collect();
        let y: Vec<f64> = x.iter().map(|p| (6.0 * p[0]).sin() + 3.0).collect();
        let s = Surrogate::fit(
            &x,
            &y,
            Hyper::Fit {
                n_start: 5,
                from: None,
            },
            1e-10,
            THETA_BOUNDS,
        )
        .unwrap();
        let (m, sd) = s.predict(&x);
        for i in 0..x.len() {
            let got = m[i] * s.y_std + s.y_mean;
            assert!(
                (got - y[i]).abs() < 1e-4,
                "at {:?}: {got} vs {}",
                x[i],
                y[i]
            );
            assert!(sd[i] < 1e-2, "posterior sd at data {}", sd[i]);
        }
        // Far from the data the posterior is uncertain.
        let (_, sd_mid) = s.predict(&[vec![1.0 / 12.0]]);
        assert!(sd_mid[0] > sd[0]);
    }
}
