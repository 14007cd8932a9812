//! The optimiser: initial design, surrogate fits, GP-Hedge, batch proposals that account
//! for pending evaluations, failures, stopping, and a serialisable state.
//!
//! Batches and asynchrony are one code path: each later proposal of a batch, and each
//! evaluation still running, is a pending point. With EI (the default) a candidate is
//! scored by the expected improvement it adds to the pending points under the joint
//! posterior (greedy q-EI, `Batch::JointEi`, as BoTorch and Optuna's GPSampler do); with
//! the other acquisitions, and as an option, pending points are believed at the posterior
//! mean (Kriging believer, a rank-one update that collapses the variance there). Compared
//! over 400 seeds in batches of 4 and asynchronously with 4 workers (BENCHMARKS.md): joint
//! EI had the lower regret on Forrester, Hartmann-3 and Hartmann-6, the believer on
//! Branin; constant liar was on par with the believer in an earlier comparison.
//!
//! `propose` is written as its phases (see its doc); the initial design, the model steps
//! and the candidates with their refinement are in the child modules `design`, `steps`
//! and `candidates`.
//!
//! Size: about 600 lines of code; the rest (about 300) are its tests.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::acquisition::{AcqParams, Acquisition, Hedge, ALL};
use super::gp::{Hyper, Surrogate, THETA_BOUNDS};
use super::space::SearchSpace;

mod candidates;
mod design;
mod steps;

/// Which acquisition drives proposals. The default is the paper's GP-Hedge. (It was EI
/// while the hyperparameters were refitted only every 5 observations: with stale length
/// scales GP-Hedge's rewards favoured PI, whose nominees sit next to the incumbent, and a
/// search crept from lambda = 0 towards a minimum at 0.3 in steps of about 0.01. Refitted
/// at every observation, both reach it; see `hedge_and_ei_both_reach_a_bowls_minimum`.
/// On the standard functions GP-Hedge then has lower regret than EI, and on the merge
/// landscapes the two are equal: BENCHMARKS.md.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// GP-Hedge over EI, PI and LCB (the paper's choice).
    Hedge,
    Single(Acquisition),
}

/// How the later points of a batch, and evaluations still running, are accounted for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Batch {
    /// Kriging believer: each such point is added to the surrogate at its posterior mean.
    Believer,
    /// With EI: the expected improvement jointly with those points under the posterior
    /// (q-EI, Monte Carlo, chosen greedily), as Optuna's GPSampler treats running trials.
    /// Other acquisitions (and GP-Hedge) still use the Kriging believer.
    #[default]
    JointEi,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BoConfig {
    pub seed: u64,
    /// Completed evaluations (successes) after which the search stops.
    pub max_evals: usize,
    /// Wall-time budget in seconds.
    pub max_seconds: Option<f64>,
    /// Add a third point inside the range (1-D; the middle of the better half, see
    /// `Optimizer::lambda_probe`) or the simplex's centroid to the initial design.
    pub center: bool,
    /// Latin-hypercube points added to the initial design after the anchors.
    pub initial_random: usize,
    /// Re-optimise the GP's hyperparameters at every observation while there are fewer
    /// than `refit_all_until` (the length scales matter most early, when each observation
    /// changes them: this lowered the regret on every standard function), then every
    /// `refit_every` new observations, keeping them fixed in between.
    pub refit_every: usize,
    #[serde(default = "default_refit_all_until")]
    pub refit_all_until: usize,
    /// Restarts of the hyperparameter optimisation on a full refit.
    pub n_start: usize,
    /// Bounds of the GP's correlation parameters (inverse length scales); see
    /// [`THETA_BOUNDS`].
    #[serde(default = "default_theta_bounds")]
    pub theta_bounds: (f64, f64),
    pub nugget: f64,
    /// Random candidates per proposal (plus local refinement around the best).
    pub n_candidates: usize,
    /// No proposal closer than this to an observed, failed, pending or already proposed
    /// point, measured between their merge weights (Euclidean over all weights, every
    /// group's included): two points with the same weights are the same merge, whatever
    /// their coordinates.
    pub min_distance: f64,
    /// Converged when the best expected improvement (standardised units) stays below
    /// this for `converge_rounds` consecutive rounds.
    pub converge_tol: Option<f64>,
    pub converge_rounds: usize,
    /// Propose failed points again (after a transient failure was fixed).
    pub retry_failed: bool,
    /// Before asking the acquisition, propose the minimiser of a simple model of a merge
    /// landscape when it has one: the parabola's vertex in 1-D, an isotropic quadratic's
    /// minimum on the simplex (see `Optimizer::parabolic_step`,
    /// `Optimizer::quadratic_step`). Turned off for the run after two model steps in a
    /// row fail to improve the best value.
    pub model_steps: bool,
    pub acq: AcqParams,
    pub strategy: Strategy,
    #[serde(default)]
    pub batch: Batch,
}

fn default_refit_all_until() -> usize {
    30
}

fn default_theta_bounds() -> (f64, f64) {
    THETA_BOUNDS
}

impl Default for BoConfig {
    fn default() -> Self {
        BoConfig {
            seed: 0,
            max_evals: 20,
            max_seconds: None,
            center: true,
            initial_random: 0,
            refit_every: 5,
            refit_all_until: default_refit_all_until(),
            n_start: 3,
            theta_bounds: THETA_BOUNDS,
            nugget: 1e-8,
            n_candidates: 256,
            min_distance: 1e-4,
            converge_tol: None,
            converge_rounds: 3,
            retry_failed: false,
            model_steps: true,
            acq: AcqParams::default(),
            // EI by default: over 100 seeds it matched or beat GP-Hedge and Optuna's
            // GPSampler on every standard function (GP-Hedge trailed on Hartmann-3/6;
            // BENCHMARKS.md); the merge landscapes are the same with either.
            strategy: Strategy::Single(Acquisition::Ei),
            batch: Batch::default(),
        }
    }
}

/// Draws at the pending points per joint expected improvement ([`Batch::JointEi`]). Latin
/// hypercube draws with EI's closed form for the candidate itself make few enough: over
/// 100 seeds, 32, 64 and 256 gave the same regret within noise, and the cost grows with
/// the count (the latency goal is for q = 8 proposals at 100 observations).
const JOINT_SAMPLES: usize = 32;

/// One finished evaluation: a value, or why it failed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Observation {
    pub u: Vec<f64>,
    pub weights: Vec<f64>,
    pub value: Option<f64>,
    pub error: Option<String>,
    /// Variance of `value` beyond the model's nugget: 0 for a full evaluation; for one
    /// stopped early (`ckmerge_common::race`), its estimate's squared standard error.
    #[serde(default)]
    pub noise: f64,
    /// An estimate whose point was later scored whole (a leader's confirmation, see
    /// `search::scheduler`): kept, so that observations and journal records stay one to
    /// one, but no longer given to the surrogate, which has the full value instead.
    #[serde(default)]
    pub superseded: bool,
    /// A leader's confirmation: scored whole beyond the budget at a point already
    /// estimated, so not counted towards `max_evals` (extending a finished run by k
    /// evaluations makes k new trials).
    #[serde(default)]
    pub confirms: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    MaxEvals,
    WallTime,
    Converged,
    /// Every point of a finite space (a family over whole windows) has been evaluated.
    Exhausted,
}

/// The whole optimiser state; serialise it to resume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Optimizer {
    pub space: SearchSpace,
    pub config: BoConfig,
    pub observations: Vec<Observation>,
    /// Values known before the search (the baselines a run scores first, where they are
    /// points of the space): the surrogate and the model steps use them, the budget does
    /// not count them, and proposals keep away from them.
    #[serde(default)]
    pub priors: Vec<Observation>,
    pub hedge: Hedge,
    /// Each acquisition's nominee of the last round, rewarded once the surrogate has been
    /// refitted on new data.
    nominees: Option<Vec<Vec<f64>>>,
    theta: Option<Vec<f64>>,
    theta_at: usize,
    round: u64,
    low_acq_rounds: usize,
    /// The last model step's point, to judge it once observed.
    #[serde(default)]
    last_model_point: Option<Vec<f64>>,
    #[serde(default)]
    model_misses: usize,
}

impl Optimizer {
    pub fn new(space: SearchSpace, config: BoConfig) -> Optimizer {
        Optimizer {
            space,
            config,
            observations: Vec::new(),
            priors: Vec::new(),
            hedge: Hedge::default(),
            nominees: None,
            theta: None,
            theta_at: 0,
            round: 0,
            low_acq_rounds: 0,
            last_model_point: None,
            model_misses: 0,
        }
    }

    /// Records a finished evaluation of cube point `u`: `Ok(value)` or `Err(why)`.
    /// Failures are remembered, never given to the surrogate as values.
    pub fn tell(&mut self, u: Vec<f64>, result: Result<f64, String>) {
        let weights = self.space.weights(&u);
        let (value, error) = match result {
            Ok(v) if v.is_finite() => (Some(v), None),
            Ok(v) => (None, Some(format!("objective was {v}"))),
            Err(e) => (None, Some(e)),
        };
        if value.is_some() {
            for o in &mut self.observations {
                if o.u == u && o.noise > 0.0 {
                    o.superseded = true;
                }
            }
        }
        self.observations.push(Observation {
            u,
            weights,
            value,
            error,
            noise: 0.0,
            superseded: false,
            confirms: false,
        });
    }

    /// The full value of a leader's confirmation (see [`Observation::confirms`]).
    pub fn tell_confirmation(&mut self, u: Vec<f64>, value: f64) {
        self.tell(u, Ok(value));
        if let Some(o) = self.observations.last_mut() {
            o.confirms = true;
        }
    }

    /// A value estimated from part of the data, with the estimate's variance: a trial
    /// stopped early because it was clearly worse than the incumbent, or not better by
    /// more than `search.early_stop_margin`, or clearly better (a leader).
    pub fn tell_estimate(&mut self, u: Vec<f64>, value: f64, variance: f64) {
        self.tell(u, Ok(value));
        if let Some(o) = self.observations.last_mut().filter(|o| o.value.is_some()) {
            o.noise = variance.max(0.0);
        }
    }

    /// Records a value known before the search (see `Optimizer::priors`); a non-finite
    /// one is ignored.
    pub fn tell_prior(&mut self, u: Vec<f64>, value: f64) {
        if value.is_finite() {
            let weights = self.space.weights(&u);
            self.priors.push(Observation {
                u,
                weights,
                value: Some(value),
                error: None,
                noise: 0.0,
                superseded: false,
                confirms: false,
            });
        }
    }

    /// Every value the surrogate learns from: the priors, then the search's own.
    fn successes(&self) -> impl Iterator<Item = &Observation> {
        self.priors
            .iter()
            .chain(&self.observations)
            .filter(|o| o.value.is_some() && !o.superseded)
    }

    /// The best observation so far that is not an estimate (see [`Self::tell_estimate`]).
    pub fn best(&self) -> Option<&Observation> {
        self.successes()
            .filter(|o| o.noise == 0.0)
            .min_by(|a, b| a.value.partial_cmp(&b.value).expect("finite values"))
    }

    /// Why the search should stop now, if it should.
    pub fn stop_reason(&self, elapsed_seconds: f64) -> Option<StopReason> {
        let own = self
            .observations
            .iter()
            .filter(|o| o.value.is_some() && !o.confirms);
        if own.count() >= self.config.max_evals {
            return Some(StopReason::MaxEvals);
        }
        if self
            .config
            .max_seconds
            .is_some_and(|m| elapsed_seconds >= m)
        {
            return Some(StopReason::WallTime);
        }
        if self.config.converge_tol.is_some() && self.low_acq_rounds >= self.config.converge_rounds
        {
            return Some(StopReason::Converged);
        }
        if let Some(m) = self.space.finite_points() {
            let mut seen: Vec<&Vec<f64>> = Vec::new();
            for o in self.priors.iter().chain(&self.observations) {
                if !seen.iter().any(|s| dist(s, &o.u) < 1e-12) {
                    seen.push(&o.u);
                }
            }
            if seen.len() >= m {
                return Some(StopReason::Exhausted);
            }
        }
        None
    }

    fn rng(&self, salt: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(
            self.config.seed
                ^ self.round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
    }

    /// `q` new cube points, distinct from each other and at least `min_distance` from
    /// everything observed, failed (unless `retry_failed`) and `pending`.
    ///
    /// The phases of a round: the initial design while it lasts (`Optimizer::design_points`);
    /// without two values, points that need no model (`Optimizer::fill_without_model`);
    /// then the surrogate is fitted (`Optimizer::fit`), the evaluations still running are
    /// accounted for (`Fantasy`), a model step may take one slot
    /// (`Optimizer::model_step`) and the acquisition fills the rest
    /// (`Optimizer::fill_by_acquisition`), whose best EI convergence watches.
    pub fn propose(&mut self, q: usize, pending: &[Vec<f64>]) -> Result<Vec<Vec<f64>>, String> {
        let taken = self.taken(pending);
        let mut chosen = self.design_points(q, &taken);
        if chosen.len() == q || self.successes().count() < 2 {
            self.fill_without_model(q, &taken, &mut chosen);
            self.round += 1;
            if chosen.len() < q {
                return Err(format!(
                    "every point of the space is evaluated or running ({} proposed of {q} asked)",
                    chosen.len()
                ));
            }
            return Ok(chosen);
        }
        let xs: Vec<Vec<f64>> = self.successes().map(|o| o.u.clone()).collect();
        let ys: Vec<f64> = self
            .successes()
            .map(|o| o.value.expect("successes"))
            .collect();
        let noise: Vec<f64> = self.successes().map(|o| o.noise).collect();
        let gp = self.fit(&xs, &ys, &noise)?;
        if let Some(noms) = self.nominees.take() {
            // GP-Hedge's reward for last round's nominees, judged by the refitted model.
            let (mu, _) = gp.predict(&noms);
            self.hedge.update([mu[0], mu[1], mu[2]]);
        }
        // EI improves on the best value known exactly: an estimate (a trial stopped early
        // with a margin) may lie below it by up to the margin, and is not a value the run
        // can return.
        let exact = noise.iter().zip(&ys).filter(|(n, _)| **n == 0.0);
        let best = exact.map(|(_, y)| *y).fold(f64::INFINITY, f64::min);
        let best = match best.is_finite() {
            true => best,
            false => ys.iter().cloned().fold(f64::INFINITY, f64::min),
        };
        let best_std = gp.standardize(best);
        let joint_mode = self.config.batch == Batch::JointEi
            && self.config.strategy == Strategy::Single(Acquisition::Ei);
        let unobserved: Vec<Vec<f64>> = pending.iter().chain(&chosen).cloned().collect();
        let mut fantasy = Fantasy::new(gp, unobserved, joint_mode)?;
        self.judge_last_model_step(best);
        if self.config.model_steps && self.model_misses < 2 && chosen.len() < q {
            let all = taken.with(&self.space, &chosen);
            if let Some(x) = self.model_step(&xs, &ys, &all) {
                fantasy.add(&x)?;
                self.last_model_point = Some(x.clone());
                chosen.push(x);
            }
        }
        // The best observations first: candidates are sampled around them.
        let mut order: Vec<usize> = (0..xs.len()).collect();
        order.sort_by(|&a, &b| ys[a].partial_cmp(&ys[b]).expect("finite"));
        let incumbents: Vec<Vec<f64>> = order.iter().map(|&i| xs[i].clone()).collect();
        let best_ei =
            self.fill_by_acquisition(q, &mut fantasy, best_std, &incumbents, &taken, &mut chosen)?;
        if let Some(tol) = self.config.converge_tol {
            self.low_acq_rounds = if best_ei < tol {
                self.low_acq_rounds + 1
            } else {
                0
            };
        }
        self.round += 1;
        Ok(chosen)
    }

    /// Every point a proposal must keep away from: `pending`, the observed ones and the
    /// failed ones (unless `retry_failed`).
    fn taken(&self, pending: &[Vec<f64>]) -> Taken {
        let mut taken = Taken::new(self.config.min_distance);
        for p in pending {
            taken.push(&self.space, p.clone());
        }
        for o in self.priors.iter().chain(&self.observations) {
            if o.value.is_some() || !self.config.retry_failed {
                taken.push(&self.space, o.u.clone());
            }
        }
        taken
    }

    /// Up to `q` points of the initial design not yet taken.
    fn design_points(&self, q: usize, taken: &Taken) -> Vec<Vec<f64>> {
        let mut chosen: Vec<Vec<f64>> = Vec::new();
        let mut all = taken.clone();
        for p in self.design(&taken.u) {
            if chosen.len() == q {
                break;
            }
            if all.far(&self.space, &p) {
                all.push(&self.space, p.clone());
                chosen.push(p);
            }
        }
        chosen
    }

    /// Fills `chosen` up to `q` while there is no model (the design is still running, or
    /// fewer than two values): random points, or in 1-D the middle of the widest gap (a
    /// random lambda can land next to a point already running).
    fn fill_without_model(&self, q: usize, taken: &Taken, chosen: &mut Vec<Vec<f64>>) {
        let mut rng = self.rng(1);
        let mut all = taken.with(&self.space, chosen);
        let mut tries = 0;
        while chosen.len() < q {
            tries += 1;
            if tries > 10_000 {
                // A discrete space with every point taken: propose fewer.
                break;
            }
            let p: Vec<f64> = match self.space {
                SearchSpace::Lambda { .. } | SearchSpace::Family { .. } if tries < 64 => {
                    let mut xs: Vec<f64> = all.u.iter().map(|t| t[0]).collect();
                    xs.extend([0.0, 1.0]);
                    xs.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
                    let (lo, hi) = xs
                        .windows(2)
                        .map(|w| (w[0], w[1]))
                        .max_by(|a, b| (a.1 - a.0).partial_cmp(&(b.1 - b.0)).expect("finite"))
                        .expect("two ends");
                    self.space.project(&[0.5 * (lo + hi)])
                }
                _ => self.space.sample(&mut rng),
            };
            if all.far(&self.space, &p) {
                all.push(&self.space, p.clone());
                chosen.push(p);
            }
        }
    }

    /// The surrogate of this round. Its hyperparameters are re-optimised while the data are
    /// few (`refit_all_until`) and every `refit_every` observations after; in between the
    /// kept length scales are reused. Past the early phase a re-optimisation starts from the
    /// current length scales alone: they move little between refits then, and the restarts
    /// are most of a refit's cost (see `bench_bo latency`).
    fn fit(&mut self, xs: &[Vec<f64>], ys: &[f64], noise: &[f64]) -> Result<Surrogate, String> {
        let n_ok = xs.len();
        let full = self.theta.is_none()
            || n_ok < self.config.refit_all_until
            || n_ok >= self.theta_at + self.config.refit_every;
        if !full {
            let theta = self.theta.as_deref().expect("kept only after a fit");
            return Surrogate::fit_noisy(
                xs,
                ys,
                noise,
                Hyper::Fixed(theta),
                self.config.nugget,
                self.config.theta_bounds,
            );
        }
        let from = if n_ok >= self.config.refit_all_until {
            self.theta.as_deref()
        } else {
            None
        };
        let hyper = Hyper::Fit {
            n_start: self.config.n_start,
            from,
        };
        let g = Surrogate::fit_noisy(
            xs,
            ys,
            noise,
            hyper,
            self.config.nugget,
            self.config.theta_bounds,
        )?;
        self.theta = Some(g.theta());
        self.theta_at = n_ok;
        Ok(g)
    }

    /// The surrogate over the successful observations with the length scales the last
    /// proposal used (fitted afresh when no proposal has fitted any yet): the model the
    /// report's plots draw. `None` with fewer than three values.
    pub fn surrogate(&self) -> Option<Result<Surrogate, String>> {
        let xs: Vec<Vec<f64>> = self.successes().map(|o| o.u.clone()).collect();
        if xs.len() < 3 {
            return None;
        }
        let ys: Vec<f64> = self
            .successes()
            .map(|o| o.value.expect("successes"))
            .collect();
        let hyper = match &self.theta {
            Some(theta) => Hyper::Fixed(theta),
            None => Hyper::Fit {
                n_start: self.config.n_start,
                from: None,
            },
        };
        let noise: Vec<f64> = self.successes().map(|o| o.noise).collect();
        Some(Surrogate::fit_noisy(
            &xs,
            &ys,
            &noise,
            hyper,
            self.config.nugget,
            self.config.theta_bounds,
        ))
    }

    /// Whether the last model step became the incumbent: two misses in a row and model
    /// steps stop (the landscape is not as smooth as they assume).
    fn judge_last_model_step(&mut self, best: f64) {
        if let Some(p) = self.last_model_point.take() {
            let at = self
                .successes()
                .find(|o| dist(&o.u, &p) < 1e-12)
                .and_then(|o| o.value);
            match at {
                Some(v) if v <= best => self.model_misses = 0,
                Some(_) => self.model_misses += 1,
                None => self.last_model_point = Some(p),
            }
        }
    }

    /// The minimum of a low-order model through the observations, where the space has one
    /// ([`Optimizer::parabolic_step`], [`Optimizer::quadratic_step`]).
    fn model_step(&self, xs: &[Vec<f64>], ys: &[f64], taken: &Taken) -> Option<Vec<f64>> {
        match self.space {
            SearchSpace::Lambda { .. } | SearchSpace::Family { .. } => {
                self.parabolic_step(xs, ys, taken)
            }
            SearchSpace::Simplex { .. } => self.quadratic_step(xs, ys, taken),
            SearchSpace::Cube { .. } | SearchSpace::Grouped { .. } => None,
        }
    }

    /// Fills `chosen` up to `q` by the acquisition: GP-Hedge's pick (or the configured
    /// acquisition) for the first point of the round, EI for the rest of a batch; each pick
    /// joins `fantasy`. Returns the largest EI seen over the candidates of the round's
    /// steps, the smallest of those maxima, which convergence watches.
    fn fill_by_acquisition(
        &mut self,
        q: usize,
        fantasy: &mut Fantasy,
        best_std: f64,
        incumbents: &[Vec<f64>],
        taken: &Taken,
        chosen: &mut Vec<Vec<f64>>,
    ) -> Result<f64, String> {
        let mut acq_used: Option<Acquisition> = None;
        let mut best_ei = f64::INFINITY;
        while chosen.len() < q {
            let k = chosen.len() as u64;
            let all = taken.with(&self.space, chosen);
            let cands = self.candidates(incumbents, &all, k);
            if cands.is_empty() {
                return Err("no candidate point is far enough from the points already evaluated; the space is exhausted at this resolution".into());
            }
            let gp = &fantasy.gp;
            // With points pending under joint EI, the candidates are scored by the EI they
            // add to those points (which is also what convergence watches); otherwise by
            // the posterior at each.
            let joint_scores = match &fantasy.joint {
                Some(joint) if !joint.is_empty() => {
                    let je = gp.joint_ei(
                        joint,
                        best_std,
                        JOINT_SAMPLES,
                        self.config.seed ^ self.round.wrapping_mul(31) ^ (k + 1) << 40,
                    )?;
                    let scores = gp.score_joint(&je, &cands);
                    Some((je, scores))
                }
                _ => None,
            };
            let (mu, sd) = match joint_scores {
                Some(_) => (Vec::new(), Vec::new()),
                None => gp.predict(&cands),
            };
            let ei_max = match &joint_scores {
                Some((_, scores)) => scores.iter().cloned().fold(0.0, f64::max),
                None => (0..cands.len())
                    .map(|i| Acquisition::Ei.value(mu[i], sd[i], best_std, self.config.acq))
                    .fold(0.0, f64::max),
            };
            best_ei = best_ei.min(ei_max);
            let acq = match (acq_used, self.config.strategy) {
                // GP-Hedge picks one point per round (its gains are per round); the rest
                // of a batch is filled by EI under the Kriging believer, which spreads
                // out where PI would stack points on the believed incumbent.
                (Some(_), Strategy::Hedge) => Acquisition::Ei,
                (Some(a), _) => a,
                (None, Strategy::Single(a)) => a,
                (None, Strategy::Hedge) => {
                    let noms: Vec<Vec<f64>> = ALL
                        .iter()
                        .map(|&a| self.refine(gp, &cands, &mu, &sd, a, best_std, &all, k))
                        .collect();
                    let pick = self.hedge.choose(self.rng(2 + k).gen());
                    self.nominees = Some(noms);
                    ALL[pick]
                }
            };
            acq_used = Some(acq);
            let x = match (
                &self.nominees,
                chosen.is_empty() && self.config.strategy == Strategy::Hedge,
            ) {
                (Some(noms), true) => {
                    noms[ALL.iter().position(|&a| a == acq).expect("in ALL")].clone()
                }
                _ if joint_scores.is_some() => {
                    let (je, scores) = joint_scores.expect("checked");
                    let score = |pts: &[Vec<f64>]| gp.score_joint(&je, pts);
                    self.refine_with(&cands, scores, &score, &all, k, acq as u64)
                }
                _ => self.refine(gp, &cands, &mu, &sd, acq, best_std, &all, k),
            };
            fantasy.add(&x)?;
            chosen.push(x);
        }
        Ok(best_ei)
    }
}

/// The surrogate of a round with its points not yet observed (evaluations still running,
/// earlier picks of the batch): believed at the posterior mean (the Kriging believer, a
/// rank-one update that collapses the variance there), or, for joint EI, kept apart in
/// `joint` and integrated over.
struct Fantasy {
    gp: Surrogate,
    joint: Option<Vec<Vec<f64>>>,
}

impl Fantasy {
    fn new(gp: Surrogate, unobserved: Vec<Vec<f64>>, joint_mode: bool) -> Result<Fantasy, String> {
        if joint_mode {
            return Ok(Fantasy {
                gp,
                joint: Some(unobserved),
            });
        }
        let mut gp = gp;
        if !unobserved.is_empty() {
            let (mu, _) = gp.predict(&unobserved);
            gp.add_believed(&unobserved, &mu)?;
        }
        Ok(Fantasy { gp, joint: None })
    }

    fn add(&mut self, x: &[f64]) -> Result<(), String> {
        match &mut self.joint {
            Some(joint) => joint.push(x.to_vec()),
            None => {
                let x = [x.to_vec()];
                let (m, _) = self.gp.predict(&x);
                self.gp.add_believed(&x, &m)?;
            }
        }
        Ok(())
    }
}

/// The points a proposal must keep away from, with their merge weights: distinctness is
/// judged on weights (see `BoConfig::min_distance`).
#[derive(Clone)]
pub(super) struct Taken {
    pub u: Vec<Vec<f64>>,
    w: Vec<Vec<f64>>,
    min_distance: f64,
}

impl Taken {
    fn new(min_distance: f64) -> Taken {
        Taken {
            u: Vec::new(),
            w: Vec::new(),
            min_distance,
        }
    }

    pub(super) fn push(&mut self, space: &SearchSpace, u: Vec<f64>) {
        self.w.push(space.weights(&u));
        self.u.push(u);
    }

    /// A copy with `more` points.
    pub(super) fn with(&self, space: &SearchSpace, more: &[Vec<f64>]) -> Taken {
        let mut t = self.clone();
        for p in more {
            t.push(space, p.clone());
        }
        t
    }

    /// Whether the merge of point `p` differs from every taken one by at least the
    /// minimum distance.
    pub(super) fn far(&self, space: &SearchSpace, p: &[f64]) -> bool {
        self.far_weights(&space.weights(p))
    }

    pub(super) fn far_weights(&self, w: &[f64]) -> bool {
        self.w.iter().all(|t| dist(w, t) >= self.min_distance)
    }
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quad(u: &[f64]) -> f64 {
        // A smooth bowl with its minimum inside, like a merge landscape.
        u.iter()
            .enumerate()
            .map(|(i, x)| (x - 0.3 - 0.1 * i as f64).powi(2))
            .sum::<f64>()
            + 3.0
    }

    fn run(space: SearchSpace, q: usize, evals: usize, seed: u64) -> Optimizer {
        let mut o = Optimizer::new(
            space,
            BoConfig {
                seed,
                max_evals: evals,
                ..Default::default()
            },
        );
        while o.stop_reason(0.0).is_none() {
            for u in o.propose(q, &[]).unwrap() {
                let v = quad(&u);
                o.tell(u, Ok(v));
            }
        }
        o
    }

    #[test]
    fn starts_from_the_ends_then_finds_an_interior_minimum() {
        let mut o = Optimizer::new(
            SearchSpace::lambda(0.0).unwrap(),
            BoConfig {
                center: false,
                ..Default::default()
            },
        );
        let first = o.propose(2, &[]).unwrap();
        assert_eq!(
            first,
            vec![vec![0.0], vec![1.0]],
            "the paper's initial design"
        );
        for u in first {
            let v = quad(&u);
            o.tell(u, Ok(v));
        }
        for _ in 0..8 {
            let u = o.propose(1, &[]).unwrap().remove(0);
            let v = quad(&u);
            o.tell(u, Ok(v));
        }
        let best = o.best().unwrap();
        let trace: Vec<(f64, f64)> = o
            .observations
            .iter()
            .map(|x| (x.u[0], x.value.unwrap()))
            .collect();
        assert!(
            (best.u[0] - 0.3).abs() < 0.03,
            "best lambda {:?}; trace {trace:?}; hedge {:?}",
            best.u,
            o.hedge
        );
    }

    #[test]
    fn hedge_and_ei_both_reach_a_bowls_minimum() {
        // GP-Hedge used to creep here (see `Strategy`).
        let run = |strategy| {
            // The acquisitions alone: no model steps.
            let mut o = Optimizer::new(
                SearchSpace::lambda(0.0).unwrap(),
                BoConfig {
                    center: false,
                    strategy,
                    model_steps: false,
                    ..Default::default()
                },
            );
            for _ in 0..10 {
                let u = o.propose(1, &[]).unwrap().remove(0);
                let v = quad(&u);
                o.tell(u, Ok(v));
            }
            o.best().unwrap().u[0]
        };
        let ei = run(Strategy::Single(Acquisition::Ei));
        let hedge = run(Strategy::Hedge);
        assert!((ei - 0.3).abs() < 0.03, "EI best {ei}");
        assert!((hedge - 0.3).abs() < 0.03, "GP-Hedge best {hedge}");
    }

    #[test]
    fn the_third_1d_point_probes_the_better_half_once_the_ends_are_known() {
        let third = |f0: f64, f1: f64| {
            let mut o = Optimizer::new(SearchSpace::lambda(0.0).unwrap(), BoConfig::default());
            let ends = o.propose(2, &[]).unwrap();
            assert_eq!(ends, vec![vec![0.0], vec![1.0]]);
            o.tell(vec![0.0], Ok(f0));
            o.tell(vec![1.0], Ok(f1));
            let p = o.propose(1, &[]).unwrap().remove(0);
            o.tell(p.clone(), Ok(f0.min(f1) - 0.1));
            // The probe is made once: the next point is the model's, not a second probe.
            let next = o.propose(1, &[]).unwrap().remove(0);
            assert!(dist(&next, &[0.25]) > 1e-3 && dist(&next, &[0.75]) > 1e-3);
            p[0]
        };
        assert_eq!(third(3.8, 3.4), 0.75);
        assert_eq!(third(3.4, 3.8), 0.25);
        assert_eq!(third(3.5, 3.5), 0.5);
        // Proposed with the ends (no values yet), or while an end is still running: the
        // middle, and only once.
        let mut o = Optimizer::new(SearchSpace::lambda(0.0).unwrap(), BoConfig::default());
        assert_eq!(
            o.propose(3, &[]).unwrap(),
            vec![vec![0.0], vec![1.0], vec![0.5]]
        );
        let mut o = Optimizer::new(SearchSpace::lambda(0.0).unwrap(), BoConfig::default());
        o.tell(vec![0.0], Ok(3.8));
        let p = o.propose(1, &[vec![1.0]]).unwrap();
        assert_eq!(p, vec![vec![0.5]]);
        o.tell(vec![1.0], Ok(3.4));
        let next = o.propose(1, &p).unwrap().remove(0);
        assert!(
            dist(&next, &[0.75]) > 1e-3,
            "a second probe while the first runs"
        );
    }

    #[test]
    fn a_1d_opening_wider_than_the_design_fills_the_widest_gaps() {
        let mut o = Optimizer::new(SearchSpace::lambda(0.0).unwrap(), BoConfig::default());
        let first = o.propose(5, &[]).unwrap();
        assert_eq!(
            first,
            vec![vec![0.0], vec![1.0], vec![0.5], vec![0.75], vec![0.25]]
        );
        // Asynchronously: one value back, four running; the next fills a gap too.
        o.tell(vec![0.5], Ok(3.0));
        let pending: Vec<Vec<f64>> = first.iter().filter(|p| p[0] != 0.5).cloned().collect();
        let next = o.propose(1, &pending).unwrap();
        assert_eq!(next, vec![vec![0.875]]);
    }

    #[test]
    fn model_steps_find_the_minimum_of_their_model_exactly() {
        // 1-D: ends and middle in one batch, then the parabola's vertex.
        let mut o = Optimizer::new(SearchSpace::lambda(0.0).unwrap(), BoConfig::default());
        let f = |u: &[f64]| (u[0] - 0.37).powi(2) + 2.0;
        for u in o.propose(3, &[]).unwrap() {
            let v = f(&u);
            o.tell(u, Ok(v));
        }
        let next = o.propose(1, &[]).unwrap();
        assert!((next[0][0] - 0.37).abs() < 1e-9, "{next:?}");

        // Simplex: vertices, centroid, then the isotropic quadratic's minimum.
        let space = SearchSpace::simplex(vec![0.0; 3]).unwrap();
        let target = [0.2, 0.3, 0.5];
        let g = |w: &[f64]| {
            w.iter()
                .zip(target)
                .map(|(a, t)| (a - t).powi(2))
                .sum::<f64>()
        };
        let mut o = Optimizer::new(space.clone(), BoConfig::default());
        for u in o.propose(4, &[]).unwrap() {
            let v = g(&space.weights(&u));
            o.tell(u, Ok(v));
        }
        let w = space.weights(&o.propose(1, &[]).unwrap()[0]);
        for (a, t) in w.iter().zip(target) {
            assert!((a - t).abs() < 1e-9, "{w:?}");
        }
    }

    #[test]
    fn batches_are_distinct_inside_bounds_and_on_the_simplex() {
        let space = SearchSpace::simplex(vec![0.0, 0.1, 0.0, 0.0]).unwrap();
        let o = run(space.clone(), 4, 16, 3);
        for (i, a) in o.observations.iter().enumerate() {
            assert!(a.u.iter().all(|x| (0.0..=1.0).contains(x)));
            assert!(
                (a.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9 && a.weights[1] >= 0.1 - 1e-9
            );
            for b in &o.observations[..i] {
                assert!(
                    dist(&a.u, &b.u) >= 1e-3,
                    "duplicate proposals {:?} {:?}",
                    a.u,
                    b.u
                );
            }
        }
        assert!(o.best().unwrap().value.unwrap() < quad(&space.cube(&[0.25, 0.25, 0.25, 0.25])));
    }

    /// No two trials of a 4-way simplex search are the same merge: every pair of weight
    /// vectors at least the minimum distance apart. (Stick-breaking coordinates with the
    /// distance taken on them evaluated a vertex twice: every cube point with `u_0 = 1` is
    /// the first checkpoint alone.)
    #[test]
    fn a_simplex_search_never_evaluates_the_same_merge_twice() {
        // A landscape like a trajectory's: best towards the latest checkpoints, the
        // single checkpoints far worse, so the search is drawn to the edges too.
        let target = [0.05, 0.15, 0.35, 0.45];
        let f = |w: &[f64]| {
            3.0 + w
                .iter()
                .zip(target)
                .map(|(a, t)| (a - t).powi(2))
                .sum::<f64>()
                + 0.3 * w.iter().map(|x| x.powi(4)).sum::<f64>()
        };
        for seed in 0..3 {
            for q in [1, 4] {
                let space = SearchSpace::simplex(vec![0.0; 4]).unwrap();
                let mut o = Optimizer::new(
                    space,
                    BoConfig {
                        seed,
                        max_evals: 30,
                        ..Default::default()
                    },
                );
                while o.stop_reason(0.0).is_none() {
                    for u in o.propose(q, &[]).unwrap() {
                        let v = f(&o.space.weights(&u));
                        o.tell(u, Ok(v));
                    }
                }
                let w: Vec<&Vec<f64>> = o.observations.iter().map(|x| &x.weights).collect();
                for i in 0..w.len() {
                    for j in 0..i {
                        assert!(
                            dist(w[i], w[j]) >= o.config.min_distance,
                            "seed {seed}, q {q}: trials {j} and {i} are the same merge {:?} {:?}",
                            w[j],
                            w[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_window_search_evaluates_each_window_once_then_stops() {
        let n = 6;
        let space = SearchSpace::family(crate::bo::space::Family::Window, n).unwrap();
        let mut o = Optimizer::new(
            space,
            BoConfig {
                max_evals: 50,
                ..Default::default()
            },
        );
        // Best: the last 4.
        let f = |w: &[f64]| {
            let k = w.iter().filter(|&&x| x > 0.0).count() as f64;
            (k - 4.0).powi(2)
        };
        let mut rounds = 0;
        while o.stop_reason(0.0).is_none() && rounds < 20 {
            for u in o.propose(1, &[]).unwrap() {
                let v = f(&o.space.weights(&u));
                o.tell(u, Ok(v));
            }
            rounds += 1;
        }
        assert_eq!(o.stop_reason(0.0), Some(StopReason::Exhausted));
        assert_eq!(o.observations.len(), n, "each window once");
        assert_eq!(o.best().unwrap().value, Some(0.0));
        assert!(o.propose(1, &[]).is_err());
    }

    /// A trial stopped early with a margin may be estimated below the best value scored
    /// whole; the estimate is an observation of the surrogate, never the best.
    #[test]
    fn an_estimate_below_the_best_exact_value_is_not_the_best() {
        let mut o = Optimizer::new(SearchSpace::lambda(0.0).unwrap(), BoConfig::default());
        o.tell(vec![0.0], Ok(3.0));
        o.tell(vec![1.0], Ok(2.0));
        o.tell_estimate(vec![0.5], 1.999, 1e-6);
        assert_eq!(o.best().unwrap().u, vec![1.0]);
        assert_eq!(o.observations.last().unwrap().noise, 1e-6);
        assert_eq!(o.propose(1, &[]).unwrap().len(), 1);
    }

    #[test]
    fn pending_points_are_respected() {
        let mut o = Optimizer::new(
            SearchSpace::simplex(vec![0.0; 3]).unwrap(),
            BoConfig::default(),
        );
        for u in o.propose(4, &[]).unwrap() {
            let v = quad(&u);
            o.tell(u, Ok(v));
        }
        let pending = o.propose(3, &[]).unwrap();
        let next = o.propose(3, &pending).unwrap();
        for n in &next {
            for p in &pending {
                assert!(dist(n, p) >= 1e-3, "{n:?} proposed while {p:?} is pending");
            }
        }
    }

    #[test]
    fn failures_are_not_values_and_not_proposed_again() {
        let mut o = Optimizer::new(SearchSpace::lambda(0.0).unwrap(), BoConfig::default());
        let ends = o.propose(3, &[]).unwrap();
        o.tell(ends[0].clone(), Ok(quad(&ends[0])));
        o.tell(ends[1].clone(), Ok(quad(&ends[1])));
        o.tell(ends[2].clone(), Err("worker lost".into()));
        o.tell(vec![0.7], Ok(f64::NAN));
        assert_eq!(
            o.observations.iter().filter(|x| x.value.is_some()).count(),
            2
        );
        for _ in 0..5 {
            let u = o.propose(1, &[]).unwrap().remove(0);
            assert!(dist(&u, &ends[2]) >= 1e-3 && dist(&u, &[0.7]) >= 1e-3);
            let v = quad(&u);
            o.tell(u, Ok(v));
        }
    }

    #[test]
    fn deterministic_for_a_seed_and_resumable_from_its_state() {
        let a = run(SearchSpace::simplex(vec![0.0; 3]).unwrap(), 2, 12, 7);
        let b = run(SearchSpace::simplex(vec![0.0; 3]).unwrap(), 2, 12, 7);
        let ua: Vec<_> = a.observations.iter().map(|o| o.u.clone()).collect();
        let ub: Vec<_> = b.observations.iter().map(|o| o.u.clone()).collect();
        assert_eq!(ua, ub);

        // Serialise mid-run, restore, and continue: same proposals as without the break.
        let mut live = Optimizer::new(
            SearchSpace::simplex(vec![0.0; 3]).unwrap(),
            BoConfig {
                seed: 7,
                ..Default::default()
            },
        );
        for _ in 0..4 {
            for u in live.propose(2, &[]).unwrap() {
                let v = quad(&u);
                live.tell(u, Ok(v));
            }
        }
        let saved = serde_json::to_string(&live).unwrap();
        let mut restored: Optimizer = serde_json::from_str(&saved).unwrap();
        assert_eq!(
            live.propose(2, &[]).unwrap(),
            restored.propose(2, &[]).unwrap()
        );
    }

    #[test]
    fn stops_on_budget_and_convergence() {
        let o = run(SearchSpace::lambda(0.0).unwrap(), 1, 6, 1);
        assert_eq!(o.stop_reason(0.0), Some(StopReason::MaxEvals));
        let mut c = Optimizer::new(
            SearchSpace::lambda(0.0).unwrap(),
            BoConfig {
                max_evals: 100,
                converge_tol: Some(1e-3),
                converge_rounds: 2,
                max_seconds: Some(60.0),
                ..Default::default()
            },
        );
        assert_eq!(c.stop_reason(61.0), Some(StopReason::WallTime));
        let mut rounds = 0;
        while c.stop_reason(0.0).is_none() && rounds < 60 {
            for u in c.propose(1, &[]).unwrap() {
                let v = quad(&u);
                c.tell(u, Ok(v));
            }
            rounds += 1;
        }
        assert_eq!(
            c.stop_reason(0.0),
            Some(StopReason::Converged),
            "after {rounds} rounds"
        );
    }
}
