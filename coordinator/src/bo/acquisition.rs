//! Acquisition functions for minimisation, on a standardised objective, and GP-Hedge.
//!
//! With posterior mean `mu`, standard deviation `sigma` and incumbent `best` (lowest
//! observed value), `z = (best - mu - xi) / sigma`:
//! - EI  = (best - mu - xi) Phi(z) + sigma phi(z)
//! - PI  = Phi(z)
//! - LCB = -(mu - kappa sigma)  (UCB for minimisation, negated so that larger is better)
//!
//! GP-Hedge (Hoffman, Brochu and de Freitas 2011, as the paper and scikit-optimize use it):
//! each acquisition nominates its best point; one nominee is chosen with probability
//! `softmax(eta * gains)`; once the surrogate has been refitted on the new data, every
//! acquisition's gain grows by the reward `-mu(nominee)` (the posterior mean at its own
//! nominee, negated for minimisation). Rewards are in standardised units, so `eta` does
//! not depend on the scale of the NLL.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acquisition {
    Ei,
    Pi,
    Lcb,
}

pub const ALL: [Acquisition; 3] = [Acquisition::Ei, Acquisition::Pi, Acquisition::Lcb];

/// Standard normal density.
pub fn phi(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Standard normal distribution function.
pub fn cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Parameters of the acquisitions, in standardised units.
///
/// PI needs a margin (`xi`, scikit-optimize's 0.01), or it is maximised right next to the
/// incumbent. EI does not (`ei_xi` = 0, as Optuna's GPSampler): its own variance term
/// explores, and a margin of 0.01 standard deviations stops it from refining near an
/// optimum once the observed spread is large. Measured over 100 seeds
/// (scripts/bench_bo.sh, BENCHMARKS.md): EI's median regret after 20 evaluations went from
/// 6e-4 / 0.11 / 0.0081 / 0.99 to 4e-7 / 0.041 / 0.0011 / 0.82 on Forrester / Branin /
/// Hartmann-3 / Hartmann-6 with the margin removed.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct AcqParams {
    /// PI's margin.
    pub xi: f64,
    /// EI's margin.
    #[serde(default)]
    pub ei_xi: f64,
    /// LCB's multiple of the standard deviation.
    pub kappa: f64,
}

impl Default for AcqParams {
    fn default() -> Self {
        AcqParams {
            xi: 0.01,
            ei_xi: 0.0,
            kappa: 1.96,
        }
    }
}

impl Acquisition {
    /// Value to maximise at a point with posterior `mu`, `sigma`.
    pub fn value(self, mu: f64, sigma: f64, best: f64, p: AcqParams) -> f64 {
        let improvement = best
            - mu
            - match self {
                Acquisition::Ei => p.ei_xi,
                _ => p.xi,
            };
        match self {
            Acquisition::Lcb => -(mu - p.kappa * sigma),
            _ if sigma <= 1e-12 => match self {
                Acquisition::Ei => improvement.max(0.0),
                _ => (improvement > 0.0) as u8 as f64,
            },
            Acquisition::Ei => {
                let z = improvement / sigma;
                improvement * cdf(z) + sigma * phi(z)
            }
            Acquisition::Pi => cdf(improvement / sigma),
        }
    }
}

/// GP-Hedge's portfolio state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hedge {
    pub gains: [f64; 3],
    pub eta: f64,
}

impl Default for Hedge {
    fn default() -> Self {
        Hedge {
            gains: [0.0; 3],
            eta: 1.0,
        }
    }
}

impl Hedge {
    /// Probability of choosing each acquisition.
    pub fn probabilities(&self) -> [f64; 3] {
        let m = self.gains.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = self
            .gains
            .iter()
            .map(|g| (self.eta * (g - m)).exp())
            .collect();
        let s: f64 = e.iter().sum();
        [e[0] / s, e[1] / s, e[2] / s]
    }

    /// Picks an acquisition index for a uniform draw `r` in [0, 1).
    pub fn choose(&self, r: f64) -> usize {
        let p = self.probabilities();
        let mut acc = 0.0;
        for (i, pi) in p.iter().enumerate() {
            acc += pi;
            if r < acc {
                return i;
            }
        }
        2
    }

    /// Adds each acquisition's reward: minus the refitted posterior mean at its nominee.
    pub fn update(&mut self, mu_at_nominees: [f64; 3]) {
        for (g, mu) in self.gains.iter_mut().zip(mu_at_nominees) {
            *g -= mu;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_forms() {
        let p = AcqParams {
            xi: 0.0,
            ei_xi: 0.0,
            kappa: 2.0,
        };
        // mu = best: z = 0, EI = sigma phi(0), PI = 1/2.
        assert!(
            (Acquisition::Ei.value(1.0, 0.5, 1.0, p) - 0.5 * 0.398_942_280_401_432_7).abs() < 1e-12
        );
        assert!((Acquisition::Pi.value(1.0, 0.5, 1.0, p) - 0.5).abs() < 1e-12);
        assert!((Acquisition::Lcb.value(1.0, 0.5, 1.0, p) - 0.0).abs() < 1e-12);
        // best - mu = 1, sigma = 1: EI = Phi(1) + phi(1) = 0.841344746 + 0.241970725.
        assert!((Acquisition::Ei.value(0.0, 1.0, 1.0, p) - 1.083_315_470_9).abs() < 1e-9);
        assert!((Acquisition::Pi.value(0.0, 1.0, 1.0, p) - 0.841_344_746_068_543).abs() < 1e-12);
        assert!((Acquisition::Lcb.value(0.0, 1.0, 1.0, p) - 2.0).abs() < 1e-12);
        // Zero variance: EI is the plain improvement, PI an indicator.
        assert_eq!(Acquisition::Ei.value(0.5, 0.0, 1.0, p), 0.5);
        assert_eq!(Acquisition::Pi.value(1.5, 0.0, 1.0, p), 0.0);
    }

    #[test]
    fn hedge_gains_follow_the_paper() {
        let mut h = Hedge::default();
        assert_eq!(h.probabilities(), [1.0 / 3.0; 3]);
        // EI's nominee is predicted best (lowest mean) after the refit: its gain grows most.
        h.update([-1.0, 0.5, 0.0]);
        assert_eq!(h.gains, [1.0, -0.5, 0.0]);
        let p = h.probabilities();
        assert!(p[0] > p[2] && p[2] > p[1]);
        let z = (1f64).exp() + (-0.5f64).exp() + 1.0;
        assert!((p[0] - 1f64.exp() / z).abs() < 1e-12);
        assert_eq!(h.choose(0.0), 0);
        assert_eq!(h.choose(0.999_999), 2);
    }
}
