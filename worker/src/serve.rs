//! The worker service: the in-memory merge-and-evaluate API ([`crate::eval::Evaluator`])
//! behind the tarpc protocol of `ckmerge_common::protocol`, served over authenticated TCP
//! (`ckmerge worker`) or over an in-memory channel (the in-process workers of an embedded
//! search: same code path, no network).
//!
//! One evaluator per worker. Loads and evaluations take one FIFO lock, so concurrent
//! evaluate calls queue instead of running over each other; `status` never takes it, so
//! heartbeats are answered while an evaluation runs.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckmerge_common::protocol::{
    self, DatasetScore, EvalReply, EvalRequest, LoadReport, LoadSpec, Secret, WorkerApi,
    WorkerApiClient, WorkerInfo, WorkerStatus,
};
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;

use crate::data::TokenBits;
use crate::eval::{EvalOptions, Evaluator};
use crate::groups::{assign, GroupSpec};

struct Loaded {
    spec: LoadSpec,
    report: LoadReport,
    ev: Option<Arc<std::sync::Mutex<Evaluator>>>,
    group_of: Option<Vec<usize>>,
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
}

/// A worker's state, cheap to clone (tarpc clones the service per request).
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
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
    pub fn new(bench_cost: Option<Duration>) -> WorkerService {
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
            }),
        }
    }

    /// Resolves when a client asked this worker to shut down.
    pub async fn shutdown_requested(&self) {
        self.inner.shutdown.notified().await
    }

    fn load_blocking(spec: &LoadSpec, info: WorkerInfo) -> Result<Loaded, String> {
        let t0 = Instant::now();
        let opts = EvalOptions {
            seq_len: spec.seq_len,
            stride: spec.stride,
            batch: spec.batch,
            max_tokens: spec.max_tokens,
            token_bits: match spec.token_bits {
                None => None,
                Some(16) => Some(TokenBits::U16),
                Some(32) => Some(TokenBits::U32),
                Some(b) => return Err(format!("token_bits {b}: use 16 or 32")),
            },
        };
        let ev =
            Evaluator::load(&spec.checkpoints, &spec.datasets, &opts).map_err(|e| e.to_string())?;
        let group_of = if spec.groups.is_empty() {
            None
        } else {
            let specs = spec
                .groups
                .iter()
                .map(|g| g.parse::<GroupSpec>())
                .collect::<Result<Vec<_>, _>>()?;
            Some(assign(ev.tensor_names(), &specs)?)
        };
        let report = LoadReport {
            info,
            seconds: t0.elapsed().as_secs_f64(),
            rss_bytes: protocol::rss_bytes(),
            datasets: ev
                .datasets
                .iter()
                .map(|d| (d.name.clone(), d.tokens(), d.windows.len()))
                .collect(),
            seq_len: ev.seq_len,
            parameters: ev.parameters(),
            cached: false,
        };
        Ok(Loaded {
            spec: spec.clone(),
            report,
            ev: Some(Arc::new(std::sync::Mutex::new(ev))),
            group_of,
        })
    }

    fn bench_value(weights: &[Vec<f32>]) -> f64 {
        // A smooth bowl with its minimum inside the simplex / the lambda range.
        let w = &weights[0];
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

/// A panic's message, for an error reply.
fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the worker panicked: {what}")
}

impl WorkerApi for WorkerService {
    // A panic in a handler would drop its reply and leave the coordinator waiting for
    // the deadline; catching it turns it into an error reply at once.
    async fn load(self, _: Context, spec: LoadSpec) -> Result<LoadReport, String> {
        AssertUnwindSafe(self.load_inner(spec))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(panic_message(p)))
    }

    async fn evaluate(self, _: Context, req: EvalRequest) -> Result<EvalReply, String> {
        AssertUnwindSafe(self.evaluate_inner(req))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(panic_message(p)))
    }

    async fn status(self, _: Context) -> WorkerStatus {
        self.status_now()
    }

    async fn shutdown(self, _: Context) {
        tracing::info!("shutdown requested");
        // Let the reply go out before the process exits.
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            inner.shutdown.notify_one();
        });
    }
}

impl WorkerService {
    async fn load_inner(self, spec: LoadSpec) -> Result<LoadReport, String> {
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
                        .map(|(n, _)| (n.clone(), 0, 0))
                        .collect(),
                    seq_len: spec.seq_len.unwrap_or(0),
                    parameters: 0,
                    cached: false,
                },
                spec,
                ev: None,
                group_of: None,
            }
        } else {
            let s = spec.clone();
            tokio::task::spawn_blocking(move || Self::load_blocking(&s, info))
                .await
                .map_err(|e| format!("loading panicked: {e}"))??
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

    async fn evaluate_inner(self, req: EvalRequest) -> Result<EvalReply, String> {
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
                    name: loaded.report.datasets[0].0.clone(),
                    tokens: 0,
                    mean_nll: v,
                    perplexity: v.exp(),
                }],
                merge_seconds: 0.0,
                eval_seconds: cost.as_secs_f64(),
                tokens_per_s: 0.0,
                queued_seconds,
            })
        } else {
            let ev = loaded.ev.clone().expect("loaded outside benchmark mode");
            let group_of = loaded.group_of.clone();
            tokio::task::spawn_blocking(move || {
                let mut ev = ev.lock().map_err(|_| "evaluator poisoned by a panic")?;
                let t = Instant::now();
                match &group_of {
                    None if req.weights.len() == 1 => ev.set_weights(&req.weights[0]),
                    None => Err(crate::eval::EvalError::Request(format!(
                        "{} weight vectors but no tensor groups were loaded",
                        req.weights.len()
                    ))),
                    Some(g) => ev.set_group_weights(g, &req.weights),
                }
                .map_err(|e| e.to_string())?;
                let merge_seconds = t.elapsed().as_secs_f64();
                let n = if req.all_datasets {
                    ev.datasets.len()
                } else {
                    1
                };
                let t = Instant::now();
                let (mut through, mut scores) = (0.0, Vec::new());
                for d in 0..n {
                    let r = ev.score(d);
                    through += r.tokens_per_s * r.seconds;
                    scores.push(DatasetScore {
                        name: ev.datasets[d].name.clone(),
                        tokens: r.tokens,
                        mean_nll: r.mean_nll,
                        perplexity: r.perplexity,
                    });
                }
                let eval_seconds = t.elapsed().as_secs_f64();
                Ok::<_, String>(EvalReply {
                    trial,
                    scores,
                    merge_seconds,
                    eval_seconds,
                    tokens_per_s: through / eval_seconds.max(1e-9),
                    queued_seconds,
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
            let secret = secret.clone();
            let svc = svc.clone();
            tokio::spawn(async move {
                if let Err(e) = protocol::accept_handshake(&mut stream, &secret).await {
                    tracing::warn!("refused connection from {peer}: {e}");
                    return;
                }
                tracing::info!("coordinator connected from {peer}");
                let transport = protocol::framed(stream);
                BaseChannel::with_defaults(transport)
                    .execute(svc.serve())
                    .for_each(|f| async {
                        tokio::spawn(f);
                    })
                    .await;
                tracing::info!("connection from {peer} closed");
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = stop.shutdown_requested() => {}
    }
}

/// A client for `svc` over an in-memory channel: an in-process worker.
pub fn in_process_client(svc: WorkerService) -> WorkerApiClient {
    let (client_side, server_side) = tarpc::transport::channel::unbounded();
    tokio::spawn(
        BaseChannel::with_defaults(server_side)
            .execute(svc.serve())
            .for_each(|f| async {
                tokio::spawn(f);
            }),
    );
    WorkerApiClient::new(tarpc::client::Config::default(), client_side).spawn()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
