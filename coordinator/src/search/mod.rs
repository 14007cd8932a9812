//! `ckmerge search`: the whole method. Validate the config, start or reach the workers,
//! run the Bayesian optimisation asynchronously over them with every result journaled,
//! score the reference points (each source, the uniform average, the best) on every data
//! set, write the merged model of the best weights and the report.
//!
//! A run lives in one directory:
//!
//! ```text
//! RUN_DIR/config.toml      the config, paths made absolute (a resume reads it)
//! RUN_DIR/fingerprint.json what the trials are measured on, checked on resume
//! RUN_DIR/trials.jsonl     the journal: the source of truth (see `journal`)
//! RUN_DIR/optimizer.json   optimiser snapshot (hyperparameters, GP-Hedge gains)
//! RUN_DIR/report.json      everything the report shows, machine-readable
//! RUN_DIR/report.md        summary table and every trial
//! RUN_DIR/*.png            best so far; the surrogate over lambda (1-D) or a heatmap (2-D)
//! RUN_DIR/merged/          the merged model of the best weights (HF format)
//! RUN_DIR/.lock            held (flock) by the coordinator running the search (`lock`)
//! ```

pub mod baselines;
pub mod config;
pub mod fingerprint;
pub mod journal;
pub mod lock;
pub mod plots;
pub mod progress;
pub mod report;
pub mod scheduler;
pub mod trials;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ckmerge_common::protocol::Secret;
use ckmerge_worker::{merge_to_dir, MergeRequest};

use crate::bo::Optimizer;
use config::{SearchConfig, SpaceConfig};
use fingerprint::{Fingerprint, FINGERPRINT_FILE};
use journal::{replay, Journal, Record, JOURNAL_FILE};
use lock::{RunLock, LOCK_FILE};
use scheduler::{Resumed, Scheduler};

pub const CONFIG_FILE: &str = "config.toml";
pub const SNAPSHOT_FILE: &str = "optimizer.json";

pub struct SearchArgs {
    /// The config; optional with `resume` (the run's stored config is used).
    pub config: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub resume: bool,
    /// Replace an existing run directory.
    pub force: bool,
    pub secret_file: Option<PathBuf>,
    /// Live progress display on a terminal.
    pub live: bool,
    /// Budget overrides (allowed on a resume).
    pub max_evals: Option<usize>,
    pub local_workers: Option<usize>,
    /// Override `workers.addresses_file` (allowed on a resume: workers may change).
    pub workers_file: Option<PathBuf>,
    /// Override `workers.stages`.
    pub stages: Option<usize>,
    /// `--gpus` for the in-process workers (`auto`, `all`, `none`, ordinals), resolved
    /// only when the run has no remote workers.
    pub local_gpus: String,
}

/// What a finished search produced.
pub struct SearchOutcome {
    pub report: report::Report,
    pub run_dir: PathBuf,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// `p` with symbolic links resolved, for a path that may not exist yet (as a merge
/// resolves its output); `p` itself where that fails.
fn real_path(p: &Path) -> PathBuf {
    ckmerge_common::write::StagedDir::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Decides the config of this session and prepares the run directory. A resume returns
/// the run directory's lock, taken before anything in it is read.
fn prepare(args: &SearchArgs) -> Result<(SearchConfig, Option<RunLock>)> {
    let mut lock = None;
    let dir = &args.run_dir;
    let stored_path = dir.join(CONFIG_FILE);
    let mut cfg = if args.resume {
        if !stored_path.is_file() {
            bail!(
                "{}: not a ckmerge run directory (no {CONFIG_FILE}); start a run with --config",
                dir.display()
            );
        }
        lock = Some(RunLock::acquire(dir)?);
        let stored = SearchConfig::load(&stored_path)?;
        match &args.config {
            None => stored,
            Some(p) => {
                let new = SearchConfig::load(p)?;
                let conflicts = stored.resume_conflicts(&new);
                if !conflicts.is_empty() {
                    bail!(
                        "{} cannot resume the run in {}: it changes what a trial's value means:\n  {}\nresume without --config (the run's own config is used), or start a new run directory",
                        p.display(),
                        dir.display(),
                        conflicts.join("\n  ")
                    );
                }
                new
            }
        }
    } else {
        let Some(p) = &args.config else {
            bail!("give --config FILE (or --resume RUN_DIR)");
        };
        let cfg = SearchConfig::load(p)?;
        let inside = real_path(dir);
        if let Some(c) = cfg
            .checkpoints
            .iter()
            .find(|c| inside.starts_with(real_path(c)))
        {
            bail!(
                "--run-dir {} is inside the checkpoint {}: a run writes its journal, report and merged model there; choose a directory outside every input",
                dir.display(),
                c.display()
            );
        }
        if dir.exists() {
            let is_run = stored_path.is_file() || dir.join(JOURNAL_FILE).is_file();
            // (A lock file alone: a start killed before it wrote anything.)
            let empty = std::fs::read_dir(dir)
                .map(|mut d| d.all(|e| e.is_ok_and(|e| e.file_name() == LOCK_FILE)))
                .unwrap_or(false);
            // A run another coordinator is running is neither resumed nor replaced.
            let running = if is_run {
                Some(RunLock::acquire(dir)?)
            } else {
                None
            };
            if is_run && !args.force {
                bail!(
                    "{} already holds a run; continue it with --resume, or pass --force to discard it",
                    dir.display()
                );
            } else if is_run {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing the old run {}", dir.display()))?;
                drop(running);
            } else if !empty {
                bail!(
                    "{} exists and is not a ckmerge run directory; choose another --run-dir",
                    dir.display()
                );
            }
        }
        cfg
    };
    if let Some(n) = args.max_evals {
        cfg.search.max_evals = n;
    }
    if let Some(n) = args.local_workers {
        cfg.workers.local = Some(n);
    }
    if let Some(k) = args.stages {
        cfg.workers.stages = k;
    }
    if let Some(f) = &args.workers_file {
        cfg.workers.addresses_file =
            Some(std::path::absolute(f).with_context(|| format!("resolving {}", f.display()))?);
    }
    Ok((cfg, lock))
}

/// On a new run, records what its trials are measured on; on a resume, refuses to go on
/// when that changed (the config in the run directory edited, an input replaced).
fn check_fingerprint(cfg: &SearchConfig, run_dir: &Path, resume: bool) -> Result<()> {
    let now = Fingerprint::of(cfg)?;
    match Fingerprint::read(run_dir)? {
        Some(was) if resume => {
            let diff = was.differences(&now);
            if !diff.is_empty() {
                bail!(
                    "{} cannot be resumed: what its trials were measured on has changed:\n  {}\nrestore the config and inputs, or start a new run directory",
                    run_dir.display(),
                    diff.join("\n  ")
                );
            }
            Ok(())
        }
        None if resume => {
            tracing::warn!(
                "{} has no {FINGERPRINT_FILE} (made by an older ckmerge): recording the inputs as they are now",
                run_dir.display()
            );
            now.write(run_dir)
        }
        _ => now.write(run_dir),
    }
}

/// Rebuilds the optimiser from the journal (and the snapshot when it matches it).
fn resume_state(cfg: &SearchConfig, run_dir: &Path) -> Result<Resumed> {
    let space = cfg.search_space()?;
    let bo = cfg.bo_config()?;
    let r = replay(run_dir)?;
    for w in &r.warnings {
        tracing::warn!("{w}");
    }
    let finished_u: Vec<&Vec<f64>> = r
        .finished
        .iter()
        .map(|rec| match rec {
            Record::Done { u, .. } | Record::Failed { u, .. } => u,
            _ => unreachable!("finished holds done and failed records"),
        })
        .collect();
    // A journal written before the space's coordinates changed (the simplex was searched
    // through stick-breaking before 0.2) holds points in the old coordinates: the weights
    // are the truth, so the points are recomputed from them, and a snapshot of such a run
    // is not used.
    let point_of = |rec: &Record| -> Vec<f64> {
        match rec {
            Record::Done { u, weights, .. } | Record::Failed { u, weights, .. } => {
                space.current_point(u, weights)
            }
            _ => unreachable!("finished holds done and failed records"),
        }
    };
    let current: Vec<Vec<f64>> = r.finished.iter().map(point_of).collect();
    let coordinates_current = current.iter().zip(&finished_u).all(|(a, b)| a == *b);
    let snapshot: Option<Optimizer> = std::fs::read(run_dir.join(SNAPSHOT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    // The snapshot is written after the journal, so it never knows more trials than the
    // journal holds, unless the journal was emptied, deleted or cut: refuse rather than
    // start over silently.
    if let Some(s) = snapshot
        .as_ref()
        .filter(|s| s.observations.len() > finished_u.len())
    {
        bail!(
            "{}: the journal holds {} finished trials but {SNAPSHOT_FILE} knows of {}: the journal was emptied, deleted or cut short; restore it (it is the source of truth), or start a new run directory",
            run_dir.join(JOURNAL_FILE).display(),
            finished_u.len(),
            s.observations.len()
        );
    }
    let opt = match snapshot {
        Some(mut s)
            if s.space == space
                && coordinates_current
                && s.observations.len() == finished_u.len()
                && s.observations
                    .iter()
                    .zip(&finished_u)
                    .all(|(o, u)| &o.u == *u) =>
        {
            s.config = bo;
            s
        }
        _ => {
            let mut o = Optimizer::new(space, bo);
            for (rec, u) in r.finished.iter().zip(current) {
                match rec {
                    Record::Done {
                        mean_nll,
                        partial: None,
                        continues: Some(_),
                        ..
                    } => o.tell_confirmation(u, *mean_nll),
                    Record::Done {
                        mean_nll,
                        partial: None,
                        ..
                    } => o.tell(u, Ok(*mean_nll)),
                    Record::Done {
                        mean_nll,
                        partial: Some(p),
                        ..
                    } => o.tell_estimate(u, *mean_nll, p.std_error.powi(2)),
                    Record::Failed { errors, .. } => o.tell(
                        u,
                        Err(errors
                            .iter()
                            .map(|(w, e)| format!("{w}: {e}"))
                            .collect::<Vec<_>>()
                            .join("; ")),
                    ),
                    _ => {}
                }
            }
            o
        }
    };
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for rec in r.finished {
        match rec {
            Record::Done { .. } => done.push(rec),
            _ => failed.push(rec),
        }
    }
    let mut requeue = Vec::new();
    for (id, rec) in &r.in_flight {
        if let Record::Issued { u, weights, .. } = rec {
            let errors = r.attempts.get(id).cloned().unwrap_or_default();
            requeue.push(scheduler::Requeued {
                id: *id,
                u: opt.space.current_point(u, weights),
                weights: weights.clone(),
                errors,
            });
        }
    }
    Ok(Resumed {
        opt,
        done,
        failed,
        requeue,
        next_id: r.next_id,
    })
}

/// Runs a search to the end: trials, reference scores, merged model, report.
pub fn run(args: SearchArgs) -> Result<SearchOutcome> {
    let t0 = std::time::Instant::now();
    let (cfg, lock) = prepare(&args)?;
    let model = cfg.validate()?;
    tracing::info!(
        "{} checkpoints of a {} model ({} tensors, {:.1} M parameters), {} data set{}",
        cfg.checkpoints.len(),
        model.model_type,
        model.tensors,
        model.parameters as f64 / 1e6,
        cfg.datasets().len(),
        if cfg.datasets().len() == 1 { "" } else { "s" }
    );
    let remote = !cfg.workers.addresses.is_empty()
        || !cfg.workers.pipelines.is_empty()
        || cfg.workers.addresses_file.is_some();
    let secret = if remote {
        Some(
            Secret::load(
                args.secret_file
                    .as_deref()
                    .or(cfg.workers.secret_file.as_deref()),
            )
            .map_err(|e| anyhow::anyhow!("workers need the run's secret: {e}"))?,
        )
    } else {
        None
    };
    let local_gpus = if remote {
        None
    } else {
        let unverified = (!cfg.data.tasks.is_empty())
            .then_some("the config has multiple-choice tasks, whose GPU path has not been run on a GPU yet (pass --gpus to use it)")
            .or_else(|| ckmerge_worker::gpu::unverified_on_gpu(&model.model_type));
        ckmerge_worker::gpu::resolve_gpus_for(&args.local_gpus, unverified)
            .map_err(|e| anyhow::anyhow!(e))?
    };
    let run_dir = args.run_dir.clone();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    // Held until this function returns (or the process ends).
    let _lock = match lock {
        Some(l) => l,
        None => RunLock::acquire(&run_dir)?,
    };
    // Everything that can refuse a resume runs before anything in the run is written.
    let resumed = resume_state(&cfg, &run_dir)?;
    check_fingerprint(&cfg, &run_dir, args.resume)?;
    write_atomic(&run_dir.join(CONFIG_FILE), cfg.to_toml().as_bytes())?;
    if args.resume {
        tracing::info!(
            "resuming {}: {} completed, {} failed, {} in flight to re-issue",
            run_dir.display(),
            resumed.done.len(),
            resumed.failed.len(),
            resumed.requeue.len()
        );
    }
    let journal = Journal::open(&run_dir)?;
    let progress = progress::ProgressView::new(args.live);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let cfg2 = cfg.clone();
    let cfg2_checkpoints = cfg.checkpoints.clone();
    let with_baselines = cfg.search.baselines && cfg.checkpoints.len() >= 3;
    let (sched, stop_reason, refs) = rt.block_on(async move {
        let mut sched = Scheduler::new(
            cfg2,
            secret,
            journal,
            run_dir.clone(),
            resumed,
            progress,
            local_gpus,
        );
        let labels: Vec<String> = cfg2_checkpoints
            .iter()
            .map(|p| report::checkpoint_label(p))
            .collect();
        let mut refs: Vec<report::Reference> = Vec::new();
        if with_baselines {
            refs = baselines::score(&mut sched, &labels, &run_dir).await?;
            let told = baselines::tell(&mut sched.opt, &refs);
            if told > 0 {
                tracing::info!("{told} baselines are points of the search space: the optimiser starts from them");
            }
        }
        let stop = sched.run().await?;
        tracing::info!("search stopped: {stop}");
        // Without baselines: each source, the uniform average and the best found, scored
        // now; with them, the best found only.
        let points = if with_baselines {
            report::best_point(report::best_done(&sched.done))
                .into_iter()
                .collect()
        } else {
            report::reference_points(&sched.opt.space, &labels, report::best_done(&sched.done))
        };
        let replies = sched
            .score_points(&points.iter().map(|p| p.weights.clone()).collect::<Vec<_>>())
            .await?;
        sched.shutdown_workers().await;
        let objective = sched.objective().clone();
        refs.extend(
            points
                .into_iter()
                .zip(replies)
                .map(|(point, reply)| report::Reference::new(point, reply.scores, &objective)),
        );
        anyhow::Ok((sched, stop, refs))
    })?;
    drop(rt);

    let run_dir = args.run_dir.clone();
    let best = report::best_done(&sched.done).cloned();
    let merged = match (&best, cfg.output.merge) {
        (Some(Record::Done { weights, .. }), true) => {
            let groups = match &cfg.space {
                SpaceConfig::Groups { groups } => Some(groups.clone()),
                _ => None,
            };
            let req = MergeRequest {
                sources: cfg.checkpoints.clone(),
                weights: sched.opt.space.merge_weights(weights),
                out: run_dir.join("merged"),
                dtype: cfg.dtype()?,
                max_shard_bytes: cfg.max_shard_bytes()?,
                force: true,
                provenance: serde_json::json!({
                    "search": run_dir.join(JOURNAL_FILE),
                    "weights": weights,
                }),
                groups,
                part: None,
            };
            let s =
                merge_to_dir(&req, &()).context("writing the merged model of the best weights")?;
            tracing::info!("wrote the merged model to {}", s.out.display());
            Some(s.out)
        }
        _ => None,
    };
    let summary = report::RunSummary {
        workers: sched.worker_summaries(),
        done: sched.done,
        failed: sched.failed,
        stop_reason,
        wall_seconds: t0.elapsed().as_secs_f64(),
        merged_model: merged,
    };
    let report = report::Report::build(&cfg, &model, summary, refs);
    report.write(&run_dir, cfg.output.plots.then_some(&sched.opt))?;
    Ok(SearchOutcome { report, run_dir })
}
