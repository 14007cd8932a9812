//! Asynchronous scheduling of trials onto workers.
//!
//! One event loop owns all state: the optimiser, the journal, the trials in flight and
//! one slot per worker. Tasks (connects, loads, evaluations, heartbeats) only send events
//! back; each carries its slot's connection generation, so an event from a connection
//! that was already given up is ignored and no result is counted twice.
//!
//! Policy (the trial queue and retries are `trials.rs`, unit-tested there):
//! - each idle worker at once gets the next trial: a requeued one it has not tried yet,
//!   else a new proposal conditioned on every trial still pending;
//! - an evaluation past its deadline, a broken connection or missed heartbeats make the
//!   worker lost: its trial goes back to the queue, the worker is reconnected with
//!   backoff (it must load again, which a worker that kept its state answers at once);
//! - a trial is recorded failed after `max_attempts` attempts, on different workers where
//!   there are any;
//! - every result is journaled and synced before the optimiser sees it.
//!
//! Size: the connection state machine, heartbeats and the report's reference scoring are
//! still here (the trial policy moved to `trials.rs`); splitting them is pending
//! (docs/ARCHITECTURE.md).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ckmerge_common::protocol::{
    self, context_with_timeout, EvalReply, EvalRequest, HandshakeError, LoadReport, LoadSpec,
    Secret, WorkerApiClient, PROTOCOL_VERSION,
};
use ckmerge_worker::serve::{in_process_client, WorkerService};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::config::SearchConfig;
use super::journal::{now, Journal, Record};
use super::progress::ProgressView;
use super::trials::{AfterFailure, Trials};
use crate::bo::Optimizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not connected; a remote worker is retried at `retry_at`.
    Down,
    Connecting,
    Loading,
    Idle,
    Busy(u64),
    /// Refused us (secret, version) or could not load: not retried.
    Failed,
}

enum Kind {
    /// A worker's address, and the addresses of the further stages it heads (if any).
    Remote(String, Vec<String>),
    Local(WorkerService),
}

struct Slot {
    name: String,
    kind: Kind,
    gen: u64,
    state: State,
    client: Option<WorkerApiClient>,
    retry_at: Instant,
    backoff: Duration,
    tasks: Vec<AbortHandle>,
    report: Option<LoadReport>,
    evaluations: usize,
    last_error: Option<String>,
}

impl Slot {
    fn usable(&self) -> bool {
        matches!(self.state, State::Loading | State::Idle | State::Busy(_))
    }
    fn live(&self) -> bool {
        self.usable() || self.state == State::Connecting
    }
    fn stop_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

enum AttemptError {
    /// The worker answered with an error; it is healthy.
    Eval(String),
    /// The call did not complete: the worker is lost.
    Lost(String),
}

enum Ev {
    Connected {
        slot: usize,
        gen: u64,
        client: WorkerApiClient,
    },
    ConnectFailed {
        slot: usize,
        gen: u64,
        error: String,
        permanent: bool,
    },
    Loaded {
        slot: usize,
        gen: u64,
        report: LoadReport,
    },
    LoadFailed {
        slot: usize,
        gen: u64,
        error: String,
        lost: bool,
    },
    Finished {
        slot: usize,
        gen: u64,
        trial: u64,
        result: Result<EvalReply, AttemptError>,
    },
    HeartbeatLost {
        slot: usize,
        gen: u64,
        error: String,
    },
}

/// What a worker did during the run, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerSummary {
    pub name: String,
    pub host: Option<String>,
    pub device: Option<String>,
    pub load_seconds: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub evaluations: usize,
    /// Scored tokens per second of evaluation (this session's and earlier ones').
    pub tokens_per_s: Option<f64>,
    pub last_error: Option<String>,
}

pub struct Scheduler {
    cfg: SearchConfig,
    spec: LoadSpec,
    secret: Option<Secret>,
    slots: Vec<Slot>,
    tx: mpsc::UnboundedSender<Ev>,
    rx: mpsc::UnboundedReceiver<Ev>,
    pub opt: Optimizer,
    journal: Journal,
    run_dir: PathBuf,
    /// Trials issued and not finished, and the retry policy.
    trials: Trials,
    /// Completed trials (journal `done` records), including those of earlier sessions.
    pub done: Vec<Record>,
    pub failed: Vec<Record>,
    started: Instant,
    last_usable: Instant,
    stop_note: Option<String>,
    progress: ProgressView,
    /// Seconds per completed evaluation (wall, on the worker), for the ETA.
    eval_seconds: Vec<f64>,
    /// Workers waiting for the rest of their pipeline (`workers.stages` > 1).
    forming: Vec<String>,
}

/// A trial that was in flight when the coordinator stopped.
pub struct Requeued {
    pub id: u64,
    pub u: Vec<f64>,
    pub weights: Vec<f64>,
    /// (worker, error) of its failed attempts.
    pub errors: Vec<(String, String)>,
}

/// Where the run stood when its journal was read back.
pub struct Resumed {
    pub opt: Optimizer,
    pub done: Vec<Record>,
    pub failed: Vec<Record>,
    /// In-flight trials to re-issue first.
    pub requeue: Vec<Requeued>,
    pub next_id: u64,
}

impl Scheduler {
    pub fn new(
        cfg: SearchConfig,
        secret: Option<Secret>,
        journal: Journal,
        run_dir: PathBuf,
        resumed: Resumed,
        progress: ProgressView,
        local_gpus: Option<Vec<usize>>,
    ) -> Scheduler {
        let (tx, rx) = mpsc::unbounded_channel();
        let spec = cfg.load_spec();
        let mut s = Scheduler {
            spec,
            secret,
            forming: Vec::new(),
            slots: Vec::new(),
            tx,
            rx,
            opt: resumed.opt,
            journal,
            run_dir,
            trials: Trials::new(resumed.next_id, cfg.workers.max_attempts),
            done: resumed.done,
            failed: resumed.failed,
            started: Instant::now(),
            last_usable: Instant::now(),
            stop_note: None,
            progress,
            eval_seconds: Vec::new(),
            cfg,
        };
        for r in resumed.requeue {
            s.trials.requeue(r.id, r.u, r.weights, r.errors);
        }
        if s.cfg.workers.addresses.is_empty()
            && s.cfg.workers.pipelines.is_empty()
            && s.cfg.workers.addresses_file.is_none()
        {
            let n = s.cfg.workers.local.unwrap_or(1).max(1);
            for i in 0..n {
                let w = WorkerService::with_options(None, None, local_gpus.clone());
                s.add_slot(format!("local-{i}"), Kind::Local(w));
            }
        } else {
            for a in s.cfg.workers.addresses.clone() {
                s.add_worker(a);
            }
            for p in s.cfg.workers.pipelines.clone() {
                s.add_slot(p.join(" > "), Kind::Remote(p[0].clone(), p[1..].to_vec()));
            }
            s.read_addresses_file();
        }
        s
    }

    fn add_slot(&mut self, name: String, kind: Kind) {
        self.slots.push(Slot {
            name,
            kind,
            gen: 0,
            state: State::Down,
            client: None,
            retry_at: Instant::now(),
            backoff: Duration::from_millis(500),
            tasks: Vec::new(),
            report: None,
            evaluations: 0,
            last_error: None,
        });
    }

    /// Adds workers listed in `workers.addresses_file` that are not known yet.
    fn read_addresses_file(&mut self) {
        let Some(f) = self.cfg.workers.addresses_file.clone() else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(&f) else {
            return; // not written yet: workers have not started
        };
        for a in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let known = self.forming.iter().any(|x| x == a)
                || self
                    .slots
                    .iter()
                    .any(|s| s.name.split(" > ").any(|x| x == a));
            if !known {
                tracing::info!("worker {a} joined (from {})", f.display());
                self.add_worker(a.to_string());
            }
        }
    }

    /// A worker address: a slot of its own, or, with `workers.stages` = k > 1, the next
    /// stage of the pipeline being formed (a slot once it has k workers).
    fn add_worker(&mut self, a: String) {
        let k = self.cfg.workers.stages.max(1);
        if k == 1 {
            self.add_slot(a.clone(), Kind::Remote(a, Vec::new()));
            return;
        }
        self.forming.push(a);
        if self.forming.len() == k {
            let p = std::mem::take(&mut self.forming);
            tracing::info!("pipeline {} formed", p.join(" > "));
            self.add_slot(p.join(" > "), Kind::Remote(p[0].clone(), p[1..].to_vec()));
        }
    }

    fn successes(&self) -> usize {
        self.done.len()
    }

    /// Runs trials until the budget is spent or the search stops; returns why it stopped.
    pub async fn run(&mut self) -> Result<String> {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.on_tick();
            self.dispatch()?;
            self.progress.update(&self.view());
            if let Some(reason) = self.finished() {
                self.progress.finish();
                return Ok(reason);
            }
            self.check_workers()?;
            tokio::select! {
                Some(ev) = self.rx.recv() => self.handle(ev)?,
                _ = tick.tick() => {}
            }
        }
    }

    fn view(&self) -> super::progress::View {
        let best = self.done.iter().filter_map(|r| match r {
            Record::Done {
                perplexity,
                weights,
                ..
            } => Some((*perplexity, weights.clone())),
            _ => None,
        });
        let best = best.min_by(|a, b| a.0.total_cmp(&b.0));
        let mean_eval = if self.eval_seconds.is_empty() {
            None
        } else {
            Some(self.eval_seconds.iter().sum::<f64>() / self.eval_seconds.len() as f64)
        };
        super::progress::View {
            done: self.successes(),
            max: self.cfg.search.max_evals,
            in_flight: self
                .slots
                .iter()
                .filter(|s| matches!(s.state, State::Busy(_)))
                .count(),
            workers: self.slots.iter().filter(|s| s.usable()).count(),
            best,
            mean_eval_seconds: mean_eval,
        }
    }

    fn on_tick(&mut self) {
        self.read_addresses_file();
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if self.slots[i].state == State::Down && self.slots[i].retry_at <= now {
                self.start(i);
            }
        }
        if self.slots.iter().any(Slot::usable) {
            self.last_usable = now;
        }
    }

    /// Connects (remote) or attaches (local) slot `i`, then loads.
    fn start(&mut self, i: usize) {
        let tx = self.tx.clone();
        let s = &mut self.slots[i];
        s.gen += 1;
        let gen = s.gen;
        match &s.kind {
            Kind::Local(svc) => {
                let client = in_process_client(svc.clone());
                let _ = tx.send(Ev::Connected {
                    slot: i,
                    gen,
                    client,
                });
                s.state = State::Connecting;
            }
            Kind::Remote(addr, _) => {
                let Some(secret) = self.secret.clone() else {
                    s.state = State::Failed;
                    s.last_error = Some("no secret configured".into());
                    return;
                };
                let addr = addr.clone();
                s.state = State::Connecting;
                let h = tokio::spawn(async move {
                    let ev = match protocol::connect(&addr, &secret, PROTOCOL_VERSION).await {
                        Ok(client) => Ev::Connected {
                            slot: i,
                            gen,
                            client,
                        },
                        Err(e) => Ev::ConnectFailed {
                            slot: i,
                            gen,
                            permanent: matches!(
                                e,
                                HandshakeError::Auth
                                    | HandshakeError::Version { .. }
                                    | HandshakeError::NotCkmerge
                            ),
                            error: e.to_string(),
                        },
                    };
                    let _ = tx.send(ev);
                });
                s.tasks.push(h.abort_handle());
            }
        }
    }

    fn handle(&mut self, ev: Ev) -> Result<()> {
        let (slot, gen) = match &ev {
            Ev::Connected { slot, gen, .. }
            | Ev::ConnectFailed { slot, gen, .. }
            | Ev::Loaded { slot, gen, .. }
            | Ev::LoadFailed { slot, gen, .. }
            | Ev::Finished { slot, gen, .. }
            | Ev::HeartbeatLost { slot, gen, .. } => (*slot, *gen),
        };
        if self.slots[slot].gen != gen {
            return Ok(()); // from a connection already given up
        }
        match ev {
            Ev::Connected { client, .. } => self.on_connected(slot, client),
            Ev::ConnectFailed {
                error, permanent, ..
            } => {
                let s = &mut self.slots[slot];
                s.stop_tasks();
                if permanent {
                    tracing::error!("worker {} refused: {error}", s.name);
                    s.state = State::Failed;
                } else {
                    if s.last_error.as_deref() != Some(&error) {
                        tracing::debug!("worker {} not reachable: {error}", s.name);
                    }
                    s.state = State::Down;
                    s.retry_at = Instant::now() + s.backoff;
                    s.backoff = (s.backoff * 2).min(Duration::from_secs(10));
                }
                s.last_error = Some(error);
            }
            Ev::Loaded { report, .. } => {
                let s = &mut self.slots[slot];
                tracing::info!(
                    "worker {} ready on {} ({}): {} in {:.2} s, {} MB resident",
                    s.name,
                    report.info.host,
                    report.info.device,
                    if report.cached {
                        "sources already loaded"
                    } else {
                        "loaded sources and data"
                    },
                    report.seconds,
                    report.rss_bytes / 1_000_000
                );
                s.state = State::Idle;
                s.backoff = Duration::from_millis(500);
                s.report = Some(report);
            }
            Ev::LoadFailed { error, lost, .. } => {
                if lost {
                    self.lose(slot, format!("lost while loading: {error}"));
                } else {
                    let s = &mut self.slots[slot];
                    tracing::error!("worker {} could not load: {error}", s.name);
                    s.stop_tasks();
                    s.state = State::Failed;
                    s.last_error = Some(error);
                }
            }
            Ev::Finished { trial, result, .. } => self.on_finished(slot, trial, result)?,
            Ev::HeartbeatLost { error, .. } => self.lose(slot, error),
        }
        Ok(())
    }

    fn on_connected(&mut self, i: usize, client: WorkerApiClient) {
        let tx = self.tx.clone();
        let w = &self.cfg.workers;
        let (load_deadline, hb, hb_timeout) = (
            Duration::from_secs_f64(w.load_deadline_s),
            Duration::from_secs_f64(w.heartbeat_s),
            Duration::from_secs_f64(w.heartbeat_timeout_s),
        );
        let s = &mut self.slots[i];
        let gen = s.gen;
        s.state = State::Loading;
        s.client = Some(client.clone());
        let mut spec = self.spec.clone();
        if let Kind::Remote(_, rest) = &s.kind {
            spec.pipeline = rest.clone();
        }
        let c = client.clone();
        let h = tokio::spawn(async move {
            let ev = match c.load(context_with_timeout(load_deadline), spec).await {
                Ok(Ok(report)) => Ev::Loaded {
                    slot: i,
                    gen,
                    report,
                },
                Ok(Err(error)) => Ev::LoadFailed {
                    slot: i,
                    gen,
                    error: error.message,
                    lost: false,
                },
                Err(e) => Ev::LoadFailed {
                    slot: i,
                    gen,
                    error: e.to_string(),
                    lost: true,
                },
            };
            let _ = tx.send(ev);
        });
        s.tasks.push(h.abort_handle());
        if matches!(s.kind, Kind::Remote(..)) {
            let tx = self.tx.clone();
            let h = tokio::spawn(async move {
                let mut last_ok = Instant::now();
                loop {
                    tokio::time::sleep(hb).await;
                    let probe = tokio::time::timeout(
                        hb_timeout,
                        client.status(context_with_timeout(hb_timeout)),
                    )
                    .await;
                    match probe {
                        Ok(Ok(_)) => last_ok = Instant::now(),
                        Ok(Err(tarpc::client::RpcError::DeadlineExceeded)) | Err(_)
                            if last_ok.elapsed() < hb_timeout => {}
                        other => {
                            let why = match other {
                                Ok(Err(e)) => e.to_string(),
                                _ => "no answer".into(),
                            };
                            let _ = tx.send(Ev::HeartbeatLost {
                                slot: i,
                                gen,
                                error: format!(
                                    "no heartbeat for {:.0} s ({why})",
                                    last_ok.elapsed().as_secs_f64()
                                ),
                            });
                            return;
                        }
                    }
                }
            });
            s.tasks.push(h.abort_handle());
        }
    }

    /// Gives up on slot `i`'s connection; its trial, if any, goes back to the queue.
    fn lose(&mut self, i: usize, why: String) {
        let s = &mut self.slots[i];
        tracing::warn!("worker {} lost: {why}", s.name);
        s.stop_tasks();
        s.gen += 1;
        s.client = None;
        s.last_error = Some(why.clone());
        let trial = match s.state {
            State::Busy(t) => Some(t),
            _ => None,
        };
        match s.kind {
            Kind::Remote(..) => {
                s.state = State::Down;
                s.retry_at = Instant::now() + s.backoff;
            }
            // An in-process worker that missed its deadline is still computing; it is not
            // given work again.
            Kind::Local(_) => s.state = State::Failed,
        }
        let name = s.name.clone();
        if let Some(t) = trial {
            if let Err(e) = self.attempt_failed(t, name, format!("worker lost: {why}")) {
                tracing::error!("{e:#}");
            }
        }
    }

    fn on_finished(
        &mut self,
        i: usize,
        trial: u64,
        result: Result<EvalReply, AttemptError>,
    ) -> Result<()> {
        let name = self.slots[i].name.clone();
        let result = match result {
            Err(AttemptError::Lost(e)) => {
                self.lose(i, e);
                return Ok(());
            }
            Err(AttemptError::Eval(e)) => Err(e),
            Ok(r) if !r.scores.first().is_some_and(|s| s.mean_nll.is_finite()) => Err(format!(
                "the objective was {:?} (diverged merge?)",
                r.scores.first().map(|s| s.mean_nll)
            )),
            Ok(r) => Ok(r),
        };
        let s = &mut self.slots[i];
        s.state = State::Idle;
        s.tasks.retain(|t| !t.is_finished());
        match result {
            Err(e) => self.attempt_failed(trial, name, e),
            Ok(r) => {
                s.evaluations += 1;
                let t = self.trials.succeeded(trial);
                let obj = &r.scores[0];
                let rec = Record::Done {
                    trial,
                    u: t.u.clone(),
                    weights: t.weights.clone(),
                    worker: name.clone(),
                    mean_nll: obj.mean_nll,
                    perplexity: obj.perplexity,
                    tokens: obj.tokens,
                    merge_seconds: r.merge_seconds,
                    eval_seconds: r.eval_seconds,
                    time: now(),
                };
                self.journal.append(&rec)?;
                self.opt.tell(t.u.clone(), Ok(obj.mean_nll));
                self.save_snapshot();
                if let Some(at) = t.issued_at {
                    self.eval_seconds.push(at.elapsed().as_secs_f64());
                }
                self.progress
                    .trial_done(trial, &name, &t.weights, obj.perplexity, obj.mean_nll);
                self.done.push(rec);
                Ok(())
            }
        }
    }

    fn attempt_failed(&mut self, trial: u64, worker: String, error: String) -> Result<()> {
        match self
            .trials
            .attempt_failed(trial, worker.clone(), error.clone())
        {
            AfterFailure::Failed(t) => {
                tracing::warn!(
                    "trial {trial} failed {} times; recorded as failed: {error}",
                    t.errors.len()
                );
                let rec = Record::Failed {
                    trial,
                    u: t.u.clone(),
                    weights: t.weights.clone(),
                    errors: t.errors.clone(),
                    time: now(),
                };
                self.journal.append(&rec)?;
                let why = t
                    .errors
                    .iter()
                    .map(|(w, e)| format!("{w}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                self.opt.tell(t.u, Err(why));
                self.save_snapshot();
                self.failed.push(rec);
            }
            AfterFailure::Requeued => {
                tracing::warn!("trial {trial} on {worker} failed ({error}); requeued");
                self.journal.append(&Record::Retry {
                    trial,
                    worker,
                    error,
                    time: now(),
                })?;
            }
        }
        Ok(())
    }

    /// Writes the optimiser state beside the journal (atomically). The journal stays the
    /// source of truth; the snapshot lets a resume keep the hyperparameters and the
    /// GP-Hedge gains.
    fn save_snapshot(&self) {
        let path = self.run_dir.join(super::SNAPSHOT_FILE);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec(&self.opt).expect("the optimiser serialises");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
            tracing::warn!("could not save {}: {e}", path.display());
        }
    }

    fn can_issue_new(&self) -> bool {
        self.stop_note.is_none()
            && self
                .opt
                .stop_reason(self.started.elapsed().as_secs_f64())
                .is_none()
            && self.successes() + self.trials.len() < self.cfg.search.max_evals
    }

    /// Gives every idle worker a trial, as long as there are trials to give.
    fn dispatch(&mut self) -> Result<()> {
        loop {
            let idle: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].state == State::Idle)
                .collect();
            let mut issued = false;
            for i in idle {
                if let Some(t) = self.pick(i)? {
                    self.issue(i, t)?;
                    issued = true;
                }
            }
            if !issued {
                return Ok(());
            }
        }
    }

    fn pick(&mut self, i: usize) -> Result<Option<u64>> {
        let live: Vec<&str> = self
            .slots
            .iter()
            .filter(|s| s.live())
            .map(|s| s.name.as_str())
            .collect();
        if let Some(t) = self.trials.pick_queued(&self.slots[i].name, &live) {
            return Ok(Some(t));
        }
        if !self.can_issue_new() {
            return Ok(None);
        }
        match self.opt.propose(1, &self.trials.pending_points()) {
            Ok(mut v) => {
                let u = v.remove(0);
                let weights = self.opt.space.weights(&u);
                Ok(Some(self.trials.add(u, weights)))
            }
            Err(e) => {
                tracing::warn!("no further proposal: {e}");
                self.stop_note = Some(format!("no further proposal: {e}"));
                Ok(None)
            }
        }
    }

    fn issue(&mut self, i: usize, id: u64) -> Result<()> {
        let t = self.trials.start(id);
        let s = &mut self.slots[i];
        self.journal.append(&Record::Issued {
            trial: id,
            u: t.u.clone(),
            weights: t.weights.clone(),
            worker: s.name.clone(),
            attempt: t.errors.len() + 1,
            time: now(),
        })?;
        let req = EvalRequest {
            trial: id,
            weights: self.opt.space.merge_weights(&t.weights),
            all_datasets: false,
        };
        tracing::debug!("trial {id} -> {}: {:?}", s.name, t.weights);
        s.state = State::Busy(id);
        let client = s.client.clone().expect("idle workers are connected");
        let (tx, gen) = (self.tx.clone(), s.gen);
        let deadline = Duration::from_secs_f64(self.cfg.workers.deadline_s);
        let h = tokio::spawn(async move {
            let r = tokio::time::timeout(
                deadline + Duration::from_secs(1),
                client.evaluate(context_with_timeout(deadline), req),
            )
            .await;
            let result = match r {
                Ok(Ok(Ok(reply))) => Ok(reply),
                Ok(Ok(Err(e))) => Err(AttemptError::Eval(e.message)),
                Ok(Err(tarpc::client::RpcError::DeadlineExceeded)) | Err(_) => Err(
                    AttemptError::Lost(format!("evaluation passed its {deadline:?} deadline")),
                ),
                Ok(Err(e)) => Err(AttemptError::Lost(e.to_string())),
            };
            let _ = tx.send(Ev::Finished {
                slot: i,
                gen,
                trial: id,
                result,
            });
        });
        s.tasks.push(h.abort_handle());
        Ok(())
    }

    fn finished(&self) -> Option<String> {
        if !self.trials.is_empty() || self.can_issue_new() {
            return None;
        }
        if let Some(n) = &self.stop_note {
            return Some(n.clone());
        }
        Some(
            match self.opt.stop_reason(self.started.elapsed().as_secs_f64()) {
                Some(crate::bo::StopReason::MaxEvals) | None => {
                    format!("{} evaluations done", self.successes())
                }
                Some(crate::bo::StopReason::WallTime) => "wall-time budget spent".into(),
                Some(crate::bo::StopReason::Converged) => "converged".into(),
            },
        )
    }

    /// Fails the run when no worker can be used and none can come back.
    fn check_workers(&self) -> Result<()> {
        if self.slots.iter().any(Slot::live) {
            return Ok(());
        }
        let reasons = || {
            self.slots
                .iter()
                .map(|s| {
                    format!(
                        "  {}: {}",
                        s.name,
                        s.last_error.as_deref().unwrap_or("not started")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let can_come_back = self.slots.iter().any(|s| s.state == State::Down)
            || self.cfg.workers.addresses_file.is_some();
        if self.slots.is_empty() && self.cfg.workers.addresses_file.is_some() {
            // Waiting for the launcher to write the first address.
        } else if !can_come_back {
            bail!(
                "no worker can be used:\n{}\nthe journal keeps every completed trial: fix the workers and continue with --resume",
                reasons()
            );
        }
        if self.last_usable.elapsed().as_secs_f64() > self.cfg.workers.wait_s {
            bail!(
                "no worker usable for {:.0} s (workers.wait_s):\n{}\nthe journal keeps every completed trial: continue with --resume",
                self.cfg.workers.wait_s,
                reasons()
            );
        }
        Ok(())
    }

    /// Scores each point on every data set, spread over the usable workers (for the
    /// report). Not journaled: these are recomputed on a resume.
    pub async fn score_points(&mut self, points: &[Vec<f64>]) -> Result<Vec<EvalReply>> {
        let mut todo: VecDeque<usize> = (0..points.len()).collect();
        let mut out: Vec<Option<EvalReply>> = vec![None; points.len()];
        let mut running = FuturesUnordered::new();
        let mut busy = vec![false; self.slots.len()];
        // `deadline_s` is for one trial, which scores the objective only; these score every
        // data set, so the deadline grows with the tokens they add.
        let factor = self
            .slots
            .iter()
            .find_map(|s| s.report.as_ref())
            .map(|r| {
                let total: usize = r.datasets.iter().map(|d| d.tokens).sum();
                let objective = r.datasets.first().map_or(0, |d| d.tokens);
                if objective == 0 {
                    1.0
                } else {
                    (total as f64 / objective as f64).max(1.0)
                }
            })
            .unwrap_or(1.0);
        let deadline = Duration::from_secs_f64(self.cfg.workers.deadline_s * factor);
        loop {
            for (i, in_use) in busy.iter_mut().enumerate() {
                if todo.is_empty() {
                    break;
                }
                if *in_use || self.slots[i].state != State::Idle {
                    continue;
                }
                let k = todo.pop_front().expect("not empty");
                let client = self.slots[i]
                    .client
                    .clone()
                    .expect("idle workers are connected");
                let req = EvalRequest {
                    trial: u64::MAX - k as u64,
                    weights: self.opt.space.merge_weights(&points[k]),
                    all_datasets: true,
                };
                *in_use = true;
                running.push(async move {
                    let r = client.evaluate(context_with_timeout(deadline), req).await;
                    (i, k, r)
                });
            }
            let Some((i, k, r)) = running.next().await else {
                if todo.is_empty() {
                    break;
                }
                // Nothing running and no idle worker: on a resume of a finished run no
                // worker has connected yet, and a lost one may come back. Drive the
                // connections until one is ready, or fail as a search does when none can.
                self.on_tick();
                self.check_workers()
                    .context("no worker left to score the report's reference points")?;
                tokio::select! {
                    Some(ev) = self.rx.recv() => self.handle(ev)?,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                busy.resize(self.slots.len(), false);
                continue;
            };
            busy[i] = false;
            match r {
                Ok(Ok(reply)) => out[k] = Some(reply),
                Ok(Err(e)) => bail!("scoring weights {:?} for the report: {e}", points[k]),
                Err(e) => {
                    self.lose(i, e.to_string());
                    todo.push_front(k);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every point scored"))
            .collect())
    }

    pub fn worker_summaries(&self) -> Vec<WorkerSummary> {
        self.slots
            .iter()
            .map(|s| WorkerSummary {
                name: s.name.clone(),
                host: s.report.as_ref().map(|r| r.info.host.clone()),
                device: s.report.as_ref().map(|r| r.info.device.clone()),
                load_seconds: s.report.as_ref().map(|r| r.seconds),
                rss_bytes: s.report.as_ref().map(|r| r.rss_bytes),
                evaluations: s.evaluations,
                tokens_per_s: {
                    let (mut tok, mut sec) = (0.0, 0.0);
                    for r in &self.done {
                        if let Record::Done {
                            worker,
                            tokens,
                            eval_seconds,
                            ..
                        } = r
                        {
                            if *worker == s.name {
                                tok += *tokens as f64;
                                sec += eval_seconds;
                            }
                        }
                    }
                    (sec > 0.0).then(|| tok / sec)
                },
                last_error: s.last_error.clone(),
            })
            .collect()
    }

    /// Asks remote workers to exit (the launcher started them for this run).
    pub async fn shutdown_workers(&mut self) {
        let mut calls = Vec::new();
        for s in &mut self.slots {
            s.stop_tasks();
            if let (Kind::Remote(..), Some(c)) = (&s.kind, s.client.take()) {
                calls.push(async move {
                    let _ = c
                        .shutdown(context_with_timeout(Duration::from_secs(5)))
                        .await;
                });
            }
        }
        futures::future::join_all(calls).await;
    }
}
