//! A worker as the scheduler holds it: its connection state, how it is reached, and what
//! it did (for the report). Plain data; the transitions are in `workers.rs`.

use std::time::{Duration, Instant};

use ckmerge_common::protocol::{LoadReport, WorkerApiClient};
use ckmerge_worker::serve::WorkerService;
use tokio::task::AbortHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Not connected; a remote worker is retried at `retry_at`.
    Down,
    Connecting,
    Loading,
    Idle,
    Busy(u64),
    /// Refused us (secret, version) or could not load: not retried.
    Failed,
}

pub(super) enum Kind {
    /// A worker's address, and the addresses of the further stages it heads (if any).
    Remote(String, Vec<String>),
    Local(WorkerService),
}

pub(super) struct Slot {
    pub(super) name: String,
    pub(super) kind: Kind,
    pub(super) gen: u64,
    pub(super) state: State,
    pub(super) client: Option<WorkerApiClient>,
    pub(super) retry_at: Instant,
    pub(super) backoff: Duration,
    pub(super) tasks: Vec<AbortHandle>,
    pub(super) report: Option<LoadReport>,
    pub(super) evaluations: usize,
    pub(super) last_error: Option<String>,
}

impl Slot {
    pub(super) fn usable(&self) -> bool {
        matches!(self.state, State::Loading | State::Idle | State::Busy(_))
    }
    pub(super) fn live(&self) -> bool {
        self.usable() || self.state == State::Connecting
    }
    pub(super) fn stop_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
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
