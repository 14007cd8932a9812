//! Early stopping of a trial that is clearly worse than the incumbent, or cannot improve it by
//! more than a margin (`search.early_stop`, `search.early_stop_margin`), or is clearly
//! better than the best known (a leader: see "Leaders" below).
//!
//! With early stopping on, the objective's windows are scored in a fixed random order
//! (one permutation per run, [`permutation`]), one window per forward pass; a window is
//! the unit of the test (called a batch below). A trial is sent the incumbent's NLL sum of
//! every window, in that order. At a few
//! looks ([`LOOKS`]: after 1/16, 1/8, 1/4 and 1/2 of the batches) the worker estimates the
//! difference of the whole set's mean NLL, candidate minus incumbent, from the paired
//! per-batch differences scored so far, and stops when its lower confidence bound is above
//! `-margin` (`search.early_stop_margin`, nats per token; 0: above zero): the candidate
//! is then not better than the incumbent by more than the margin on the whole set, but
//! for an error rate near `alpha` (see below).
//!
//! Why a margin: near the optimum, candidates and the incumbent differ by 1e-5 nats per
//! token, which no test decides from part of the set; with a margin they are stopped once
//! the test shows they cannot improve the incumbent by more than it. Whatever the order
//! of the trials, a stopped candidate's true value is then above `best - margin` for the
//! best full value the run ends with (the incumbent only improves), so the best found is
//! within `margin` of what the same trials scored whole would have shown, up to the
//! test's error rate.
//!
//! The estimate is the expansion estimator of simple random sampling without replacement:
//! with `B` batches in all, `T` scored tokens in all, `n` batches scored and `d_b` the
//! paired difference of batch `b`'s NLL sums,
//! `D = (B / T) mean(d)`, `se(D) = (B / T) s(d) sqrt((1 - n / B) / n)`,
//! unbiased whatever the batches' sizes. The bound at look k is `D - t se(D)` with `t`
//! Student's quantile (n - 1 degrees of freedom) of `1 - alpha SPEND[k]`: the looks'
//! shares of `alpha` add up to it (Bonferroni), so the chance of any wrong stop is at most
//! `alpha` as far as the approximation holds; no look is taken before [`MIN_UNITS`]
//! batches. It does not hold exactly: on the fixtures' real per-window differences (the
//! test `a_candidate_no_worse_is_stopped_at_most_one_and_a_half_alpha`), a candidate
//! exactly as good as the incumbent was stopped in 0.5 % to 1.3 % of window orders at
//! `alpha` = 1 %, most often at the first looks. The stated bound is 1.5 `alpha`. With a
//! margin the same holds of a candidate better than the incumbent by exactly the margin
//! (the test is the margin-free one on the differences shifted by it); one better still
//! is stopped less often.
//!
//! A task's units are its items (each item's `choice_nll`, `T` = the number of items),
//! scored in a fixed random order of items; no look before [`MIN_ITEMS`] of them (an
//! item is a heavier-tailed unit than a window: see there). An objective of several sets
//! (`data.objective` as a weighted mixture) is sampled set by set at each look's fraction
//! (stratified sampling, each set in its own order, [`set_seed`]): `D = Σ w_i D_i`,
//! `se(D)^2 = Σ w_i^2 se(D_i)^2`, `t` with the fewest degrees of freedom of the sets
//! still sampled; a set too small for looks of its own is scored whole before the first
//! look and contributes its exact difference ([`look_plan`], [`look_strata`]).
//!
//! A stopped trial's value is not a full one: it is the estimate `incumbent + D`, with its
//! variance `se(D)^2`, and is told to the surrogate as such (a noisier observation).
//!
//! # Leaders
//!
//! A trial that improves on the incumbent used to be scored whole, since it became the
//! next incumbent, whose every unit later trials race against. On a search whose first
//! trials each improve on the last (a 1-D search walking into its basin) that kept half
//! the trials whole. Now a trial whose *upper* bound at a look is below zero, clearly
//! better than what it raced, stops too, as the *leader*: its value is the estimate
//! `incumbent + D` like any stopped trial's, and its scored units go with later trials'
//! requests. Those are tested against the leader, paired on the units it scored: stopped
//! as not better (lower bound above `-margin`) or as better still (upper bound below
//! zero, the next leader). Beyond the leader's units they are tested against the
//! incumbent, which is known on every unit: stopped as not better than it by more than
//! the margin (then not better than the leader either, which is better than the
//! incumbent), never as better (they cannot be shown better than the leader there), so
//! scored whole if they get that far, making the next incumbent. Either way a stopped
//! trial's value is estimated against the incumbent, never the leader, so estimates never
//! chain.
//!
//! The coordinator keeps the leader from the journal's records in order: a trial stopped
//! as better than the leader it raced becomes it (one that raced another, with several
//! workers, where its estimate is below the leader's); a trial scored whole ends it as
//! its confirmation, or where it raced it and is shown better than it on the leader's
//! units, paired ([`Versus`]: the upper bound at the last look's quantile below zero, the
//! test a stopped trial passes to lead), or, if it did not race it, with a value below
//! its estimate (not by the estimate where it raced it: the leader's estimate, against an
//! incumbent that may be far away, can be off by more than the margin). When the budget
//! is spent, a leader left is scored whole (its *confirmation*, a trial of its own in the
//! journal, counted in the scored tokens), so the best found is always a full
//! evaluation. Error rates: the test is symmetric, but the per-window differences are
//! skewed, so the two sides differ: a candidate exactly as good as the incumbent was
//! stopped as better in 0.7 % to 1.5 % of window orders at `alpha` = 1 %
//! (`worker/tests/race.rs`; stated bound 2 `alpha`). A wrong leader costs tokens (later
//! trials are tested against a worse reference, so stop later), not the best: the
//! confirmation scores it whole. The margin's guarantee (a stopped trial's true value
//! above `best - margin`) holds against the leader's true value, which the confirmation
//! makes a full evaluation of the run, up to the test's error: a leader is passed only by
//! a trial shown better than it, paired, stopped at a look or scored whole (the latter
//! one more test, at the last look's share of `alpha`), and ended before its
//! confirmation otherwise only, with several workers, by a full value below its
//! estimate from a trial that did not race it.

use serde::{Deserialize, Serialize};

/// Fractions of the batches at which the test looks. The last look is at half the set:
/// a candidate not clearly worse by then is scored to the end.
pub const LOOKS: [f64; 4] = [1.0 / 16.0, 1.0 / 8.0, 1.0 / 4.0, 1.0 / 2.0];

/// The share of `alpha` each look spends: little at the first looks, where few windows
/// are scored and the normal approximation is at its worst (on the fixtures' real
/// per-window differences an even split stopped 1.4 % of equal candidates at alpha = 1 %,
/// nearly all at the first two looks).
pub const SPEND: [f64; 4] = [0.1, 0.2, 0.3, 0.4];

/// No look before this many batches: the normal approximation needs a few.
pub const MIN_UNITS: usize = 8;

/// No look before this many items of a multiple-choice task. An item's choice NLL is a
/// heavier-tailed unit than a window's NLL sum (a window averages dozens of tokens): on
/// the 48-item fixture task, looks at 12 and 24 items stopped up to 1.6 % of equal
/// candidates at alpha = 1 %; on the 400-item task, looks from 25 items stopped 0.3 % to
/// 0.7 % (`worker/tests/race.rs`). A task too small to reach this by half its items is
/// scored whole.
pub const MIN_ITEMS: usize = 25;

/// What a trial races against: sent with its request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Race {
    /// The incumbent's value of every unit of the objective, set after set, each set's
    /// units in scoring order; empty: score everything (the reply's units make the next
    /// incumbent).
    pub incumbent: Vec<f64>,
    /// The normal quantile of each look's bound, `1 - alpha * SPEND[k]` (see the module
    /// docs).
    pub z: [f64; 4],
    /// The objective's normalised weight of each of its sets (one set: `[1.0]`).
    pub weights: Vec<f64>,
    /// Stop a candidate that is not better than the incumbent by more than this, in the
    /// objective's units (nats per token of a text; see the module docs). 0: stop only
    /// one that is worse.
    pub margin: f64,
    /// The leader's scored units, set after set, each set's first `leader_scored[d]` in
    /// scoring order: a trial stopped because it was clearly better than what it raced,
    /// whose estimate is the best value known (see "Leaders" in the module docs). Empty:
    /// no leader, the incumbent is the best known.
    #[serde(default)]
    pub leader: Vec<f64>,
    /// How many of each set's units the leader scored (one entry per set; empty without
    /// a leader).
    #[serde(default)]
    pub leader_scored: Vec<usize>,
    /// This trial's own units already scored, set after set, `own_scored[d]` of set `d`:
    /// a leader's confirmation goes on from where the leader stopped (with
    /// `own_choices` for its tasks). Empty: start from the first unit.
    #[serde(default)]
    pub own: Vec<f64>,
    #[serde(default)]
    pub own_scored: Vec<usize>,
    /// This trial's task items' choice results already scored, as [`Partial::choices`].
    #[serde(default)]
    pub own_choices: Vec<(f64, bool)>,
}

impl Race {
    /// Score everything, keeping every unit's value (the units make an incumbent).
    pub fn whole(weights: Vec<f64>) -> Race {
        Race {
            incumbent: Vec::new(),
            z: [0.0; 4],
            weights,
            margin: 0.0,
            leader: Vec::new(),
            leader_scored: Vec::new(),
            own: Vec::new(),
            own_scored: Vec::new(),
            own_choices: Vec::new(),
        }
    }
}

/// One set of the objective at a look: the first `cand.len()` units' values of the
/// candidate and of the incumbent, of `units` holding `tokens` in all (scored tokens of a
/// text, items of a task: the set's mean is the units' total over `tokens`), and the
/// set's weight in the objective.
#[derive(Clone, Copy, Debug)]
pub struct Stratum<'a> {
    pub cand: &'a [f64],
    pub inc: &'a [f64],
    pub units: usize,
    pub tokens: usize,
    pub weight: f64,
}

/// How far a stopped trial got, and what it showed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    /// Batches scored, of `units` in all.
    pub scored_units: usize,
    pub units: usize,
    /// Estimated difference of the whole set's mean NLL, candidate minus incumbent (a
    /// full evaluation: what the trial's value is estimated from), and its standard
    /// error.
    pub difference: f64,
    pub std_error: f64,
    /// The confidence bounds of the difference from what the trial was tested against
    /// at the look that stopped it: the incumbent, or the leader when `against_leader`.
    /// A trial stopped as not better (`better` false) has `lower_bound` above
    /// `-margin`; one stopped as clearly better has `upper_bound` below zero.
    pub lower_bound: f64,
    #[serde(default)]
    pub upper_bound: f64,
    /// Stopped because it was clearly better (it becomes the leader), not worse.
    #[serde(default)]
    pub better: bool,
    /// The bounds are against the leader, not the incumbent.
    #[serde(default)]
    pub against_leader: bool,
    /// Units scored of each set, in the objective's order (its sum is `scored_units`;
    /// empty in journals written before leaders).
    #[serde(default)]
    pub scored: Vec<usize>,
    /// A leader's tasks: each scored item's choices' (log-likelihood, is greedy), the
    /// task sets one after the other, items in scoring order, each item's choices in
    /// order. What its confirmation goes on from, with the units (an item's value alone
    /// does not give the accuracies). Empty for other stops and for texts. (Always
    /// serialised: the reply travels in bincode, which cannot skip a field.)
    #[serde(default)]
    pub choices: Vec<(f64, bool)>,
}

/// A trial scored whole after racing a leader, against that leader: the difference of the
/// objective, the trial minus the leader, estimated from the leader's units paired with
/// the trial's same units ([`estimate`]), its standard error, and its upper confidence
/// bound at the last look's quantile. The coordinator ends the leader when the upper
/// bound is below zero: the trial, known whole, is then shown better than the leader on
/// the leader's units, as a trial stopped as better than it is at a look; the leader's
/// own estimate (against an incumbent that may be far from it) shows nothing of the kind.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versus {
    pub difference: f64,
    pub std_error: f64,
    pub upper_bound: f64,
}

/// The batch counts at which to look, for `units` batches in all, each with its index in
/// [`LOOKS`] (one text set: [`look_plan`]).
pub fn look_points(units: usize) -> Vec<(usize, usize)> {
    look_plan(&[(units, MIN_UNITS)])
        .into_iter()
        .map(|(n, k)| (n[0], k))
        .collect()
}

/// A set too small to reach its minimum by the last look: scored whole before the first
/// look (exactly known there, it adds no variance).
fn tiny((units, min): (usize, usize)) -> bool {
    units.div_ceil(2) < min
}

/// The looks for an objective of sets of `(units, minimum)` each (the minimum units
/// scored before a set's first look: [`MIN_UNITS`] for a text, [`MIN_ITEMS`] for a task):
/// at each look, how many units of every set are scored, and the look's index in
/// [`LOOKS`]. Each set is sampled at the look's fraction (stratified sampling); a look is
/// taken once every set that is not `tiny` has its minimum. For one set: after 1/16,
/// 1/8, 1/4, 1/2 of its units, from the first with its minimum; none where it is tiny.
pub fn look_plan(sets: &[(usize, usize)]) -> Vec<(Vec<usize>, usize)> {
    if sets.iter().all(|&s| tiny(s)) {
        return Vec::new();
    }
    let mut v: Vec<(Vec<usize>, usize)> = Vec::new();
    for (k, f) in LOOKS.iter().enumerate() {
        let n: Vec<usize> = sets
            .iter()
            .map(|&(u, min)| match tiny((u, min)) {
                true => u,
                false => (f * u as f64).ceil() as usize,
            })
            .collect();
        let ready = sets
            .iter()
            .zip(&n)
            .all(|(&(u, min), &n)| tiny((u, min)) || n >= min);
        if ready && v.last().is_none_or(|(p, _)| *p != n) {
            v.push((n, k));
        }
    }
    v
}

/// The test at a look on one set: `cand` and `inc` are the first `n` batches' NLL sums
/// of the candidate and the incumbent, of `units` batches holding `tokens` scored tokens
/// in all. Some(partial) when the candidate is not better by more than `margin` with
/// confidence (the lower bound is above `-margin`).
pub fn look(
    cand: &[f64],
    inc: &[f64],
    units: usize,
    tokens: usize,
    z: f64,
    margin: f64,
) -> Option<Partial> {
    let s = Stratum {
        cand,
        inc,
        units,
        tokens,
        weight: 1.0,
    };
    look_strata(&[s], z, margin).map(|(p, _)| p)
}

/// The estimate at a look on an objective of several sets, `Σ weight mean`: the
/// difference is the weighted sum of each set's expansion estimate, its variance the
/// weighted sum of theirs (the sets are sampled independently); a set scored whole
/// contributes its exact difference and no variance. Student's t takes the fewest degrees
/// of freedom of the sets still sampled (conservative). None when nothing is left to
/// estimate (every set scored whole) or the units do not fit.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// Estimated difference of the objective, candidate minus what it is paired with.
    pub difference: f64,
    pub std_error: f64,
    /// Each set's estimated difference of its mean.
    pub each: Vec<f64>,
    /// Degrees of freedom of the t quantile.
    pub dof: usize,
}

impl Estimate {
    /// `(lower, upper)` confidence bounds of the difference at normal quantile `z`.
    pub fn bounds(&self, z: f64) -> (f64, f64) {
        // Student's t quantile for `dof` degrees of freedom, from the normal one (the
        // first Cornish-Fisher term: t = z + (z^3 + z) / 4v; 3.07 for 3.09 at z = 2.81,
        // v = 24).
        let v = self.dof as f64;
        let t = z + (z.powi(3) + z) / (4.0 * v);
        (
            self.difference - t * self.std_error,
            self.difference + t * self.std_error,
        )
    }
}

/// See [`Estimate`].
pub fn estimate(sets: &[Stratum]) -> Option<Estimate> {
    let (mut difference, mut var, mut dof) = (0.0, 0.0, usize::MAX);
    let mut each = Vec::with_capacity(sets.len());
    for s in sets {
        let n = s.cand.len();
        if n == 0 || n > s.units || s.inc.len() < n || s.tokens == 0 {
            return None;
        }
        let d: Vec<f64> = s.cand.iter().zip(s.inc).map(|(c, i)| c - i).collect();
        let mean = d.iter().sum::<f64>() / n as f64;
        let scale = s.units as f64 / s.tokens as f64;
        each.push(scale * mean);
        difference += s.weight * scale * mean;
        if n < s.units {
            if n < 2 {
                return None;
            }
            let v = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            var += (s.weight * scale).powi(2) * v * (1.0 - n as f64 / s.units as f64) / n as f64;
            dof = dof.min(n - 1);
        }
    }
    if dof == usize::MAX {
        return None; // everything scored: nothing left to stop
    }
    Some(Estimate {
        difference,
        std_error: var.sqrt(),
        each,
        dof,
    })
}

/// The test at a look against the incumbent alone (no leader): Some((partial, each set's
/// estimated difference of its mean)) when the candidate is not better than the
/// incumbent by more than `margin` with confidence. See [`decide`] for the whole rule.
pub fn look_strata(sets: &[Stratum], z: f64, margin: f64) -> Option<(Partial, Vec<f64>)> {
    decide(sets, None, false, z, margin).filter(|(p, _)| !p.better)
}

/// The decision at a look. `inc` pairs the candidate with the incumbent (the best full
/// evaluation); `leader` with the leader where there is one and it scored at least the
/// units scored so far (`has_leader` says whether there is one at all).
///
/// - Tested against the leader where it can be, else against the incumbent: stop as
///   *not better* when the lower bound of the difference is above `-margin`.
/// - Stop as *better* when the upper bound is below zero: against the leader, or
///   against the incumbent when there is no leader. Beyond the leader's units a
///   candidate cannot be shown better than the best known, so it goes on.
///
/// A stop's value is always estimated against the incumbent, which is known on every
/// unit (`incumbent + difference`, variance `std_error^2`). Some((partial, each set's
/// estimated difference of its mean from the incumbent's)) when the trial stops.
pub fn decide(
    inc: &[Stratum],
    leader: Option<&[Stratum]>,
    has_leader: bool,
    z: f64,
    margin: f64,
) -> Option<(Partial, Vec<f64>)> {
    let e = estimate(inc)?;
    let (against, against_leader) = match leader {
        Some(l) => (estimate(l)?, true),
        None => (e.clone(), false),
    };
    let (lower, upper) = against.bounds(z);
    let better = if lower > -margin && lower.is_finite() {
        false
    } else if upper < 0.0 && (against_leader || !has_leader) {
        true
    } else {
        return None;
    };
    Some((
        Partial {
            scored_units: inc.iter().map(|s| s.cand.len()).sum(),
            units: inc.iter().map(|s| s.units).sum(),
            difference: e.difference,
            std_error: e.std_error,
            lower_bound: lower,
            upper_bound: upper,
            better,
            against_leader,
            scored: inc.iter().map(|s| s.cand.len()).collect(),
            choices: Vec::new(),
        },
        e.each,
    ))
}

/// See [`Versus`]: `sets` pair the trial's first units of each set with the leader's
/// (as many as it scored), `z` the normal quantile of the bound (the last look's). None
/// where the leader's units leave nothing to estimate.
pub fn versus(sets: &[Stratum], z: f64) -> Option<Versus> {
    estimate(sets).map(|e| Versus {
        difference: e.difference,
        std_error: e.std_error,
        upper_bound: e.bounds(z).1,
    })
}

/// The seed of objective set `d`'s order in a run seeded `seed`: `seed` itself for the
/// first set (so a run of one set keeps its order), a different stream for each other.
pub fn set_seed(seed: u64, d: usize) -> u64 {
    seed ^ (d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A permutation of `0..n` from `seed`: Fisher-Yates driven by splitmix64, written out
/// here so that the order (and so every raced value) never changes with a dependency.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_start_at_min_units_and_stop_before_the_end() {
        assert_eq!(look_points(400), vec![(25, 0), (50, 1), (100, 2), (200, 3)]);
        assert_eq!(look_points(64), vec![(8, 1), (16, 2), (32, 3)]);
        assert!(look_points(10).is_empty());
    }

    #[test]
    fn the_permutation_is_fixed_by_its_seed() {
        let p = permutation(1000, 7);
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_eq!(p, permutation(1000, 7));
        assert_ne!(p, permutation(1000, 8));
        // Pinned: a change here changes every raced run's values.
        assert_eq!(&permutation(10, 0), &[6, 3, 2, 9, 8, 1, 4, 7, 0, 5]);
    }

    /// 100 batches of 100 tokens: the incumbent's sums vary, the candidate's are 0.05
    /// nats per token worse with a little noise.
    fn worse_by_a_twentieth() -> (Vec<f64>, Vec<f64>) {
        let inc: Vec<f64> = (0..100).map(|i| 300.0 + (i % 7) as f64 * 20.0).collect();
        let worse = inc
            .iter()
            .enumerate()
            .map(|(i, x)| x + 5.0 + ((i * 37) % 11) as f64 * 0.2 - 1.0)
            .collect();
        (inc, worse)
    }

    #[test]
    fn a_clearly_worse_candidate_stops_and_an_equal_one_does_not() {
        let (inc, worse) = worse_by_a_twentieth();
        let p = look(&worse[..16], &inc[..16], 100, 10_000, 2.8, 0.0).expect("stopped");
        assert!((p.difference - 0.05).abs() < 0.01, "{p:?}");
        assert!(p.lower_bound > 0.0 && p.lower_bound < p.difference);
        assert!(look(&inc[..16], &inc[..16], 100, 10_000, 2.8, 0.0).is_none());
        let better: Vec<f64> = worse.iter().zip(&inc).map(|(w, i)| 2.0 * i - w).collect();
        assert!(look(&better[..50], &inc[..50], 100, 10_000, 2.8, 0.0).is_none());
    }

    #[test]
    fn a_margin_is_the_margin_free_test_on_differences_shifted_by_it() {
        // The candidate is 0.01 nats per token better than the incumbent: never stopped
        // without a margin, stopped with one of 0.02 (it cannot be 0.02 better), not with
        // one of 0.005.
        let (inc, worse) = worse_by_a_twentieth();
        let better: Vec<f64> = worse.iter().map(|w| w - 6.0).collect();
        assert!(look(&better[..50], &inc[..50], 100, 10_000, 2.8, 0.0).is_none());
        assert!(look(&better[..50], &inc[..50], 100, 10_000, 2.8, 0.005).is_none());
        let p = look(&better[..50], &inc[..50], 100, 10_000, 2.8, 0.02).expect("stopped");
        assert!((p.difference + 0.01).abs() < 0.002, "{p:?}");
        // Shifting the candidate by the margin (0.02 nats per token, 2 per batch of 100
        // tokens) gives the margin-free test the same bound, 0.02 higher.
        let shifted: Vec<f64> = better.iter().map(|x| x + 2.0).collect();
        let q = look(&shifted[..50], &inc[..50], 100, 10_000, 2.8, 0.0).expect("stopped");
        assert!((q.lower_bound - (p.lower_bound + 0.02)).abs() < 1e-12);
        assert!((q.std_error - p.std_error).abs() < 1e-12);
    }

    fn one<'a>(cand: &'a [f64], inc: &'a [f64]) -> [Stratum<'a>; 1] {
        [Stratum {
            cand,
            inc,
            units: 100,
            tokens: 10_000,
            weight: 1.0,
        }]
    }

    #[test]
    fn a_clearly_better_candidate_stops_as_the_leader_and_is_tested_against_it() {
        let (inc, worse) = worse_by_a_twentieth();
        // 0.05 nats per token better than the incumbent, no leader: stopped as better,
        // its estimate against the incumbent.
        let better: Vec<f64> = worse.iter().zip(&inc).map(|(w, i)| 2.0 * i - w).collect();
        let (p, each) =
            decide(&one(&better[..16], &inc[..16]), None, false, 2.8, 0.0).expect("stopped");
        assert!(
            p.better && !p.against_leader && p.upper_bound < 0.0,
            "{p:?}"
        );
        assert!((p.difference + 0.05).abs() < 0.01 && each[0] == p.difference);
        assert_eq!((p.scored, p.scored_units), (vec![16], 16));
        // The same candidate with a leader it cannot be paired with (the look is beyond
        // the leader's units): not stopped, since it cannot be shown better than the
        // leader; a worse one still is, against the incumbent.
        assert!(decide(&one(&better[..16], &inc[..16]), None, true, 2.8, 0.0).is_none());
        let (p, _) = decide(&one(&worse[..16], &inc[..16]), None, true, 2.8, 0.0).unwrap();
        assert!(!p.better && !p.against_leader);
        // Paired with the leader (`better` itself): a candidate between the two is stopped
        // as not better than the leader, though better than the incumbent, with its value
        // estimated against the incumbent; one better than the leader becomes the next.
        let between: Vec<f64> = inc
            .iter()
            .zip(&better)
            .map(|(i, b)| (i + b) / 2.0)
            .collect();
        let (p, _) = decide(
            &one(&between[..16], &inc[..16]),
            Some(&one(&between[..16], &better[..16])),
            true,
            2.8,
            0.0,
        )
        .expect("stopped");
        assert!(
            !p.better && p.against_leader && p.lower_bound > 0.0,
            "{p:?}"
        );
        assert!((p.difference + 0.025).abs() < 0.01, "{p:?}");
        let best: Vec<f64> = better.iter().zip(&inc).map(|(b, i)| 2.0 * b - i).collect();
        let (p, _) = decide(
            &one(&best[..16], &inc[..16]),
            Some(&one(&best[..16], &better[..16])),
            true,
            2.8,
            0.0,
        )
        .expect("stopped");
        assert!(p.better && p.against_leader && p.upper_bound < 0.0);
        assert!((p.difference + 0.1).abs() < 0.02, "{p:?}");
        // The incumbent-only test (`look_strata`) never reports a stop as better.
        assert!(look(&better[..16], &inc[..16], 100, 10_000, 2.8, 0.0).is_none());
    }

    #[test]
    fn a_mixture_looks_when_every_sampled_set_has_min_units() {
        // A tiny set (10 units) is scored whole from the first look.
        let text = |u| (u, MIN_UNITS);
        assert_eq!(
            look_plan(&[text(400), text(10)]),
            vec![
                (vec![25, 10], 0),
                (vec![50, 10], 1),
                (vec![100, 10], 2),
                (vec![200, 10], 3)
            ]
        );
        // 64 units reach MIN_UNITS at 1/8: no look before.
        assert_eq!(look_plan(&[text(400), text(64)])[0], (vec![50, 8], 1));
        assert!(look_plan(&[text(10), text(12)]).is_empty());
        // A task's items: no look before MIN_ITEMS; 48 items are scored whole.
        assert_eq!(look_plan(&[(400, MIN_ITEMS)])[0], (vec![25], 0));
        assert_eq!(
            look_plan(&[(100, MIN_ITEMS)]),
            vec![(vec![25], 2), (vec![50], 3)]
        );
        assert_eq!(
            look_plan(&[text(400), (48, MIN_ITEMS)])[0],
            (vec![25, 48], 0)
        );
    }

    #[test]
    fn a_mixture_estimate_weights_each_set_and_a_whole_set_adds_no_variance() {
        let (inc, worse) = worse_by_a_twentieth();
        // A task of 10 items scored whole, each item 0.3 nats worse.
        let task_inc = [1.0f64; 10];
        let task_cand = [1.3f64; 10];
        let text = Stratum {
            cand: &worse[..16],
            inc: &inc[..16],
            units: 100,
            tokens: 10_000,
            weight: 0.75,
        };
        let task = Stratum {
            cand: &task_cand,
            inc: &task_inc,
            units: 10,
            tokens: 10,
            weight: 0.25,
        };
        let one = look(&worse[..16], &inc[..16], 100, 10_000, 2.8, 0.0).unwrap();
        let (p, each) = look_strata(&[text, task], 2.8, 0.0).expect("stopped");
        assert!((each[1] - 0.3).abs() < 1e-12 && (each[0] - one.difference).abs() < 1e-12);
        assert!((p.difference - (0.75 * one.difference + 0.25 * 0.3)).abs() < 1e-12);
        assert!((p.std_error - 0.75 * one.std_error).abs() < 1e-12);
        assert_eq!((p.scored_units, p.units), (26, 110));
        // All scored: nothing to decide.
        let whole = Stratum {
            cand: &worse,
            inc: &inc,
            units: 100,
            tokens: 10_000,
            weight: 1.0,
        };
        assert!(look_strata(&[whole], 2.8, 0.0).is_none());
    }
}
