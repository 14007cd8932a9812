//! The search report: `report.json` (everything, machine-readable), `report.md` (a summary
//! table a person reads at a glance, then every trial) and the plots.
//!
//! The report is built from plain data: a [`RunSummary`] (what the run did) and the
//! [`Reference`]s (named points scored on every data set); it holds no connection and
//! knows nothing of the scheduler.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ckmerge_common::protocol::DatasetScore;
use serde::Serialize;

use super::config::{ModelSummary, Objective, SearchConfig, SpaceConfig};
use super::journal::Record;
use super::plots;
use super::scheduler::WorkerSummary;
use crate::bo::{Optimizer, SearchSpace};
use ckmerge_common::weights::Average;

/// Which point a reference is: the comparisons the report draws are found by kind, never
/// by position or label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceKind {
    /// Source checkpoint `i` alone.
    Source(usize),
    /// The uniform average of the sources.
    Uniform,
    /// An average practitioners take along a run (EMA, WMA, a last-k window,
    /// minus-sqrt), over the sources in the order given (oldest first).
    Average,
    /// The best weights the search found.
    BestFound,
}

/// A point to score for the summary table.
#[derive(Clone, Debug)]
pub struct ReferencePoint {
    pub kind: ReferenceKind,
    pub label: String,
    /// Weights of the search space (per group for a group search).
    pub weights: Vec<f64>,
}

/// A reference point of the summary table, scored on every data set.
#[derive(Clone, Debug, Serialize)]
pub struct Reference {
    /// `source`, `uniform`, `average` or `best`.
    #[serde(serialize_with = "kind_name")]
    pub kind: ReferenceKind,
    pub label: String,
    pub weights: Vec<f64>,
    /// The objective's value at these weights (see `config::Objective`; the mean NLL of
    /// the first set when the objective is one text set); None where it is not finite.
    pub objective: Option<f64>,
    pub scores: Vec<DatasetScore>,
}

fn kind_name<S: serde::Serializer>(k: &ReferenceKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match k {
        ReferenceKind::Source(_) => "source",
        ReferenceKind::Uniform => "uniform",
        ReferenceKind::Average => "average",
        ReferenceKind::BestFound => "best",
    })
}

impl Reference {
    pub fn new(
        point: ReferencePoint,
        scores: Vec<DatasetScore>,
        objective: &Objective,
    ) -> Reference {
        Reference {
            kind: point.kind,
            label: point.label,
            weights: point.weights,
            objective: objective.value(&scores).ok(),
            scores,
        }
    }
}

/// What a finished run did, as the report needs it.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Completed trials (journal `done` records), in the order they completed.
    pub done: Vec<Record>,
    /// Trials that failed on every attempt.
    pub failed: Vec<Record>,
    pub workers: Vec<WorkerSummary>,
    pub stop_reason: String,
    pub wall_seconds: f64,
    pub merged_model: Option<PathBuf>,
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
    /// The best of the averages along the run (EMA, WMA, last-k windows, minus-sqrt,
    /// the uniform average) on this data set; with three or more checkpoints.
    pub best_average: Option<String>,
    pub best_average_perplexity: Option<f64>,
    pub change_vs_best_average_pct: Option<f64>,
}

/// The early-stopping test of a run (`search.early_stop_alpha`, `search.early_stop_margin`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EarlyStop {
    pub alpha: f64,
    pub margin: f64,
}

/// report.json. Its field names are stable within a `schema_version`
/// ([`crate::summary::SCHEMA_VERSION`]): fields may be added, none renamed or removed.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub checkpoints: Vec<PathBuf>,
    pub space: SpaceConfig,
    /// What the search minimised: each set of the objective and its weight (normalised).
    pub objective: Vec<ObjectiveSet>,
    pub model: ModelSummary,
    pub stop_reason: String,
    pub wall_seconds: f64,
    pub evaluations: usize,
    pub failed: usize,
    /// Tokens the completed trials scored, in all (baselines and references not counted).
    pub scored_tokens: usize,
    /// Completed trials stopped early (`search.early_stop`).
    pub stopped_early: usize,
    /// The early-stopping test the run used; absent when it was off.
    pub early_stop: Option<EarlyStop>,
    pub best: Option<Record>,
    pub references: Vec<Reference>,
    pub improvement: Vec<Improvement>,
    pub trials: Vec<Record>,
    pub workers: Vec<WorkerSummary>,
    pub merged_model: Option<PathBuf>,
}

/// One set of the objective.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectiveSet {
    pub set: String,
    pub weight: f64,
}

/// The completed trial with the lowest value (the first of equals), of those scored
/// whole: a trial stopped early was not better than an incumbent (by more than the
/// early-stopping margin), and its value is an estimate.
pub fn best_done(done: &[Record]) -> Option<&Record> {
    done.iter()
        .filter(|r| matches!(r, Record::Done { partial: None, .. }))
        .min_by(|a, b| match (a, b) {
            (Record::Done { mean_nll: x, .. }, Record::Done { mean_nll: y, .. }) => x.total_cmp(y),
            _ => std::cmp::Ordering::Equal,
        })
}

/// `r` without its per-window NLLs.
fn without_units(mut r: Record) -> Record {
    if let Record::Done { units, .. } = &mut r {
        units.clear();
    }
    r
}

/// How a checkpoint is named in the report: its directory's name.
pub fn checkpoint_label(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Each source alone, the uniform average, the averages along the run (with three or more
/// sources, [`trajectory_averages`]) and the best weights (`best`, a `done` record), as
/// weight vectors of `space` (per group for a group search: every group the same).
/// `labels` names the sources.
pub fn reference_points(
    space: &SearchSpace,
    labels: &[String],
    best: Option<&Record>,
) -> Vec<ReferencePoint> {
    let (groups, n) = match space {
        SearchSpace::Grouped { groups, n } => (*groups, *n),
        _ => (1, space.n_weights()),
    };
    let tile = |w: Vec<f64>| -> Vec<f64> { (0..groups).flat_map(|_| w.clone()).collect() };
    let mut out: Vec<ReferencePoint> = (0..n)
        .map(|i| ReferencePoint {
            kind: ReferenceKind::Source(i),
            label: labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("checkpoint {i}")),
            weights: tile((0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect()),
        })
        .collect();
    out.push(ReferencePoint {
        kind: ReferenceKind::Uniform,
        label: "uniform average".into(),
        weights: tile(vec![1.0 / n as f64; n]),
    });
    for avg in trajectory_averages(n) {
        let w = avg.weights(n);
        // Skip one that is a point already listed (the last 1 is the latest source).
        let same = |r: &ReferencePoint| {
            r.weights
                .iter()
                .zip(tile(w.clone()))
                .all(|(a, b)| (a - b).abs() < 1e-12)
        };
        if !out.iter().any(same) {
            out.push(ReferencePoint {
                kind: ReferenceKind::Average,
                label: avg.label(n),
                weights: tile(w),
            });
        }
    }
    out.extend(best_point(best));
    out
}

/// The best found (`best`, a `done` record) as a reference point.
pub fn best_point(best: Option<&Record>) -> Option<ReferencePoint> {
    match best {
        Some(Record::Done { weights, .. }) => Some(ReferencePoint {
            kind: ReferenceKind::BestFound,
            label: "best found".into(),
            weights: weights.clone(),
        }),
        _ => None,
    }
}

/// The averages along a run every report with three or more checkpoints compares the
/// best found with (the uniform average is listed on its own): PMA's EMA at decays 0.1,
/// 0.2 and 0.5 and its WMA over all, LAWA's windows of the last 2, 4 and 8, Megatron's
/// minus-sqrt over all. Fewer than three checkpoints: none (each is a source or lambda).
pub fn trajectory_averages(n: usize) -> Vec<Average> {
    if n < 3 {
        return Vec::new();
    }
    let mut v: Vec<Average> = [0.1, 0.2, 0.5]
        .iter()
        .map(|&decay| Average::Ema { decay })
        .collect();
    v.push(Average::Wma { k: n });
    v.extend(
        [2, 4, 8]
            .iter()
            .filter(|&&k| k < n)
            .map(|&k| Average::Window { k }),
    );
    v.push(Average::MinusSqrt { k: n });
    v
}

fn pct(a: f64, b: f64) -> f64 {
    (a - b) / b * 100.0
}

/// Per data set, the best found against the best source and the uniform average; empty
/// without a best found.
fn improvements(references: &[Reference]) -> Vec<Improvement> {
    let of = |kind: ReferenceKind| references.iter().find(|r| r.kind == kind);
    let (Some(best), Some(uni)) = (of(ReferenceKind::BestFound), of(ReferenceKind::Uniform)) else {
        return Vec::new();
    };
    let sources: Vec<&Reference> = references
        .iter()
        .filter(|r| matches!(r.kind, ReferenceKind::Source(_)))
        .collect();
    best.scores
        .iter()
        .enumerate()
        .map(|(d, score)| {
            let src = sources
                .iter()
                .min_by(|a, b| a.scores[d].perplexity.total_cmp(&b.scores[d].perplexity))
                .expect("at least one source");
            let avg = references
                .iter()
                .filter(|r| matches!(r.kind, ReferenceKind::Average | ReferenceKind::Uniform))
                .filter(|_| sources.len() >= 3)
                .min_by(|a, b| a.scores[d].perplexity.total_cmp(&b.scores[d].perplexity));
            Improvement {
                dataset: score.name.clone(),
                best_perplexity: score.perplexity,
                best_source: src.label.clone(),
                best_source_perplexity: src.scores[d].perplexity,
                change_vs_best_source_pct: pct(score.perplexity, src.scores[d].perplexity),
                uniform_perplexity: uni.scores[d].perplexity,
                change_vs_uniform_pct: pct(score.perplexity, uni.scores[d].perplexity),
                best_average: avg.map(|a| a.label.clone()),
                best_average_perplexity: avg.map(|a| a.scores[d].perplexity),
                change_vs_best_average_pct: avg
                    .map(|a| pct(score.perplexity, a.scores[d].perplexity)),
            }
        })
        .collect()
}

impl Report {
    pub fn build(
        cfg: &SearchConfig,
        model: &ModelSummary,
        run: RunSummary,
        references: Vec<Reference>,
    ) -> Report {
        let improvement = improvements(&references);
        let best = best_done(&run.done).cloned();
        let (evaluations, failed) = (run.done.len(), run.failed.len());
        let (mut scored_tokens, mut stopped_early) = (0, 0);
        for r in &run.done {
            if let Record::Done {
                tokens, partial, ..
            } = r
            {
                scored_tokens += tokens;
                stopped_early += usize::from(partial.is_some());
            }
        }
        // The per-window NLLs kept for early stopping stay in the journal: thousands of
        // numbers per trial that no reader of the report wants.
        let mut trials: Vec<Record> = run
            .done
            .into_iter()
            .chain(run.failed)
            .map(without_units)
            .collect();
        trials.sort_by_key(Record::trial);
        let best = best.map(without_units);
        Report {
            schema_version: crate::summary::SCHEMA_VERSION,
            checkpoints: cfg.checkpoints.clone(),
            space: cfg.space.clone(),
            objective: cfg
                .objective()
                .sets
                .into_iter()
                .map(|(set, weight)| ObjectiveSet { set, weight })
                .collect(),
            model: model.clone(),
            stop_reason: run.stop_reason,
            wall_seconds: run.wall_seconds,
            evaluations,
            failed,
            scored_tokens,
            stopped_early,
            early_stop: cfg.search.early_stop.then_some(EarlyStop {
                alpha: cfg.search.early_stop_alpha,
                margin: cfg.search.early_stop_margin,
            }),
            best,
            references,
            improvement,
            trials,
            workers: run.workers,
            merged_model: run.merged_model,
        }
    }

    /// Writes report.json, report.md and, with `plots` (the run's optimiser), the plots.
    pub fn write(&self, run_dir: &Path, plots: Option<&Optimizer>) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("the report serialises") + "\n";
        super::write_atomic(&run_dir.join("report.json"), json.as_bytes())?;
        let mut images = Vec::new();
        if let Some(opt) = plots {
            match self.draw(run_dir, opt) {
                Ok(v) => images = v,
                // A report without pictures is still a report.
                Err(e) => tracing::warn!("plots not drawn: {e:#}"),
            }
        }
        let md = self.markdown(&images);
        super::write_atomic(&run_dir.join("report.md"), md.as_bytes())
            .with_context(|| format!("writing the report in {}", run_dir.display()))
    }

    /// The plots: best so far against the references (not the best found), and the
    /// optimiser's own surrogate where the space can be drawn.
    fn draw(&self, run_dir: &Path, opt: &Optimizer) -> Result<Vec<(String, String)>> {
        let perplexities: Vec<f64> = self
            .trials
            .iter()
            .filter_map(|r| match r {
                Record::Done { perplexity, .. } => Some(*perplexity),
                _ => None,
            })
            .collect();
        // Sources, the uniform average and the best of the other averages: every average
        // would crowd the plot.
        // On the trials' scale: exp of the objective's value.
        let first = |r: &Reference| r.objective.map(f64::exp);
        let best_average = self
            .references
            .iter()
            .filter(|r| r.kind == ReferenceKind::Average)
            .filter(|r| first(r).is_some())
            .min_by(|a, b| first(a).unwrap().total_cmp(&first(b).unwrap()));
        let lines: Vec<(String, f64)> = self
            .references
            .iter()
            .filter(|r| matches!(r.kind, ReferenceKind::Source(_) | ReferenceKind::Uniform))
            .chain(best_average)
            .filter_map(|r| first(r).map(|p| (r.label.clone(), p)))
            .collect();
        let gp = opt
            .surrogate()
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?;
        let surrogate = gp.as_ref().map(|gp| plots::SurrogateView {
            gp,
            space: &opt.space,
            observed: opt
                .observations
                .iter()
                .filter_map(|o| o.value.map(|v| (o.u.clone(), v)))
                .collect(),
        });
        plots::draw_all(run_dir, &perplexities, &lines, surrogate.as_ref())
    }

    /// The objective in words: `cloze (choice NLL)` or `0.70 × prose + 0.30 × cloze`.
    fn objective_text(&self) -> String {
        let is_task = |name: &str| {
            self.references
                .first()
                .and_then(|r| r.scores.iter().find(|d| d.name == name))
                .is_some_and(|d| d.task.is_some())
        };
        let term = |o: &ObjectiveSet| {
            let what = if is_task(&o.set) {
                "choice NLL"
            } else {
                "mean NLL"
            };
            format!("{} ({what})", o.set)
        };
        match self.objective.as_slice() {
            [one] => term(one),
            many => many
                .iter()
                .map(|o| format!("{:.2} × {}", o.weight, term(o)))
                .collect::<Vec<_>>()
                .join(" + "),
        }
    }

    pub fn markdown(&self, images: &[(String, String)]) -> String {
        let w = |v: &[f64]| {
            let parts: Vec<String> = v.iter().map(|x| format!("{x:.4}")).collect();
            format!("[{}]", parts.join(", "))
        };
        let mut s = String::from("# ckmerge search report\n\n");
        s += &format!(
            "{} evaluations ({} failed), stopped: {}; {:.1} s in all; {} tokens scored by the trials{}.\n\n",
            self.evaluations,
            self.failed,
            self.stop_reason,
            self.wall_seconds,
            self.scored_tokens,
            if let Some(e) = self.early_stop {
                let margin = if e.margin == 0.0 {
                    String::new()
                } else {
                    format!(
                        ", margin {}: the best is within it of these trials scored whole",
                        e.margin
                    )
                };
                format!(
                    ", {} of them stopped early (alpha {}{margin})",
                    self.stopped_early, e.alpha
                )
            } else {
                String::new()
            }
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
        // One text set: its perplexity is the objective's exp; otherwise the objective is
        // a task's choice NLL or a weighted mean, and gets its own column.
        let plain = self.objective.len() == 1
            && self
                .references
                .first()
                .and_then(|r| r.scores.first())
                .is_none_or(|d| d.task.is_none());
        if let Some(Record::Done {
            trial,
            weights,
            perplexity,
            mean_nll,
            ..
        }) = &self.best
        {
            if plain {
                s += &format!(
                    "**Best: trial {trial}, weights {}, held-out perplexity {perplexity:.4}** (mean NLL {mean_nll:.6}).\n\n",
                    w(weights)
                );
            } else {
                s += &format!(
                    "**Best: trial {trial}, weights {}, objective {mean_nll:.6}** ({}).\n\n",
                    w(weights),
                    self.objective_text()
                );
            }
        }
        if let Some(m) = &self.merged_model {
            s += &format!("Merged model: `{}`\n\n", m.display());
        }
        if !self.references.is_empty() {
            let sets: Vec<&DatasetScore> = self.references[0].scores.iter().collect();
            if plain {
                s += "## Summary (held-out perplexity; the first data set is the objective)\n\n| model | weights |";
            } else {
                s += &format!(
                    "## Summary (objective: {}; text sets: perplexity; tasks: acc / acc_norm / choice NLL)\n\n| model | weights | objective |",
                    self.objective_text()
                );
            }
            for d in &sets {
                s += &format!(" {} |", d.name);
            }
            s += "\n|---|---|";
            if !plain {
                s += "---:|";
            }
            s += &"---:|".repeat(sets.len());
            s += "\n";
            for r in &self.references {
                let bold = r.kind == ReferenceKind::BestFound;
                let b = if bold { "**" } else { "" };
                s += &format!("| {b}{}{b} | {} |", r.label, w(&r.weights));
                if !plain {
                    match r.objective {
                        Some(v) => s += &format!(" {b}{v:.6}{b} |"),
                        None => s += " – |",
                    }
                }
                for d in &r.scores {
                    match &d.task {
                        None => s += &format!(" {b}{:.4}{b} |", d.perplexity),
                        Some(t) => {
                            s += &format!(
                                " {b}{:.4} / {:.4} / {:.4}{b} |",
                                t.acc, t.acc_norm, d.mean_nll
                            )
                        }
                    }
                }
                s += "\n";
            }
            let lead = if plain { "" } else { " |" };
            // The change of a task's accuracy, in points, against the row labelled `label`.
            let acc_change = |d: usize, label: &str| -> Option<String> {
                let best = self
                    .references
                    .iter()
                    .find(|r| r.kind == ReferenceKind::BestFound)?;
                let other = self.references.iter().find(|r| r.label == label)?;
                let (a, b) = (best.scores[d].task?, other.scores[d].task?);
                Some(format!("acc {:+.1} pts", (a.acc - b.acc) * 100.0))
            };
            if !self.improvement.is_empty() {
                s += &format!("| change vs best source | |{lead}");
                for (d, i) in self.improvement.iter().enumerate() {
                    match acc_change(d, &i.best_source) {
                        Some(a) => s += &format!(" {a} ({}) |", i.best_source),
                        None => {
                            s += &format!(
                                " {:+.2}% ({}) |",
                                i.change_vs_best_source_pct, i.best_source
                            )
                        }
                    }
                }
                s += &format!("\n| change vs uniform average | |{lead}");
                for (d, i) in self.improvement.iter().enumerate() {
                    match acc_change(d, "uniform average") {
                        Some(a) => s += &format!(" {a} |"),
                        None => s += &format!(" {:+.2}% |", i.change_vs_uniform_pct),
                    }
                }
                s += "\n";
                if self.improvement.iter().any(|i| i.best_average.is_some()) {
                    s += &format!("| change vs best average along the run | |{lead}");
                    for (d, i) in self.improvement.iter().enumerate() {
                        match (&i.best_average, i.change_vs_best_average_pct) {
                            (Some(a), Some(c)) => match acc_change(d, a) {
                                Some(x) => s += &format!(" {x} ({a}) |"),
                                None => s += &format!(" {c:+.2}% ({a}) |"),
                            },
                            _ => s += " – |",
                        }
                    }
                    s += "\n";
                }
            }
            s += "\n";
        }
        for (title, file) in images {
            s += &format!("![{title}]({file})\n\n");
        }
        s += if plain {
            "## Trials\n\n| trial | worker | weights | perplexity | mean NLL | eval s |\n"
        } else {
            "## Trials\n\n| trial | worker | weights | exp(objective) | objective | eval s |\n"
        };
        s += "|---:|---|---|---:|---:|---:|\n";
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
                    partial,
                    continues,
                    ..
                } => {
                    // A trial stopped early: its value is an estimate, marked with how much
                    // of the set it scored; a leader's confirmation names the leader.
                    let note = match (partial, continues) {
                        (Some(p), _) => {
                            let why = if p.better { ", better: the leader" } else { "" };
                            format!(
                                " (est., stopped at {}/{} units{why})",
                                p.scored_units, p.units
                            )
                        }
                        (None, Some(l)) => format!(" (trial {l} scored whole)"),
                        (None, None) => String::new(),
                    };
                    s += &format!(
                        "| {trial} | {worker} | {} | {perplexity:.4} | {mean_nll:.6}{note} | {:.2} |\n",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn score(p: f64) -> Vec<DatasetScore> {
        vec![DatasetScore {
            name: "heldout".into(),
            mean_nll: p.ln(),
            perplexity: p,
            tokens: 100,
            task: None,
        }]
    }

    fn one_set() -> Objective {
        Objective {
            sets: vec![("heldout".into(), 1.0)],
        }
    }

    #[test]
    fn reports_compare_the_best_with_the_averages_along_the_run() {
        let labels: Vec<String> = (1..=12).map(|i| format!("step-{}", i * 100)).collect();
        let space = SearchSpace::simplex(vec![0.0; 12]).unwrap();
        let pts = reference_points(&space, &labels, None);
        let names: Vec<&str> = pts.iter().map(|p| p.label.as_str()).collect();
        for want in [
            "step-100",
            "step-1200",
            "uniform average",
            "EMA 0.1",
            "EMA 0.2",
            "EMA 0.5",
            "WMA 12",
            "last 2",
            "last 4",
            "last 8",
            "minus-sqrt 12",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        // Two checkpoints: the sources and their average only.
        let two = reference_points(&SearchSpace::lambda(0.0).unwrap(), &labels[..2], None);
        assert_eq!(two.len(), 3);

        // The best of the averages is found by kind, whatever its position.
        let mut refs: Vec<Reference> = pts
            .into_iter()
            .map(|p| {
                let ppl = match p.label.as_str() {
                    "last 4" => 17.0,
                    "uniform average" => 20.0,
                    l if l.starts_with("step") => 25.0,
                    _ => 18.0,
                };
                Reference::new(p, score(ppl), &one_set())
            })
            .collect();
        refs.push(Reference {
            kind: ReferenceKind::BestFound,
            label: "best found".into(),
            weights: vec![0.0; 12],
            objective: Some(16f64.ln()),
            scores: score(16.0),
        });
        let imp = improvements(&refs);
        assert_eq!(imp[0].best_average.as_deref(), Some("last 4"));
        let c = imp[0].change_vs_best_average_pct.unwrap();
        assert!((c - (16.0 / 17.0 - 1.0) * 100.0).abs() < 1e-9, "{c}");
    }
}
