//! Candidate points for the acquisition and their local refinement.

use rand::Rng;

use super::{Optimizer, Taken};
use crate::bo::acquisition::Acquisition;
use crate::bo::gp::Surrogate;

impl Optimizer {
    /// Random candidates, plus points near the best observations (`incumbents`, best
    /// first), all far enough from `taken`.
    pub(super) fn candidates(
        &self,
        incumbents: &[Vec<f64>],
        taken: &Taken,
        salt: u64,
    ) -> Vec<Vec<f64>> {
        let mut rng = self.rng(100 + salt);
        let mut out = Vec::with_capacity(self.config.n_candidates + 64);
        for _ in 0..self.config.n_candidates {
            out.push(self.space.sample(&mut rng));
        }
        // Around the incumbents, where the minimum most likely is.
        for x in incumbents.iter().take(8) {
            for s in [0.1, 0.02] {
                for _ in 0..8 {
                    let moved: Vec<f64> = x
                        .iter()
                        .map(|v| v + s * (rng.gen::<f64>() * 2.0 - 1.0))
                        .collect();
                    out.push(self.space.project(&moved));
                }
            }
        }
        out.retain(|p| taken.far(&self.space, p));
        out
    }

    /// The candidate maximising `acq`, refined by shrinking random steps around the best
    /// few (the acquisition surface is cheap to evaluate, its optimum is often narrow).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refine(
        &self,
        gp: &Surrogate,
        cands: &[Vec<f64>],
        mu: &[f64],
        sd: &[f64],
        acq: Acquisition,
        best: f64,
        taken: &Taken,
        salt: u64,
    ) -> Vec<f64> {
        let p = self.config.acq;
        let scores: Vec<f64> = (0..cands.len())
            .map(|i| acq.value(mu[i], sd[i], best, p))
            .collect();
        let score = |pts: &[Vec<f64>]| {
            let (m, s) = gp.predict(pts);
            (0..pts.len())
                .map(|i| acq.value(m[i], s[i], best, p))
                .collect::<Vec<f64>>()
        };
        self.refine_with(cands, scores, &score, taken, salt, acq as u64)
    }

    /// [`Optimizer::refine`] for any acquisition: `scores` of `cands`, `score` for new
    /// points, `tag` to vary the random steps between acquisitions.
    pub(super) fn refine_with(
        &self,
        cands: &[Vec<f64>],
        scores: Vec<f64>,
        score: &dyn Fn(&[Vec<f64>]) -> Vec<f64>,
        taken: &Taken,
        salt: u64,
        tag: u64,
    ) -> Vec<f64> {
        let mut scored: Vec<(f64, &Vec<f64>)> = scores.into_iter().zip(cands).collect();
        scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        let mut rng = self.rng(1000 + salt * 8 + tag);
        // Three starts refined together: one prediction call per step size.
        let mut starts: Vec<(f64, Vec<f64>)> = scored
            .iter()
            .take(3)
            .map(|(v, x)| (*v, (*x).clone()))
            .collect();
        for step in [0.05, 0.02, 0.005, 0.001, 0.0002] {
            let mut trial: Vec<(usize, Vec<f64>)> = Vec::with_capacity(starts.len() * 16);
            for (k, (_, x)) in starts.iter().enumerate() {
                for _ in 0..16 {
                    let moved: Vec<f64> = x
                        .iter()
                        .map(|c| c + step * (rng.gen::<f64>() * 2.0 - 1.0))
                        .collect();
                    let t = self.space.project(&moved);
                    if taken.far(&self.space, &t) {
                        trial.push((k, t));
                    }
                }
            }
            let pts: Vec<Vec<f64>> = trial.iter().map(|(_, t)| t.clone()).collect();
            let sc = score(&pts);
            for (i, (k, t)) in trial.into_iter().enumerate() {
                let tv = sc[i];
                if tv > starts[k].0 {
                    starts[k] = (tv, t);
                }
            }
        }
        let (_, best_x) = starts
            .into_iter()
            .max_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal))
            .expect("at least one candidate");
        best_x
    }
}
