//! The trials of a search that are not finished, and the policy that decides who runs
//! them: plain synchronous state with no I/O, so every rule is unit-tested here. The
//! scheduler (`scheduler.rs`) owns the connections and the journal and asks this module
//! what to do.
//!
//! Policy:
//! - a trial that failed on a worker goes back to the queue, and goes first to a worker
//!   that has not tried it;
//! - a queued trial every live worker has tried runs again anyway (a deterministic
//!   failure then reaches `max_attempts` instead of waiting for a new worker forever);
//! - after `max_attempts` failed attempts a trial is failed for good, and at once after
//!   a deterministic failure (the same weights give the same result on any worker: a
//!   non-finite objective), which another attempt would only repeat;
//! - failed trials in a row are counted ([`Trials::failed_in_row`]): the scheduler stops
//!   a run whose trials keep failing instead of proposing forever;
//! - ids are never reused: a resumed run continues after the journal's last id, and
//!   trials that were in flight keep their ids and their failed attempts.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// A trial issued but not finished.
#[derive(Clone, Debug)]
pub struct Trial {
    /// The optimiser's point (unit cube).
    pub u: Vec<f64>,
    /// The merge weights of `u` (flat; per group laid end to end).
    pub weights: Vec<f64>,
    /// (worker, error) of failed attempts.
    pub errors: Vec<(String, String)>,
    /// When the current attempt started.
    pub issued_at: Option<Instant>,
    /// The leader (its trial id) the current attempt was raced against, where it was
    /// sent one (`search.early_stop`).
    pub raced: Option<u64>,
}

impl Trial {
    fn tried_by(&self, worker: &str) -> bool {
        self.errors.iter().any(|(w, _)| w == worker)
    }
}

/// What became of a trial after a failed attempt.
#[derive(Debug)]
pub enum AfterFailure {
    /// Back in the queue for another attempt.
    Requeued,
    /// Failed `max_attempts` times: removed, with every attempt's error.
    Failed(Trial),
}

/// The unfinished trials: in flight or queued for another attempt.
#[derive(Debug)]
pub struct Trials {
    trials: BTreeMap<u64, Trial>,
    queue: VecDeque<u64>,
    next_id: u64,
    max_attempts: usize,
    failed_in_row: usize,
}

/// Whether another attempt of a failed trial could turn out differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The worker, its connection or its resources failed: worth another attempt.
    Transient,
    /// The result itself is bad (a non-finite objective): any worker would repeat it.
    Deterministic,
}

impl Trials {
    /// Trials numbered from `next_id`, each given up after `max_attempts` failures.
    pub fn new(next_id: u64, max_attempts: usize) -> Trials {
        Trials {
            trials: BTreeMap::new(),
            queue: VecDeque::new(),
            next_id,
            max_attempts: max_attempts.max(1),
            failed_in_row: 0,
        }
    }

    /// Queues a trial of an earlier session (in flight when it stopped) under its id.
    pub fn requeue(
        &mut self,
        id: u64,
        u: Vec<f64>,
        weights: Vec<f64>,
        errors: Vec<(String, String)>,
    ) {
        self.trials.insert(
            id,
            Trial {
                u,
                weights,
                errors,
                issued_at: None,
                raced: None,
            },
        );
        self.queue.push_back(id);
        self.next_id = self.next_id.max(id + 1);
    }

    /// A queued trial for `worker`: the first it has not tried, else the head of the
    /// queue when no other live worker (`live`, which may include `worker`) could take it.
    pub fn pick_queued(&mut self, worker: &str, live: &[&str]) -> Option<u64> {
        if let Some(pos) = self
            .queue
            .iter()
            .position(|t| !self.trials[t].tried_by(worker))
        {
            return self.queue.remove(pos);
        }
        let &head = self.queue.front()?;
        let others = live.iter().any(|w| !self.trials[&head].tried_by(w));
        if others {
            None
        } else {
            self.queue.pop_front()
        }
    }

    /// A new trial at `u` with `weights`; returns its id.
    pub fn add(&mut self, u: Vec<f64>, weights: Vec<f64>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.trials.insert(
            id,
            Trial {
                u,
                weights,
                errors: Vec::new(),
                issued_at: None,
                raced: None,
            },
        );
        id
    }

    /// Starts an attempt of trial `id`; its number is `errors.len() + 1`.
    pub fn start(&mut self, id: u64) -> &mut Trial {
        let t = self.trials.get_mut(&id).expect("a picked trial is known");
        t.issued_at = Some(Instant::now());
        t
    }

    /// Trial `id` (running, so not queued) succeeded: it leaves the set.
    pub fn succeeded(&mut self, id: u64) -> Trial {
        self.failed_in_row = 0;
        self.trials.remove(&id).expect("a running trial is known")
    }

    /// Trials failed for good since the last success (of this session).
    pub fn failed_in_row(&self) -> usize {
        self.failed_in_row
    }

    /// An attempt of trial `id` on `worker` failed with `error`.
    pub fn attempt_failed(
        &mut self,
        id: u64,
        worker: String,
        error: String,
        kind: Failure,
    ) -> AfterFailure {
        let t = self.trials.get_mut(&id).expect("a running trial is known");
        t.errors.push((worker, error));
        t.issued_at = None;
        if t.errors.len() >= self.max_attempts || kind == Failure::Deterministic {
            self.failed_in_row += 1;
            AfterFailure::Failed(self.trials.remove(&id).expect("present"))
        } else {
            self.queue.push_back(id);
            AfterFailure::Requeued
        }
    }

    /// The points of every unfinished trial, in id order (a new proposal is conditioned
    /// on them).
    pub fn pending_points(&self) -> Vec<Vec<f64>> {
        self.trials.values().map(|t| t.u.clone()).collect()
    }

    /// Unfinished trials, in flight or queued.
    pub fn len(&self) -> usize {
        self.trials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trials.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(w: &str) -> (String, String) {
        (w.to_string(), "boom".to_string())
    }

    #[test]
    fn a_failed_trial_goes_first_to_a_worker_that_has_not_tried_it() {
        let mut t = Trials::new(0, 3);
        let a = t.add(vec![0.1], vec![0.9, 0.1]);
        let b = t.add(vec![0.2], vec![0.8, 0.2]);
        assert!(matches!(
            t.attempt_failed(a, "w1".into(), "lost".into(), Failure::Transient),
            AfterFailure::Requeued
        ));
        // w1 tried it; w2 is live and has not: w1 gets nothing from the queue.
        assert_eq!(t.pick_queued("w1", &["w1", "w2"]), None);
        assert_eq!(t.pick_queued("w2", &["w1", "w2"]), Some(a));
        assert_eq!(t.start(a).errors.len() + 1, 2, "the second attempt");
        assert_eq!(t.succeeded(a).weights, vec![0.9, 0.1]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.pending_points(), vec![vec![0.2]]);
        let _ = b;
    }

    #[test]
    fn a_trial_every_live_worker_has_tried_runs_again_until_max_attempts() {
        let mut t = Trials::new(0, 2);
        let a = t.add(vec![0.5], vec![0.5, 0.5]);
        t.attempt_failed(a, "w1".into(), "NaN".into(), Failure::Transient);
        // The only live worker tried it: it runs there again rather than never.
        assert_eq!(t.pick_queued("w1", &["w1"]), Some(a));
        match t.attempt_failed(a, "w1".into(), "NaN".into(), Failure::Transient) {
            AfterFailure::Failed(trial) => {
                assert_eq!(trial.errors.len(), 2);
                assert_eq!(trial.u, vec![0.5]);
            }
            AfterFailure::Requeued => panic!("two attempts of two allowed: failed for good"),
        }
        assert!(t.is_empty());
        assert_eq!(t.pick_queued("w1", &["w1"]), None);
    }

    #[test]
    fn a_resumed_run_keeps_ids_and_attempts_and_never_reuses_an_id() {
        let mut t = Trials::new(5, 2);
        t.requeue(3, vec![0.3], vec![0.7, 0.3], vec![err("w9")]);
        assert_eq!(t.pick_queued("w9", &["w9", "w1"]), None);
        assert_eq!(t.pick_queued("w1", &["w9", "w1"]), Some(3));
        assert_eq!(t.add(vec![0.4], vec![0.6, 0.4]), 5);
        // A requeued id past next_id moves next_id on.
        let mut u = Trials::new(0, 2);
        u.requeue(7, vec![0.1], vec![0.9, 0.1], Vec::new());
        assert_eq!(u.add(vec![0.2], vec![0.8, 0.2]), 8);
        // One failure of the resumed trial's two allowed attempts is already spent.
        assert!(matches!(
            t.attempt_failed(3, "w1".into(), "x".into(), Failure::Transient),
            AfterFailure::Failed(_)
        ));
    }

    #[test]
    fn a_deterministic_failure_is_not_retried_and_failures_in_a_row_are_counted() {
        let mut t = Trials::new(0, 3);
        let a = t.add(vec![0.1], vec![0.9, 0.1]);
        let b = t.add(vec![0.2], vec![0.8, 0.2]);
        let c = t.add(vec![0.3], vec![0.7, 0.3]);
        let d = t.add(vec![0.4], vec![0.6, 0.4]);
        let nan = || "the objective is NaN".to_string();
        // Three attempts allowed, but another worker would only compute the NaN again.
        match t.attempt_failed(a, "w1".into(), nan(), Failure::Deterministic) {
            AfterFailure::Failed(trial) => assert_eq!(trial.errors.len(), 1),
            AfterFailure::Requeued => panic!("a deterministic failure was requeued"),
        }
        assert_eq!(t.failed_in_row(), 1);
        // A transient failure that is requeued is not a failed trial.
        t.attempt_failed(b, "w1".into(), "lost".into(), Failure::Transient);
        assert_eq!(t.failed_in_row(), 1);
        t.attempt_failed(c, "w1".into(), nan(), Failure::Deterministic);
        assert_eq!(t.failed_in_row(), 2);
        t.succeeded(d);
        assert_eq!(t.failed_in_row(), 0, "a success ends the row");
    }

    #[test]
    fn max_attempts_of_zero_still_makes_one_attempt() {
        let mut t = Trials::new(0, 0);
        let a = t.add(vec![0.0], vec![1.0, 0.0]);
        assert!(matches!(
            t.attempt_failed(a, "w".into(), "e".into(), Failure::Transient),
            AfterFailure::Failed(_)
        ));
    }
}
