//! The search report: `report.json` (everything, machine-readable), `report.md` (a summary
//! table a person reads at a glance, then every trial) and the plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ckmerge_common::protocol::DatasetScore;
use serde::Serialize;

use super::config::{ModelSummary, SearchConfig, SpaceConfig};
use super::journal::Record;
use super::scheduler::{Scheduler, WorkerSummary};
use crate::bo::{Optimizer, SearchSpace};

/// A reference point of the summary table, scored on every data set.
#[derive(Clone, Debug, Serialize)]
pub struct Reference {
    pub label: String,
    pub weights: Vec<f64>,
    pub scores: Vec<DatasetScore>,
}

/// How the best merge compares with the references on one data set.
#[derive(Clone, Debug, Serialize)]
pub struct Improvement {
    pub dataset: String,
    pub best_perplexity: f64,
    pub best_source: String,
    pub best_source_perplexity: f64,
    /// Relative change of perplexity, in percent (negative: the merge is better).
    pub change_vs_best_source_pct: f64,
    pub uniform_perplexity: f64,
    pub change_vs_uniform_pct: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checkpoints: Vec<PathBuf>,
    pub space: SpaceConfig,
    pub model: ModelSummary,
    pub stop_reason: String,
    pub wall_seconds: f64,
    pub evaluations: usize,
    pub failed: usize,
    pub best: Option<Record>,
    pub references: Vec<Reference>,
    pub improvement: Vec<Improvement>,
    pub trials: Vec<Record>,
    pub workers: Vec<WorkerSummary>,
    pub merged_model: Option<PathBuf>,
}

const BEST_LABEL: &str = "best found";
const UNIFORM_LABEL: &str = "uniform average";

pub fn best_done(done: &[Record]) -> Option<&Record> {
    done.iter()
        .filter(|r| matches!(r, Record::Done { .. }))
        .min_by(|a, b| match (a, b) {
            (Record::Done { mean_nll: x, .. }, Record::Done { mean_nll: y, .. }) => x.total_cmp(y),
            _ => std::cmp::Ordering::Equal,
        })
}

fn checkpoint_label(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Each source alone, the uniform average and the best weights, as weight vectors of the
/// search space (per group for a group search).
pub fn reference_points(s: &Scheduler) -> Vec<(String, Vec<f64>)> {
    let space = &s.opt.space;
    let cfg_n = space.n_weights();
    let (groups, n) = match space {
        SearchSpace::Grouped { groups, n } => (*groups, *n),
        _ => (1, cfg_n),
    };
    let tile = |w: Vec<f64>| -> Vec<f64> { (0..groups).flat_map(|_| w.clone()).collect() };
    let mut out: Vec<(String, Vec<f64>)> = (0..n)
        .map(|i| {
            let w: Vec<f64> = (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect();
            (s.checkpoint_label(i), tile(w))
        })
        .collect();
    out.push((UNIFORM_LABEL.into(), tile(vec![1.0 / n as f64; n])));
    if let Some(Record::Done { weights, .. }) = best_done(&s.done) {
        out.push((BEST_LABEL.into(), weights.clone()));
    }
    out
}

impl Scheduler {
    pub fn checkpoint_label(&self, i: usize) -> String {
        self.checkpoints()
            .get(i)
            .map(|p| checkpoint_label(p))
            .unwrap_or_else(|| format!("checkpoint {i}"))
    }
}

fn pct(a: f64, b: f64) -> f64 {
    (a - b) / b * 100.0
}

impl Report {
    pub fn build(
        cfg: &SearchConfig,
        model: &ModelSummary,
        s: &Scheduler,
        references: Vec<Reference>,
        stop_reason: String,
        merged_model: Option<PathBuf>,
        wall_seconds: f64,
    ) -> Report {
        let n = cfg.checkpoints.len();
        let mut improvement = Vec::new();
        if let Some(best) = references.iter().find(|r| r.label == BEST_LABEL) {
            for (d, score) in best.scores.iter().enumerate() {
                let src = references[..n]
                    .iter()
                    .min_by(|a, b| a.scores[d].perplexity.total_cmp(&b.scores[d].perplexity))
                    .expect("at least one source");
                let uni = &references[n];
                improvement.push(Improvement {
                    dataset: score.name.clone(),
                    best_perplexity: score.perplexity,
                    best_source: src.label.clone(),
                    best_source_perplexity: src.scores[d].perplexity,
                    change_vs_best_source_pct: pct(score.perplexity, src.scores[d].perplexity),
                    uniform_perplexity: uni.scores[d].perplexity,
                    change_vs_uniform_pct: pct(score.perplexity, uni.scores[d].perplexity),
                });
            }
        }
        let mut trials: Vec<Record> = s.done.iter().chain(&s.failed).cloned().collect();
        trials.sort_by_key(Record::trial);
        Report {
            checkpoints: cfg.checkpoints.clone(),
            space: cfg.space.clone(),
            model: model.clone(),
            stop_reason,
            wall_seconds,
            evaluations: s.done.len(),
            failed: s.failed.len(),
            best: best_done(&s.done).cloned(),
            references,
            improvement,
            trials,
            workers: s.worker_summaries(),
            merged_model,
        }
    }

    pub fn write(&self, run_dir: &Path, opt: &Optimizer, plots: bool) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("the report serialises") + "\n";
        super::write_atomic(&run_dir.join("report.json"), json.as_bytes())?;
        let mut images = Vec::new();
        if plots {
            match super::plots::draw_all(run_dir, self, opt) {
                Ok(v) => images = v,
                // A report without pictures is still a report.
                Err(e) => tracing::warn!("plots not drawn: {e:#}"),
            }
        }
        let md = self.markdown(&images);
        super::write_atomic(&run_dir.join("report.md"), md.as_bytes())
            .with_context(|| format!("writing the report in {}", run_dir.display()))
    }

    pub fn markdown(&self, images: &[(String, String)]) -> String {
        let w = |v: &[f64]| {
            let parts: Vec<String> = v.iter().map(|x| format!("{x:.4}")).collect();
            format!("[{}]", parts.join(", "))
        };
        let mut s = String::from("# ckmerge search report\n\n");
        s += &format!(
            "{} evaluations ({} failed), stopped: {}; {:.1} s in all.\n\n",
            self.evaluations, self.failed, self.stop_reason, self.wall_seconds
        );
        s += &format!(
            "Model: {} ({} layers, {:.2} M parameters); {} checkpoints: {}.\n\n",
            self.model.model_type,
            self.model.layers,
            self.model.parameters as f64 / 1e6,
            self.checkpoints.len(),
            self.checkpoints
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(Record::Done {
            trial,
            weights,
            perplexity,
            mean_nll,
            ..
        }) = &self.best
        {
            s += &format!(
                "**Best: trial {trial}, weights {}, held-out perplexity {perplexity:.4}** (mean NLL {mean_nll:.6}).\n\n",
                w(weights)
            );
        }
        if let Some(m) = &self.merged_model {
            s += &format!("Merged model: `{}`\n\n", m.display());
        }
        if !self.references.is_empty() {
            let names: Vec<&str> = self.references[0]
                .scores
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            s += "## Summary (held-out perplexity; the first data set is the objective)\n\n| model | weights |";
            for n in &names {
                s += &format!(" {n} |");
            }
            s += "\n|---|---|";
            s += &"---:|".repeat(names.len());
            s += "\n";
            for r in &self.references {
                let bold = r.label == BEST_LABEL;
                let b = if bold { "**" } else { "" };
                s += &format!("| {b}{}{b} | {} |", r.label, w(&r.weights));
                for d in &r.scores {
                    s += &format!(" {b}{:.4}{b} |", d.perplexity);
                }
                s += "\n";
            }
            if !self.improvement.is_empty() {
                s += "| change vs best source | |";
                for i in &self.improvement {
                    s += &format!(
                        " {:+.2}% ({}) |",
                        i.change_vs_best_source_pct, i.best_source
                    );
                }
                s += "\n| change vs uniform average | |";
                for i in &self.improvement {
                    s += &format!(" {:+.2}% |", i.change_vs_uniform_pct);
                }
                s += "\n";
            }
            s += "\n";
        }
        for (title, file) in images {
            s += &format!("![{title}]({file})\n\n");
        }
        s += "## Trials\n\n| trial | worker | weights | perplexity | mean NLL | eval s |\n|---:|---|---|---:|---:|---:|\n";
        for t in &self.trials {
            match t {
                Record::Done {
                    trial,
                    worker,
                    weights,
                    perplexity,
                    mean_nll,
                    eval_seconds,
                    merge_seconds,
                    ..
                } => {
                    s += &format!(
                        "| {trial} | {worker} | {} | {perplexity:.4} | {mean_nll:.6} | {:.2} |\n",
                        w(weights),
                        eval_seconds + merge_seconds
                    );
                }
                Record::Failed {
                    trial,
                    weights,
                    errors,
                    ..
                } => {
                    let why = errors
                        .iter()
                        .map(|(w, e)| format!("{w}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ");
                    s += &format!(
                        "| {trial} | failed | {} | – | – | {} |\n",
                        w(weights),
                        why.replace('|', "/")
                    );
                }
                _ => {}
            }
        }
        s += "\n## Workers\n\n| worker | host | device | load s | resident MB | evaluations | scored tokens/s | last error |\n|---|---|---|---:|---:|---:|---:|---|\n";
        for wk in &self.workers {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                wk.name,
                wk.host.as_deref().unwrap_or("–"),
                wk.device.as_deref().unwrap_or("–"),
                wk.load_seconds
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or("–".into()),
                wk.rss_bytes
                    .map(|x| format!("{}", x / 1_000_000))
                    .unwrap_or("–".into()),
                wk.evaluations,
                wk.tokens_per_s
                    .map(|x| format!("{x:.0}"))
                    .unwrap_or("–".into()),
                wk.last_error.as_deref().unwrap_or("").replace('|', "/")
            );
        }
        s
    }
}
