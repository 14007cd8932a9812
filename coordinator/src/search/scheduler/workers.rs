//! The workers as the scheduler sees them: one slot per worker (or pipeline) with its
//! connection state machine (down -> connecting -> loading -> idle <-> busy, or failed),
//! how slots are added (addresses, an addresses file, pipelines being formed), connected
//! and given up, and what each did for the report.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ckmerge_common::protocol::{
    self, context_with_timeout, HandshakeError, WorkerApiClient, PROTOCOL_VERSION,
};
use ckmerge_worker::serve::in_process_client;

use super::slot::{Kind, Slot, State, WorkerSummary};
use super::{Ev, Failure, Scheduler};
use crate::search::journal::Record;

impl Scheduler {
    pub(super) fn add_slot(&mut self, name: String, kind: Kind) {
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
    pub(super) fn read_addresses_file(&mut self) {
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
    pub(super) fn add_worker(&mut self, a: String) {
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

    /// Connects (remote) or attaches (local) slot `i`, then loads.
    pub(super) fn start(&mut self, i: usize) {
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

    pub(super) fn on_connected(&mut self, i: usize, client: WorkerApiClient) {
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
    pub(super) fn lose(&mut self, i: usize, why: String) {
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
            if let Err(e) =
                self.attempt_failed(t, name, format!("worker lost: {why}"), Failure::Transient)
            {
                tracing::error!("{e:#}");
            }
        }
    }

    /// Fails the run when no worker can be used and none can come back.
    pub(super) fn check_workers(&self) -> Result<()> {
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
