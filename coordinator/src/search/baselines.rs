//! The baselines of a run over three or more checkpoints: each checkpoint and the averages
//! practitioners would otherwise take (`report::trajectory_averages`), scored by the run's
//! own workers on every data set before the search starts. They serve twice: the report
//! compares the best found with each of them, and those that are points of the search
//! space are the optimiser's first observations (`Optimizer::tell_prior`), so a search
//! over a simplex or a family starts from everything the baselines showed.
//!
//! Their scores are kept in `RUN_DIR/baselines.json` once all are in; a resume of the same
//! run (the fingerprint guarantees the same inputs) reads them instead of scoring again.

use std::path::Path;

use anyhow::Result;
use ckmerge_common::protocol::DatasetScore;
use serde::{Deserialize, Serialize};

use super::report::{self, Reference, ReferencePoint};
use super::scheduler::Scheduler;
use crate::bo::Optimizer;

pub const BASELINES_FILE: &str = "baselines.json";

#[derive(Serialize, Deserialize)]
struct Stored {
    label: String,
    weights: Vec<f64>,
    scores: Vec<DatasetScore>,
    /// Under early stopping: the value of each of the objective's units, in scoring
    /// order (see the journal's `units`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    units: Vec<f64>,
}

/// The baselines' objective values and per-batch sums, for the scheduler to race against.
fn race_units(refs: &[Reference], units: Vec<Vec<f64>>) -> Vec<(f64, Vec<f64>)> {
    refs.iter()
        .zip(units)
        .filter_map(|(r, u)| Some((r.objective?, u)).filter(|(_, u)| !u.is_empty()))
        .collect()
}

/// The baselines' points for `labels` (sources in order) in the scheduler's space.
fn points(sched: &Scheduler, labels: &[String]) -> Vec<ReferencePoint> {
    report::reference_points(&sched.opt.space, labels, None)
}

/// Scores the baselines, or reads them from an earlier session of the run.
pub async fn score(
    sched: &mut Scheduler,
    labels: &[String],
    run_dir: &Path,
) -> Result<Vec<Reference>> {
    let pts = points(sched, labels);
    let path = run_dir.join(BASELINES_FILE);
    if let Some(stored) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Stored>>(&b).ok())
    {
        let same = stored.len() == pts.len()
            && stored
                .iter()
                .zip(&pts)
                .all(|(s, p)| s.label == p.label && s.weights == p.weights);
        if same {
            tracing::info!("baselines: read from {}", path.display());
            let units: Vec<Vec<f64>> = stored.iter().map(|s| s.units.clone()).collect();
            let refs: Vec<Reference> = pts
                .into_iter()
                .zip(stored)
                .map(|(p, s)| Reference::new(p, s.scores, sched.objective()))
                .collect();
            sched.set_baseline_units(race_units(&refs, units));
            return Ok(refs);
        }
        tracing::warn!(
            "{} does not match this run's baselines: scoring them again",
            path.display()
        );
    }
    tracing::info!(
        "scoring {} baselines (each checkpoint and the averages along the run) before the search",
        pts.len()
    );
    let replies = sched
        .score_points(&pts.iter().map(|p| p.weights.clone()).collect::<Vec<_>>())
        .await?;
    let units: Vec<Vec<f64>> = replies.iter().map(|r| r.units.clone()).collect();
    let refs: Vec<Reference> = pts
        .into_iter()
        .zip(replies)
        .map(|(p, r)| Reference::new(p, r.scores, sched.objective()))
        .collect();
    let stored: Vec<Stored> = refs
        .iter()
        .zip(&units)
        .map(|(r, u)| Stored {
            label: r.label.clone(),
            weights: r.weights.clone(),
            scores: r.scores.clone(),
            units: u.clone(),
        })
        .collect();
    sched.set_baseline_units(race_units(&refs, units));
    super::write_atomic(
        &path,
        (serde_json::to_string_pretty(&stored).expect("serialises") + "\n").as_bytes(),
    )?;
    if let Some((best, v)) = refs
        .iter()
        .filter_map(|r| r.objective.map(|v| (r, v)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
    {
        tracing::info!(
            "best baseline: {} (objective {v:.6}, its exp {:.4})",
            best.label,
            v.exp()
        );
    }
    Ok(refs)
}

/// Gives the optimiser every baseline that is a point of its space, with its objective
/// value; none when it already has them (a resumed snapshot). A baseline whose objective
/// is not finite is not told: a trial there would fail, and a failure is not a value.
pub fn tell(opt: &mut Optimizer, refs: &[Reference]) -> usize {
    if !opt.priors.is_empty() {
        return 0;
    }
    let mut told = 0;
    for r in refs {
        let Some(v) = r.objective else {
            continue;
        };
        if let Some(u) = opt.space.point_of(&r.weights) {
            opt.tell_prior(u, v);
            told += 1;
        }
    }
    told
}
