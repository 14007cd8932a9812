//! The `--json` summaries of `ckmerge merge` and `ckmerge search`: one JSON object on
//! standard output when the command ends (logs go to standard error), for the scripts
//! around a run.
//!
//! The field names are a stable interface, listed in README.md ("Machine-readable
//! output"): fields may be added within a `schema_version`, none is renamed, removed or
//! changes meaning without raising it. The structs below are the whole definition; they
//! hold plain values so that what is promised is visible in one place, not spread over
//! the report's internals.

use std::path::PathBuf;

use ckmerge_common::protocol::DatasetScore;
use serde::Serialize;

use crate::search::journal::Record;
use crate::search::report::{Improvement, ReferenceKind};
use crate::search::SearchOutcome;

/// The version of the `--json` summaries and of `report.json`.
pub const SCHEMA_VERSION: u32 = 1;

/// `ckmerge merge --json`.
#[derive(Debug, Serialize)]
pub struct MergeSummaryJson {
    pub schema_version: u32,
    /// The model directory (for `--part`, the directory the parts share beside it).
    pub out: PathBuf,
    /// False for a `--part` run: the model is not in place until `--finish-parts`.
    pub complete: bool,
    /// `{"index": I, "count": N}` for `--part I/N`, else null.
    pub part: Option<PartJson>,
    /// The source directories, in the order of `weights`.
    pub checkpoints: Vec<PathBuf>,
    /// As the merge applied them (f32, as the kernels do).
    pub weights: Vec<f32>,
    pub tensors: usize,
    pub shards: usize,
    /// Tensor data read from the sources and written (the shards' headers not counted).
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct PartJson {
    pub index: usize,
    pub count: usize,
}

/// `ckmerge search --json`.
#[derive(Debug, Serialize)]
pub struct SearchSummaryJson {
    pub schema_version: u32,
    pub run_dir: PathBuf,
    pub report_json: PathBuf,
    pub report_md: PathBuf,
    /// The best weights' model (`RUN_DIR/merged`), null when `output.merge = false` or
    /// no trial completed.
    pub merged_model: Option<PathBuf>,
    pub checkpoints: Vec<PathBuf>,
    /// Why the run stopped, in words for a person (as report.json): match on
    /// `evaluations` and `failed`, not on this text.
    pub stop_reason: String,
    /// Completed evaluations of the search (the baselines are not counted).
    pub evaluations: usize,
    pub failed: usize,
    pub wall_seconds: f64,
    /// The best completed trial, scored on every data set; null when none completed.
    pub best: Option<BestJson>,
    /// The points the best is compared with, scored by the same workers: each source,
    /// the uniform average and, with three or more checkpoints, the averages along the
    /// run (EMA, WMA, last-k windows, minus-sqrt).
    pub baselines: Vec<BaselineJson>,
    /// Per data set: the best against the best source, the uniform average and the best
    /// average along the run.
    pub improvement: Vec<Improvement>,
}

#[derive(Debug, Serialize)]
pub struct BestJson {
    pub trial: u64,
    /// One weight per checkpoint (per group and checkpoint for a group search).
    pub weights: Vec<f64>,
    /// The objective's value: the mean held-out NLL of `data.objective`'s files, or the
    /// weighted mean of its sets' values (a task's is its choice NLL; README "Search
    /// objectives").
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Every data set, the objective's first; a task's with its `task` accuracies.
    pub scores: Vec<DatasetScore>,
}

#[derive(Debug, Serialize)]
pub struct BaselineJson {
    /// `source`, `uniform` or `average`.
    pub kind: &'static str,
    pub label: String,
    pub weights: Vec<f64>,
    /// The objective's value at these weights; null where it is not finite.
    pub objective: Option<f64>,
    pub scores: Vec<DatasetScore>,
}

impl SearchSummaryJson {
    pub fn new(outcome: &SearchOutcome) -> SearchSummaryJson {
        let r = &outcome.report;
        let best_scores = r
            .references
            .iter()
            .find(|x| x.kind == ReferenceKind::BestFound)
            .map(|x| x.scores.clone());
        let best = match &r.best {
            Some(Record::Done {
                trial,
                weights,
                mean_nll,
                perplexity,
                ..
            }) => Some(BestJson {
                trial: *trial,
                weights: weights.clone(),
                mean_nll: *mean_nll,
                perplexity: *perplexity,
                scores: best_scores.unwrap_or_default(),
            }),
            _ => None,
        };
        let baselines = r
            .references
            .iter()
            .filter_map(|x| {
                let kind = match x.kind {
                    ReferenceKind::Source(_) => "source",
                    ReferenceKind::Uniform => "uniform",
                    ReferenceKind::Average => "average",
                    ReferenceKind::BestFound => return None,
                };
                Some(BaselineJson {
                    kind,
                    label: x.label.clone(),
                    weights: x.weights.clone(),
                    objective: x.objective,
                    scores: x.scores.clone(),
                })
            })
            .collect();
        SearchSummaryJson {
            schema_version: SCHEMA_VERSION,
            run_dir: outcome.run_dir.clone(),
            report_json: outcome.run_dir.join("report.json"),
            report_md: outcome.run_dir.join("report.md"),
            merged_model: r.merged_model.clone(),
            checkpoints: r.checkpoints.clone(),
            stop_reason: r.stop_reason.clone(),
            evaluations: r.evaluations,
            failed: r.failed,
            wall_seconds: r.wall_seconds,
            best,
            baselines,
            improvement: r.improvement.clone(),
        }
    }
}
