//! The worker service: the in-memory merge-and-evaluate API ([`crate::eval::Evaluator`])
//! behind the tarpc protocol of `ckmerge_common::protocol`, served over authenticated TCP
//! (`ckmerge worker`) or over an in-memory channel (the in-process workers of an embedded
//! search: same code path, no network).
//!
//! One evaluator per worker. Loads and evaluations take one FIFO lock, so concurrent
//! evaluate calls queue instead of running over each other; `status` never takes it, so
//! heartbeats are answered while an evaluation runs.
//!
//! Size: the service has three request paths (a whole model, a pipeline's head streaming
//! batches through the stages, a later stage), each with its panic and deadline handling.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckmerge_common::protocol::{
    self, hostname, ChoiceRow, DatasetScore, EvalReply, EvalRequest, LoadReport, LoadSpec,
    LoadedDataset, PipelineStage, Secret, StageReply, StageRequest, WorkerApi, WorkerApiClient,
    WorkerError, WorkerErrorKind, WorkerInfo, WorkerStatus, PROTOCOL_VERSION,
};
use std::panic::AssertUnwindSafe;

use ckmerge_common::MergeWeights;

use futures::{FutureExt, StreamExt};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;

use crate::eval::{Batch, EvalError, EvalOptions, Evaluator, StageOutput};
use crate::tenancy::{Conn, Tenancy};

struct Loaded {
    spec: LoadSpec,
    report: LoadReport,
    ev: Option<Arc<std::sync::Mutex<Evaluator>>>,
    /// The next pipeline stage's worker, on every stage but the last.
    next: Option<WorkerApiClient>,
    /// Stages of the pipeline this worker heads or belongs to (1: the whole model).
    stages: usize,
}

impl Loaded {
    /// How many leading data sets a trial scores (see `LoadSpec::objective_sets`).
    fn objective_sets(&self) -> usize {
        self.spec.objective_sets.clamp(1, self.spec.datasets.len())
    }
}

struct Inner {
    loaded: tokio::sync::Mutex<Option<Loaded>>,
    is_loaded: AtomicBool,
    /// The trial being evaluated, if any.
    running: std::sync::Mutex<Option<u64>>,
    queued: AtomicUsize,
    evaluations: AtomicU64,
    started: Instant,
    shutdown: tokio::sync::Notify,
    info: WorkerInfo,
    bench_cost: Option<Duration>,
    /// The run's secret, for connecting to the next pipeline stage (TCP workers only).
    secret: Option<Secret>,
    /// CUDA ordinals to hold the model on; None: CPU.
    gpus: Option<Vec<usize>>,
    /// `gpus` came from `--gpus auto`: work whose GPU path has not yet run on a GPU is
    /// held on the CPU instead ([`devices_for`]).
    gpus_auto: bool,
    /// Which search holds this worker (TCP workers).
    tenancy: Tenancy,
}

/// A worker's state, cheap to clone (tarpc clones the service per request).
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
    /// The TCP connection this clone serves; None in process (one search, no checks).
    conn: Option<Arc<Conn>>,
}

/// Decrements a counter when a waiting request finishes or is cancelled.
struct CountGuard<'a>(&'a AtomicUsize);
impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WorkerService {
    /// `bench_cost`: benchmark mode. Loading reads nothing and every evaluation sleeps
    /// this long and returns a fixed smooth function of the weights, so the scheduling
    /// overhead can be measured against evaluations of known cost. Never used by a search.
    /// `secret`: the run's secret, which a worker heading a pipeline connects to the
    /// next stage with. `gpus`: CUDA ordinals to hold the model on (None: CPU).
    pub fn with_options(
        bench_cost: Option<Duration>,
        secret: Option<Secret>,
        gpus: Option<Vec<usize>>,
    ) -> WorkerService {
        let threads = rayon::current_num_threads();
        WorkerService {
            inner: Arc::new(Inner {
                loaded: tokio::sync::Mutex::new(None),
                is_loaded: AtomicBool::new(false),
                running: std::sync::Mutex::new(None),
                queued: AtomicUsize::new(0),
                evaluations: AtomicU64::new(0),
                started: Instant::now(),
                shutdown: tokio::sync::Notify::new(),
                info: WorkerInfo {
                    host: hostname(),
                    pid: std::process::id(),
                    threads,
                    version: env!("CARGO_PKG_VERSION").into(),
                    device: match bench_cost {
                        Some(c) => format!("benchmark mode ({} ms per evaluation)", c.as_millis()),
                        None => format!("cpu ({threads} threads)"),
                    },
                },
                bench_cost,
                secret,
                gpus,
                gpus_auto: false,
                tenancy: Tenancy::default(),
            }),
            conn: None,
        }
    }

    /// Marks this worker's GPUs as chosen by `--gpus auto` (see [`devices_for`]). Called
    /// before the service is shared.
    pub fn gpus_chosen_automatically(mut self) -> WorkerService {
        Arc::get_mut(&mut self.inner)
            .expect("gpus_chosen_automatically before the service is shared")
            .gpus_auto = true;
        self
    }

    /// The service as one TCP connection from `peer` sees it.
    fn for_connection(&self, peer: String) -> WorkerService {
        WorkerService {
            inner: self.inner.clone(),
            conn: Some(Arc::new(Conn::new(peer))),
        }
    }

    /// Refuses a request on a connection of a search that does not hold this worker.
    fn check_tenant(&self) -> Result<(), String> {
        match &self.conn {
            Some(c) => self.inner.tenancy.check(c),
            None => Ok(()),
        }
    }

    /// Resolves when a client asked this worker to shut down.
    pub async fn shutdown_requested(&self) {
        self.inner.shutdown.notified().await
    }

    fn load_blocking(
        spec: &LoadSpec,
        mut info: WorkerInfo,
        gpus: &Option<Vec<usize>>,
        gpus_auto: bool,
    ) -> Result<Loaded, String> {
        let t0 = Instant::now();
        let gpus = &devices_for(spec, gpus, gpus_auto);
        let opts = EvalOptions {
            window: spec.window,
            groups: spec.groups.clone(),
            stage: stage_of(spec).filter(|s| s.count > 1),
            gpus: gpus.clone(),
        };
        let mut ev =
            Evaluator::load(&spec.checkpoints, &spec.datasets, &opts).map_err(|e| e.to_string())?;
        if let (Some(seed), false) = (spec.window_seed, ev.datasets.is_empty()) {
            // The objective's sets, each in its own fixed random order (a race samples
            // their prefixes).
            let k = spec.objective_sets.clamp(1, ev.datasets.len());
            for d in 0..k {
                ev.shuffle_units(d, ckmerge_common::race::set_seed(seed, d));
            }
        }
        if gpus.is_some() {
            info.device = ev.device();
        }
        let report = LoadReport {
            info,
            seconds: t0.elapsed().as_secs_f64(),
            rss_bytes: protocol::rss_bytes(),
            datasets: ev
                .datasets
                .iter()
                .map(|d| LoadedDataset {
                    name: d.name.clone(),
                    tokens: d.tokens(),
                    windows: d.units(),
                })
                .collect(),
            seq_len: ev.seq_len,
            parameters: ev.parameters(),
            cached: false,
        };
        Ok(Loaded {
            spec: spec.clone(),
            report,
            ev: Some(Arc::new(std::sync::Mutex::new(ev))),
            next: None,
            stages: stage_of(spec).map_or(1, |s| s.count),
        })
    }

    fn bench_value(weights: &MergeWeights) -> f64 {
        // A smooth bowl with its minimum inside the simplex / the lambda range.
        let w = &weights.groups()[0];
        let n = w.len() as f64;
        3.0 + w
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = (i as f64 + 1.0) / (n * (n + 1.0) / 2.0);
                (x as f64 - c).powi(2)
            })
            .sum::<f64>()
    }
}

/// The pipeline stage a load spec asks for: given by the previous stage, or stage 0 of
/// 1 + the number of further stages for a pipeline's head; None for a whole model.
/// The devices to load `spec` on: a worker's GPUs, except that GPUs chosen by `--gpus
/// auto` ("the best device for this work") give way to the CPU, said in the log, for work
/// whose GPU path has compiled but not yet run on a GPU: multiple-choice tasks, and the
/// model types `gpu::unverified_on_gpu` names. Explicit GPUs are kept. Every stage of a
/// pipeline decides alike (each is sent the same checkpoints and data sets).
fn devices_for(spec: &LoadSpec, gpus: &Option<Vec<usize>>, auto: bool) -> Option<Vec<usize>> {
    if gpus.is_none() || !auto {
        return gpus.clone();
    }
    let tasks = spec
        .datasets
        .iter()
        .any(|d| d.kind == protocol::SetKind::Task)
        .then_some("the GPU path of multiple-choice tasks has not been run on a GPU yet");
    let model = || {
        let t = crate::gpu::model_type(spec.checkpoints.first()?)?;
        crate::gpu::unverified_on_gpu(&t)
    };
    match tasks.or_else(model) {
        Some(why) => {
            tracing::info!("loading on the CPU (--gpus auto): {why}");
            None
        }
        None => gpus.clone(),
    }
}

fn stage_of(spec: &LoadSpec) -> Option<PipelineStage> {
    spec.stage
        .or((!spec.pipeline.is_empty()).then(|| PipelineStage {
            index: 0,
            count: spec.pipeline.len() + 1,
        }))
}

/// A context for a call to the next pipeline stage, under the caller's deadline.
fn downstream(ctx: &Context) -> Context {
    let mut c = tarpc::context::current();
    c.deadline = ctx.deadline;
    c
}

/// Hands one batch's hidden states to the next stage (with its multiple-choice rows, if
/// any); returns what the end of the pipeline made of it.
async fn pass_on(
    next: &WorkerApiClient,
    ctx: &Context,
    weights: MergeWeights,
    batch: Batch,
    rows: Vec<ChoiceRow>,
    hidden: Vec<f32>,
) -> Result<StageReply, String> {
    let req = StageRequest {
        weights,
        tokens: batch.tokens,
        seq: batch.seq,
        scored: batch.scored,
        hidden,
        rows,
    };
    next.stage_forward(downstream(ctx), req)
        .await
        .map_err(|e| format!("next pipeline stage: {e}"))?
        .map_err(|e| e.message)
}

/// A text batch's summed NLL from the end of the pipeline.
fn nll_of(r: StageReply) -> Result<f64, String> {
    match r {
        StageReply::Nll(n) => Ok(n),
        StageReply::LogProbs(_) => {
            Err("the next pipeline stage scored a text batch as multiple choice".into())
        }
    }
}

/// Batches sent down a pipeline from its head, on a blocking thread that holds the
/// head's evaluator: each handed to the next stage once the head's layers have run on
/// it, at most one in flight per stage (as `evaluate_pipeline` streams windows) so the
/// stages work at once; the replies in the order sent.
struct Downstream<'a> {
    next: &'a WorkerApiClient,
    ctx: Context,
    weights: &'a MergeWeights,
    limit: usize,
    rt: &'a tokio::runtime::Handle,
    in_flight: std::collections::VecDeque<tokio::task::JoinHandle<Result<StageReply, String>>>,
    out: Vec<StageReply>,
}

impl<'a> Downstream<'a> {
    fn new(
        next: &'a WorkerApiClient,
        ctx: &Context,
        weights: &'a MergeWeights,
        stages: usize,
        rt: &'a tokio::runtime::Handle,
    ) -> Self {
        Downstream {
            next,
            ctx: *ctx,
            weights,
            limit: stages.max(2),
            rt,
            in_flight: Default::default(),
            out: Vec::new(),
        }
    }

    fn wait_oldest(&mut self) -> Result<(), String> {
        if let Some(h) = self.in_flight.pop_front() {
            let r = self
                .rt
                .block_on(h)
                .map_err(|e| format!("stage panicked: {e}"))??;
            self.out.push(r);
        }
        Ok(())
    }

    /// The head's output on the next batch: scored already (a pipeline of one stage), or
    /// hidden states to send on.
    fn push(
        &mut self,
        batch: &Batch,
        rows: Vec<ChoiceRow>,
        out: StageOutput,
    ) -> Result<(), String> {
        let hidden = match out {
            StageOutput::Hidden(h) => h,
            StageOutput::Nll(n) => return self.ready(StageReply::Nll(n)),
            StageOutput::LogProbs(v) => return self.ready(StageReply::LogProbs(v)),
        };
        if self.in_flight.len() >= self.limit {
            self.wait_oldest()?;
        }
        let (next, ctx, weights, b) = (
            self.next.clone(),
            self.ctx,
            self.weights.clone(),
            batch.clone(),
        );
        self.in_flight.push_back(
            self.rt
                .spawn(async move { pass_on(&next, &ctx, weights, b, rows, hidden).await }),
        );
        Ok(())
    }

    /// A reply made at the head, after those still in flight (order kept).
    fn ready(&mut self, r: StageReply) -> Result<(), String> {
        self.drain()?;
        self.out.push(r);
        Ok(())
    }

    fn drain(&mut self) -> Result<(), String> {
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<StageReply>, String> {
        self.drain()?;
        Ok(self.out)
    }
}

/// A raced trial's next windows through a pipeline (see [`Downstream`]): their NLL sums
/// in order.
fn windows_through_stages(
    ev: &Evaluator,
    batches: &[Batch],
    mut down: Downstream,
) -> Result<Vec<f64>, String> {
    for b in batches {
        let out = ev.stage_forward(b, None).map_err(|e| e.to_string())?;
        down.push(b, Vec::new(), out)?;
    }
    down.finish()?.into_iter().map(nll_of).collect()
}

/// Multiple-choice requests through a pipeline (see [`Downstream`]), in the groups the
/// whole model scores them in ([`Evaluator::choice_groups`]): each request's
/// log-likelihood and greedy flag, in order.
fn choices_through_stages(
    ev: &mut Evaluator,
    requests: &[crate::choice::Request],
    mut down: Downstream,
) -> Result<Vec<(f64, bool)>, String> {
    let groups = ev.choice_groups(requests);
    for g in &groups {
        let (batch, rows) = Evaluator::choice_batch(requests, g);
        let out = ev
            .stage_forward_choices(&batch, &rows, None)
            .map_err(|e| e.to_string())?;
        down.push(&batch, rows, out)?;
    }
    let mut scored = vec![(0.0, false); requests.len()];
    for (g, r) in groups.iter().zip(down.finish()?) {
        match r {
            StageReply::LogProbs(v) if v.len() == g.len() => {
                for (&i, x) in g.iter().zip(v) {
                    scored[i] = x;
                }
            }
            _ => return Err("the next pipeline stage did not score every choice".into()),
        }
    }
    Ok(scored)
}

/// Merges the trial's weights: one vector, or one per tensor group.
fn apply_weights(ev: &mut Evaluator, weights: &MergeWeights) -> Result<(), String> {
    ev.merge(weights).map_err(|e| e.to_string())
}

/// A handler's outcome as a reply: its error message with the step it failed in, or a
/// panic's message.
fn reply<T>(
    outcome: Result<Result<T, String>, Box<dyn std::any::Any + Send>>,
    kind: WorkerErrorKind,
) -> Result<T, WorkerError> {
    match outcome {
        Ok(r) => r.map_err(|m| WorkerError::new(kind, m)),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(WorkerError::new(
                WorkerErrorKind::Panic,
                format!("the worker panicked: {what}"),
            ))
        }
    }
}

impl WorkerApi for WorkerService {
    // A panic in a handler would drop its reply and leave the coordinator waiting for
    // the deadline; catching it turns it into an error reply at once.
    async fn load(self, ctx: Context, spec: LoadSpec) -> Result<LoadReport, WorkerError> {
        let outcome = AssertUnwindSafe(self.load_inner(ctx, spec))
            .catch_unwind()
            .await;
        reply(outcome, WorkerErrorKind::Load)
    }

    async fn evaluate(self, ctx: Context, req: EvalRequest) -> Result<EvalReply, WorkerError> {
        let outcome = AssertUnwindSafe(self.evaluate_inner(ctx, req))
            .catch_unwind()
            .await;
        reply(outcome, WorkerErrorKind::Evaluate)
    }

    async fn stage_forward(
        self,
        ctx: Context,
        req: StageRequest,
    ) -> Result<StageReply, WorkerError> {
        let outcome = AssertUnwindSafe(self.stage_forward_inner(ctx, req))
            .catch_unwind()
            .await;
        reply(outcome, WorkerErrorKind::Stage)
    }

    async fn status(self, _: Context) -> WorkerStatus {
        self.status_now()
    }

    async fn shutdown(self, _: Context) {
        if let Err(e) = self.check_tenant() {
            tracing::warn!("shutdown refused: {e}");
            return;
        }
        tracing::info!("shutdown requested");
        // Let the reply go out before the process exits. A pipeline's head passes the
        // request on, so the whole group ends with it.
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let next = match tokio::time::timeout(Duration::from_secs(1), inner.loaded.lock()).await
            {
                Ok(g) => g.as_ref().and_then(|l| l.next.clone()),
                Err(_) => None,
            };
            if let Some(next) = next {
                let ctx = protocol::context_with_timeout(Duration::from_secs(2));
                if let Err(e) = next.shutdown(ctx).await {
                    tracing::warn!("could not shut the next pipeline stage down: {e}");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            inner.shutdown.notify_one();
        });
    }
}

impl WorkerService {
    async fn load_inner(self, ctx: Context, spec: LoadSpec) -> Result<LoadReport, String> {
        let t0 = Instant::now();
        if let Some(c) = &self.conn {
            self.inner
                .tenancy
                .claim(c, &spec.run, spec.stage.is_some())?;
        }
        let mut guard = self.inner.loaded.lock().await;
        if let Some(l) = guard.as_ref().filter(|l| l.spec == spec) {
            let mut r = l.report.clone();
            r.cached = true;
            return Ok(r);
        }
        // Free the previous run's sources before loading the next.
        *guard = None;
        self.inner.is_loaded.store(false, Ordering::SeqCst);
        let info = self.inner.info.clone();
        let loaded = if self.inner.bench_cost.is_some() {
            Loaded {
                report: LoadReport {
                    info,
                    seconds: 0.0,
                    rss_bytes: protocol::rss_bytes(),
                    datasets: spec
                        .datasets
                        .iter()
                        .map(|d| LoadedDataset {
                            name: d.name.clone(),
                            tokens: 0,
                            windows: 0,
                        })
                        .collect(),
                    seq_len: spec.window.seq_len.unwrap_or(0),
                    parameters: 0,
                    cached: false,
                },
                spec,
                ev: None,
                next: None,
                stages: 1,
            }
        } else {
            if let Some(PipelineStage { index: i, count: n }) = stage_of(&spec) {
                if spec.pipeline.len() + i + 1 != n {
                    return Err(format!(
                        "stage {i} of {n} was given {} further stage addresses",
                        spec.pipeline.len()
                    ));
                }
            }
            let s = spec.clone();
            let (gpus, auto) = (self.inner.gpus.clone(), self.inner.gpus_auto);
            let mut loaded =
                tokio::task::spawn_blocking(move || Self::load_blocking(&s, info, &gpus, auto))
                    .await
                    .map_err(|e| format!("loading panicked: {e}"))??;
            if let Some(addr) = spec.pipeline.first() {
                let (next, report) = self.load_next_stage(&ctx, &spec, addr).await?;
                loaded.report.parameters += report.parameters;
                loaded.report.rss_bytes += report.rss_bytes;
                loaded.report.seconds = t0.elapsed().as_secs_f64();
                loaded.report.info.device = format!(
                    "{}; then {addr}: {}",
                    loaded.report.info.device, report.info.device
                );
                loaded.next = Some(next);
            }
            if let Some(PipelineStage { index: i, count: n }) = stage_of(&spec) {
                let (first, last) = {
                    let ev = loaded.ev.as_ref().expect("loaded").lock().expect("fresh");
                    (ev.part().layers.start, ev.part().layers.end)
                };
                loaded.report.info.device = format!(
                    "stage {}/{n} (layers {first}..{last}) {}",
                    i + 1,
                    loaded.report.info.device
                );
            }
            loaded
        };
        tracing::info!(
            "loaded {} checkpoints in {:.2} s, {} MB resident",
            loaded.spec.checkpoints.len(),
            loaded.report.seconds,
            loaded.report.rss_bytes / 1_000_000
        );
        let report = loaded.report.clone();
        *guard = Some(loaded);
        self.inner.is_loaded.store(true, Ordering::SeqCst);
        Ok(report)
    }

    async fn evaluate_inner(self, ctx: Context, req: EvalRequest) -> Result<EvalReply, String> {
        self.check_tenant()?;
        let t0 = Instant::now();
        self.inner.queued.fetch_add(1, Ordering::SeqCst);
        let waiting = CountGuard(&self.inner.queued);
        let guard = self.inner.loaded.lock().await;
        drop(waiting);
        let queued_seconds = t0.elapsed().as_secs_f64();
        let loaded = guard
            .as_ref()
            .ok_or("this worker has nothing loaded; the coordinator must call load first")?;
        *self.inner.running.lock().expect("never poisoned") = Some(req.trial);
        let trial = req.trial;
        let result = if let Some(cost) = self.inner.bench_cost {
            tokio::time::sleep(cost).await;
            let v = Self::bench_value(&req.weights);
            Ok(EvalReply {
                trial,
                scores: vec![DatasetScore {
                    name: loaded.report.datasets[0].name.clone(),
                    tokens: 0,
                    mean_nll: v,
                    perplexity: v.exp(),
                    task: None,
                }],
                merge_seconds: 0.0,
                eval_seconds: cost.as_secs_f64(),
                tokens_per_s: 0.0,
                queued_seconds,
                units: Vec::new(),
                partial: None,
                versus_leader: None,
            })
        } else if let Some(next) = loaded.next.clone() {
            let ev = loaded.ev.clone().expect("loaded outside benchmark mode");
            let objective_sets = loaded.objective_sets();
            Self::evaluate_pipeline(
                ev,
                next,
                loaded.stages,
                ctx,
                req,
                queued_seconds,
                objective_sets,
            )
            .await
        } else {
            let ev = loaded.ev.clone().expect("loaded outside benchmark mode");
            let objective_sets = loaded.objective_sets();
            tokio::task::spawn_blocking(move || {
                let mut ev = ev.lock().map_err(|_| "evaluator poisoned by a panic")?;
                let t = Instant::now();
                apply_weights(&mut ev, &req.weights)?;
                let merge_seconds = t.elapsed().as_secs_f64();
                let n = if req.all_datasets {
                    ev.datasets.len()
                } else {
                    objective_sets
                };
                let t = Instant::now();
                let (mut through, mut scores) = (0, Vec::new());
                let (mut units, mut partial, mut versus_leader, mut first) =
                    (Vec::new(), None, None, 0);
                if let Some(race) = &req.race {
                    // The objective's sets raced together; the rest scored whole.
                    let r = ev
                        .score_race(objective_sets, race)
                        .map_err(|e| e.to_string())?;
                    for s in r.sets {
                        through += s.forward_tokens;
                        scores.push(s.score);
                    }
                    (units, partial, versus_leader, first) =
                        (r.units, r.partial, r.versus_leader, objective_sets);
                }
                for d in first..n.max(first) {
                    let r = ev.score_set(d).map_err(|e| e.to_string())?;
                    through += r.forward_tokens;
                    scores.push(r.score);
                }
                let eval_seconds = t.elapsed().as_secs_f64();
                Ok::<_, String>(EvalReply {
                    trial,
                    scores,
                    merge_seconds,
                    eval_seconds,
                    tokens_per_s: through as f64 / eval_seconds.max(1e-9),
                    queued_seconds,
                    units,
                    partial,
                    versus_leader,
                })
            })
            .await
            .map_err(|e| format!("evaluation panicked: {e}"))?
        };
        *self.inner.running.lock().expect("never poisoned") = None;
        self.inner.evaluations.fetch_add(1, Ordering::SeqCst);
        drop(guard);
        result
    }

    /// Connects to the next stage and loads the rest of the pipeline onto it (it loads the
    /// stage after it in turn, before answering).
    async fn load_next_stage(
        &self,
        ctx: &Context,
        spec: &LoadSpec,
        addr: &str,
    ) -> Result<(WorkerApiClient, LoadReport), String> {
        let secret = self.inner.secret.as_ref().ok_or(
            "a pipeline needs TCP workers (`ckmerge worker`), which hold the run's secret",
        )?;
        let next = protocol::connect(addr, secret, PROTOCOL_VERSION)
            .await
            .map_err(|e| format!("next pipeline stage {addr}: {e}"))?;
        let here = stage_of(spec).expect("a pipeline has stages");
        let mut s = spec.clone();
        s.stage = Some(PipelineStage {
            index: here.index + 1,
            count: here.count,
        });
        s.pipeline.remove(0);
        let report = next
            .load(downstream(ctx), s)
            .await
            .map_err(|e| format!("next pipeline stage {addr}: {e}"))?
            .map_err(|e| format!("next pipeline stage {addr}: {e}"))?;
        Ok((next, report))
    }

    /// The head of a pipeline: merges its own layers, then streams batches through its
    /// layers and on to the next stage, keeping one batch in flight per stage so stages
    /// work at once. Per-batch NLLs come back in order and are added in window order, so
    /// the score equals a single worker's bit for bit. A raced trial (early stopping)
    /// sends its windows one by one in the race's order and looks as a single worker
    /// does (`Evaluator::score_race_with`), with the same values.
    async fn evaluate_pipeline(
        ev: Arc<std::sync::Mutex<Evaluator>>,
        next: WorkerApiClient,
        stages: usize,
        ctx: Context,
        req: EvalRequest,
        queued_seconds: f64,
        objective_sets: usize,
    ) -> Result<EvalReply, String> {
        let t = Instant::now();
        let (e, w) = (ev.clone(), req.weights.clone());
        let n_sets = tokio::task::spawn_blocking(move || {
            let mut ev = e.lock().map_err(|_| "evaluator poisoned by a panic")?;
            apply_weights(&mut ev, &w)?;
            Ok::<_, String>(if req.all_datasets {
                ev.datasets.len()
            } else {
                objective_sets
            })
        })
        .await
        .map_err(|e| format!("merge panicked: {e}"))??;
        let merge_seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (mut through, mut scores) = (0.0, Vec::new());
        let (mut units, mut partial, mut versus_leader, mut first) = (Vec::new(), None, None, 0);
        let rt = tokio::runtime::Handle::current();
        if let Some(race) = req.race.clone() {
            // The objective's sets raced together (see `Evaluator::score_race`), each
            // window and each group of choices through the stages; the rest below.
            let (e, next, w, rt) = (ev.clone(), next.clone(), req.weights.clone(), rt.clone());
            let r = tokio::task::spawn_blocking(move || {
                let mut ev = e.lock().map_err(|_| "evaluator poisoned by a panic")?;
                let down = || Downstream::new(&next, &ctx, &w, stages, &rt);
                let mut windows = |ev: &Evaluator, batches: &[Batch]| {
                    windows_through_stages(ev, batches, down()).map_err(EvalError::Request)
                };
                let mut choices = |ev: &mut Evaluator, requests: &[crate::choice::Request]| {
                    choices_through_stages(ev, requests, down()).map_err(EvalError::Request)
                };
                ev.score_race_with(objective_sets, &race, &mut windows, &mut choices)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| format!("evaluation panicked: {e}"))??;
            for s in r.sets {
                through += s.forward_tokens as f64;
                scores.push(s.score);
            }
            (units, partial, versus_leader, first) =
                (r.units, r.partial, r.versus_leader, objective_sets);
        }
        for d in first..n_sets.max(first) {
            let t_set = Instant::now();
            let task = {
                let ev = ev.lock().map_err(|_| "evaluator poisoned by a panic")?;
                ev.datasets[d].task.is_some()
            };
            if task {
                // A task's groups of choices, one after another through the stages.
                let (e, next, w, rt) = (ev.clone(), next.clone(), req.weights.clone(), rt.clone());
                let r = tokio::task::spawn_blocking(move || {
                    let mut ev = e.lock().map_err(|_| "evaluator poisoned by a panic")?;
                    let mut choices = |ev: &mut Evaluator, requests: &[crate::choice::Request]| {
                        let down = Downstream::new(&next, &ctx, &w, stages, &rt);
                        choices_through_stages(ev, requests, down).map_err(EvalError::Request)
                    };
                    ev.score_task_with(d, &mut choices)
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| format!("evaluation panicked: {e}"))??;
                through += r.forward_tokens as f64;
                scores.push(r.score);
                continue;
            }
            let (batches, name) = {
                let ev = ev.lock().map_err(|_| "evaluator poisoned by a panic")?;
                (ev.batches(d), ev.datasets[d].name.clone())
            };
            let nll: Vec<f64> = futures::stream::iter(batches.iter().cloned().map(|b| {
                let (ev, next, weights) = (ev.clone(), next.clone(), req.weights.clone());
                async move {
                    let (b, out) = tokio::task::spawn_blocking(move || {
                        let ev = ev.lock().map_err(|_| "evaluator poisoned by a panic")?;
                        let out = ev.stage_forward(&b, None).map_err(|e| e.to_string())?;
                        Ok::<_, String>((b, out))
                    })
                    .await
                    .map_err(|e| format!("stage panicked: {e}"))??;
                    match out {
                        StageOutput::Nll(n) => Ok(n),
                        StageOutput::Hidden(hidden) => {
                            nll_of(pass_on(&next, &ctx, weights, b, Vec::new(), hidden).await?)
                        }
                        StageOutput::LogProbs(_) => {
                            Err("a text window was scored as multiple choice".into())
                        }
                    }
                }
            }))
            .buffered(stages.max(2))
            .collect::<Vec<Result<f64, String>>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
            let r = Evaluator::result(&batches, &nll, t_set.elapsed().as_secs_f64());
            through += r.tokens_per_s * r.seconds;
            scores.push(r.score(&name));
        }
        let eval_seconds = t.elapsed().as_secs_f64();
        Ok(EvalReply {
            trial: req.trial,
            scores,
            merge_seconds,
            eval_seconds,
            tokens_per_s: through / eval_seconds.max(1e-9),
            queued_seconds,
            units,
            partial,
            versus_leader,
        })
    }

    /// A later stage: merge this trial's weights into its layers (once per trial), run
    /// them, and pass the result on or score it.
    async fn stage_forward_inner(
        self,
        ctx: Context,
        req: StageRequest,
    ) -> Result<StageReply, String> {
        self.check_tenant()?;
        let (ev, next) = {
            let guard = self.inner.loaded.lock().await;
            let l = guard
                .as_ref()
                .ok_or("this pipeline stage has nothing loaded; load the pipeline's head again")?;
            (
                l.ev.clone().ok_or("benchmark-mode workers hold no model")?,
                l.next.clone(),
            )
        };
        let batch = Batch {
            tokens: req.tokens,
            seq: req.seq,
            scored: req.scored,
        };
        let (weights, rows) = (req.weights.clone(), req.rows);
        let hidden = req.hidden;
        let (batch, rows, out) = tokio::task::spawn_blocking(move || {
            let mut ev = ev.lock().map_err(|_| "evaluator poisoned by a panic")?;
            if ev.part().first {
                return Err("stage_forward sent to the first stage of a pipeline".to_string());
            }
            apply_weights(&mut ev, &weights)?;
            let out = match rows.is_empty() {
                true => ev.stage_forward(&batch, Some(hidden)),
                false => ev.stage_forward_choices(&batch, &rows, Some(hidden)),
            };
            Ok((batch, rows, out.map_err(|e| e.to_string())?))
        })
        .await
        .map_err(|e| format!("stage panicked: {e}"))??;
        match (out, next) {
            (StageOutput::Nll(n), _) => Ok(StageReply::Nll(n)),
            (StageOutput::LogProbs(v), _) => Ok(StageReply::LogProbs(v)),
            (StageOutput::Hidden(hidden), Some(next)) => {
                pass_on(&next, &ctx, req.weights, batch, rows, hidden).await
            }
            (StageOutput::Hidden(_), None) => {
                Err("a middle pipeline stage has no next stage".into())
            }
        }
    }

    fn status_now(&self) -> WorkerStatus {
        WorkerStatus {
            loaded: self.inner.is_loaded.load(Ordering::SeqCst),
            running: *self.inner.running.lock().expect("never poisoned"),
            queued: self.inner.queued.load(Ordering::SeqCst),
            evaluations: self.inner.evaluations.load(Ordering::SeqCst),
            uptime_s: self.inner.started.elapsed().as_secs_f64(),
            rss_bytes: protocol::rss_bytes(),
        }
    }
}

/// Serves `svc` on `listener` until a client asks for shutdown. Every connection must
/// pass the handshake first; refused ones are logged with the peer's address.
pub async fn serve_tcp(listener: TcpListener, secret: Secret, svc: WorkerService) {
    let stop = svc.clone();
    let handshakes: Handshakes = Arc::default();
    let accept = async move {
        loop {
            let (mut stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // Each handshake in progress holds a descriptor for up to HANDSHAKE_TIMEOUT: a
            // peer may have only a few at once, so slow connections cannot exhaust them.
            let Some(slot) = HandshakeSlot::take(&handshakes, peer.ip()) else {
                tracing::warn!(
                    "refused connection from {peer}: {MAX_HANDSHAKES_PER_PEER} handshakes from that address are already in progress"
                );
                continue;
            };
            let secret = secret.clone();
            let svc = svc.for_connection(peer.to_string());
            tokio::spawn(async move {
                let handshake = protocol::accept_handshake(&mut stream, &secret).await;
                drop(slot);
                let session = match handshake {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("refused connection from {peer}: {e}");
                        return;
                    }
                };
                tracing::info!("coordinator connected from {peer}");
                let transport = protocol::framed(stream, session);
                BaseChannel::with_defaults(transport)
                    .execute(svc.clone().serve())
                    .for_each(|f| async {
                        tokio::spawn(f);
                    })
                    .await;
                tracing::info!("connection from {peer} closed");
                if let Some(c) = &svc.conn {
                    svc.inner.tenancy.release(c);
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = stop.shutdown_requested() => {}
    }
}

/// Handshakes one peer address may have in progress at once.
pub const MAX_HANDSHAKES_PER_PEER: usize = 8;

type Handshakes = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One handshake in progress from an address; released when dropped.
struct HandshakeSlot {
    table: Handshakes,
    ip: std::net::IpAddr,
}

impl HandshakeSlot {
    fn take(table: &Handshakes, ip: std::net::IpAddr) -> Option<HandshakeSlot> {
        let mut t = table.lock().expect("handshake table");
        let n = t.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().expect("handshake table");
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// A client for `svc` over an in-memory channel: an in-process worker.
///
/// Written out rather than with tarpc's `execute`, which logs the end of its request
/// stream as a warning: on an in-memory channel that end can only be the coordinator
/// dropping its client (the channel has no other way to fail), which is how every local
/// search ends, so it is logged at debug level.
pub fn in_process_client(svc: WorkerService) -> WorkerApiClient {
    let (client_side, server_side) = tarpc::transport::channel::unbounded();
    let serve = svc.serve();
    tokio::spawn(
        BaseChannel::with_defaults(server_side)
            .requests()
            .take_while(|r| {
                if let Err(e) = r {
                    tracing::debug!("in-process worker: its client is gone ({e})");
                }
                std::future::ready(r.is_ok())
            })
            .filter_map(|r| std::future::ready(r.ok()))
            .for_each(move |request| {
                tokio::spawn(request.execute(serve.clone()));
                std::future::ready(())
            }),
    );
    WorkerApiClient::new(tarpc::client::Config::default(), client_side).spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--gpus auto` gives way to the CPU for work whose GPU path has not run on a GPU
    /// (tasks; the model types `gpu::unverified_on_gpu` names); explicit GPUs are kept.
    /// No GPU is touched: this is the decision alone.
    #[test]
    fn auto_gpus_give_way_to_the_cpu_for_work_not_yet_run_on_a_gpu() {
        use ckmerge_common::protocol::DatasetSpec;
        use std::path::PathBuf;
        let fx = crate::test_support::fixtures();
        let spec = |ckpt: PathBuf, task: bool| LoadSpec {
            run: "r".into(),
            checkpoints: vec![ckpt],
            datasets: vec![if task {
                DatasetSpec::task("cloze", fx.join("tasks/cloze.jsonl"))
            } else {
                DatasetSpec::new("heldout", vec![fx.join("data/heldout.txt")])
            }],
            objective_sets: 1,
            window_seed: None,
            window: Default::default(),
            groups: None,
            pipeline: Vec::new(),
            stage: None,
        };
        let gpu = Some(vec![0]);
        let (llama, qwen3) = (fx.join("llama/step-1250"), fx.join("architectures/qwen3/a"));
        assert_eq!(devices_for(&spec(llama.clone(), false), &gpu, true), gpu);
        assert_eq!(devices_for(&spec(llama.clone(), true), &gpu, true), None);
        assert_eq!(devices_for(&spec(qwen3.clone(), false), &gpu, true), None);
        // Explicit GPUs, and the CPU, stay as they are.
        assert_eq!(devices_for(&spec(qwen3.clone(), true), &gpu, false), gpu);
        assert_eq!(devices_for(&spec(qwen3, false), &None, true), None);
    }

    /// Issue 14, item 15: a successful local search ended with "WARN Requests stream
    /// errored out: ... the channel is closed" in about half the runs: the coordinator
    /// dropping its in-process client, the normal end, was logged as a fault.
    #[test]
    fn an_in_process_worker_ends_quietly_when_its_client_goes() {
        #[derive(Clone, Default)]
        struct Log(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Log {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = Log::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // One thread: every task runs here, under the subscriber just set.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..20 {
                let client = in_process_client(WorkerService::with_options(None, None, None));
                client
                    .status(protocol::context_with_timeout(Duration::from_secs(5)))
                    .await
                    .unwrap();
                drop(client);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("WARN"), "{text}");
    }

    #[test]
    fn a_peer_has_a_bounded_number_of_handshakes_in_progress() {
        // Issue 14, item 14: slow unauthenticated connections held a descriptor each for
        // the handshake timeout, with no limit.
        let table: Handshakes = Arc::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut held: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_PEER)
            .map(|_| HandshakeSlot::take(&table, a).unwrap())
            .collect();
        assert!(HandshakeSlot::take(&table, a).is_none());
        assert!(
            HandshakeSlot::take(&table, b).is_some(),
            "another peer is not affected"
        );
        held.pop();
        assert!(
            HandshakeSlot::take(&table, a).is_some(),
            "a finished handshake frees its slot"
        );
        drop(held);
        assert!(table.lock().unwrap().get(&a).is_none_or(|&n| n == 0));
    }
}
