//! The coordinator–worker protocol: a tarpc service over TCP with bincode frames, behind a
//! handshake that checks the protocol version and authenticates both ends.
//!
//! The handshake runs on the raw stream before any tarpc frame, so a peer of another
//! version or without the run's secret is refused with a clear reason instead of failing
//! somewhere inside bincode:
//!
//! ```text
//! client -> server   MAGIC (8) | version u32 LE | client nonce (32)
//! server -> client   OK | server nonce (32) | HMAC(secret, "server" | cn | sn)    or
//!                    VERSION_MISMATCH | server version u32 LE                     (closes)
//! client -> server   HMAC(secret, "client" | cn | sn)
//! server -> client   OK                                                          or
//!                    AUTH_FAILED                                                  (closes)
//! ```
//!
//! Both ends prove they hold the secret without sending it, and fresh nonces on both sides
//! make a recorded exchange useless. The secret is per run (the launcher generates it);
//! the stream itself is not encrypted: run clusters on a trusted network.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::length_delimited::LengthDelimitedCodec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::groups::Grouping;
use crate::weights::MergeWeights;
use crate::window::WindowSpec;

/// Bumped whenever a message or the handshake changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 4;

const MAGIC: &[u8; 8] = b"CKMERGE\0";
const OK: u8 = 0;
const VERSION_MISMATCH: u8 = 1;
const AUTH_FAILED: u8 = 2;
/// Frames carry weight vectors and reports, but allow large ones (the default is 8 MiB).
pub const MAX_FRAME_BYTES: usize = 1 << 30;
/// A peer that does not finish the handshake in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Environment variable holding the run's shared secret.
pub const SECRET_ENV: &str = "CKMERGE_SECRET";
const MIN_SECRET_BYTES: usize = 16;

/// A named held-out data set: its files (or directories of them) scored as one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub name: String,
    pub files: Vec<PathBuf>,
}

impl DatasetSpec {
    pub fn new(name: impl Into<String>, files: Vec<PathBuf>) -> DatasetSpec {
        DatasetSpec {
            name: name.into(),
            files,
        }
    }
}

/// A worker's place in a pipeline: stage `index` (from 0) of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStage {
    pub index: usize,
    pub count: usize,
}

/// This machine's host name, as workers and coordinators name themselves.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// What a worker loads once per run: the sources, the data sets and how to score them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadSpec {
    /// The search this load is for (`host:run_dir` of its coordinator): a TCP worker
    /// serves one at a time (see `ckmerge_worker::tenancy`).
    pub run: String,
    pub checkpoints: Vec<PathBuf>,
    /// Named data sets; the first is the objective.
    pub datasets: Vec<DatasetSpec>,
    /// How the data is cut into windows (the same bytes on the wire as its five fields).
    pub window: WindowSpec,
    /// Tensor groups for per-group weights; None: one weight vector.
    pub groups: Option<Grouping>,
    /// Pipeline: addresses of the workers holding the following stages, in order. A
    /// worker given a non-empty list holds the first layers and loads the rest onto them.
    pub pipeline: Vec<String>,
    /// Set by the previous stage: this worker's place in the pipeline.
    pub stage: Option<PipelineStage>,
}

/// Who a worker is, sent after loading.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub host: String,
    pub pid: u32,
    pub threads: usize,
    pub version: String,
    pub device: String,
}

/// One data set as a worker holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadedDataset {
    pub name: String,
    /// Tokens read (after `max_tokens`).
    pub tokens: usize,
    /// Scoring windows cut from them.
    pub windows: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadReport {
    pub info: WorkerInfo,
    pub seconds: f64,
    /// Resident memory after loading.
    pub rss_bytes: u64,
    /// What was read of each data set, the objective first.
    pub datasets: Vec<LoadedDataset>,
    pub seq_len: usize,
    pub parameters: u64,
    /// True when this spec was already loaded and nothing was read again.
    pub cached: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRequest {
    pub trial: u64,
    /// One weight vector per group (one in all for a plain merge).
    pub weights: MergeWeights,
    /// Score every data set, not only the objective.
    pub all_datasets: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatasetScore {
    pub name: String,
    pub tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReply {
    pub trial: u64,
    /// The objective first.
    pub scores: Vec<DatasetScore>,
    pub merge_seconds: f64,
    pub eval_seconds: f64,
    pub tokens_per_s: f64,
    /// Seconds the request waited behind other evaluations on this worker.
    pub queued_seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub loaded: bool,
    pub running: Option<u64>,
    pub queued: usize,
    pub evaluations: u64,
    pub uptime_s: f64,
    pub rss_bytes: u64,
}

/// One batch passed down a pipeline: the trial's weights (each stage merges its own
/// layers with them, once per trial), the batch's tokens (the last stage scores them),
/// and the previous stage's hidden states, `[tokens, hidden]` in f32.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRequest {
    pub weights: MergeWeights,
    pub tokens: Vec<u32>,
    pub seq: usize,
    pub scored: usize,
    pub hidden: Vec<f32>,
}

/// Why a worker could not serve a request, as the reply carries it. The message already
/// says what went wrong and where (it ends up in the journal and the log as it is); the
/// kind says which step failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WorkerError {
    pub kind: WorkerErrorKind,
    pub message: String,
}

/// The step a [`WorkerError`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerErrorKind {
    /// Loading sources or data (bad input, or a pipeline stage that could not load).
    Load,
    /// Merging or scoring a candidate.
    Evaluate,
    /// A later pipeline stage's part of a batch.
    Stage,
    /// The worker panicked while serving the request (a bug: the reply says where).
    Panic,
}

impl WorkerError {
    pub fn new(kind: WorkerErrorKind, message: impl Into<String>) -> WorkerError {
        WorkerError {
            kind,
            message: message.into(),
        }
    }
}

#[tarpc::service]
pub trait WorkerApi {
    /// The rest of the pipeline on one batch; returns its summed NLL.
    async fn stage_forward(req: StageRequest) -> Result<f64, WorkerError>;
    /// Loads sources and data (or reuses them when `spec` is already loaded).
    async fn load(spec: LoadSpec) -> Result<LoadReport, WorkerError>;
    /// Merges with the request's weights and scores. Concurrent calls queue.
    async fn evaluate(req: EvalRequest) -> Result<EvalReply, WorkerError>;
    /// Cheap liveness probe, answered while an evaluation runs.
    async fn status() -> WorkerStatus;
    /// Asks the worker process to exit after answering.
    async fn shutdown();
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer is not a ckmerge worker/coordinator (bad handshake magic)")]
    NotCkmerge,
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}; run the same ckmerge build on coordinator and workers")]
    Version { ours: u32, theirs: u32 },
    #[error("authentication failed: the peer does not hold this run's secret (check {SECRET_ENV} or --secret-file on both sides)")]
    Auth,
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
}

/// A run's shared secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret has {} bytes; use at least {MIN_SECRET_BYTES} (for example `head -c 32 /dev/urandom | base64`)",
                bytes.len()
            ));
        }
        Ok(Secret(bytes))
    }

    /// From `file` if given, else from the environment variable; surrounding whitespace
    /// is ignored (a trailing newline from `echo` must not change the secret).
    pub fn load(file: Option<&Path>) -> Result<Secret, String> {
        let raw = match file {
            Some(f) => std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?,
            None => match std::env::var_os(SECRET_ENV) {
                Some(v) => v.into_encoded_bytes(),
                None => {
                    return Err(format!(
                        "no secret: set {SECRET_ENV} or pass --secret-file (the same on coordinator and workers)"
                    ))
                }
            },
        };
        let text = String::from_utf8_lossy(&raw);
        Secret::new(text.trim().as_bytes().to_vec())
    }

    fn mac(&self, role: &[u8], cn: &[u8; 32], sn: &[u8; 32]) -> [u8; 32] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(role);
        m.update(cn);
        m.update(sn);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, role: &[u8], cn: &[u8; 32], sn: &[u8; 32], tag: &[u8; 32]) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(role);
        m.update(cn);
        m.update(sn);
        m.verify_slice(tag).is_ok() // constant time
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .unwrap_or(Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT)))
}

/// Server side of the handshake. On error the stream is closed by the caller dropping it.
pub async fn accept_handshake(
    stream: &mut TcpStream,
    secret: &Secret,
) -> Result<(), HandshakeError> {
    timed(async {
        let mut hello = [0u8; 8 + 4 + 32];
        stream.read_exact(&mut hello).await?;
        if &hello[..8] != MAGIC {
            return Err(HandshakeError::NotCkmerge);
        }
        let theirs = u32::from_le_bytes(hello[8..12].try_into().unwrap());
        if theirs != PROTOCOL_VERSION {
            let mut m = vec![VERSION_MISMATCH];
            m.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            stream.write_all(&m).await?;
            return Err(HandshakeError::Version {
                ours: PROTOCOL_VERSION,
                theirs,
            });
        }
        let cn: [u8; 32] = hello[12..].try_into().unwrap();
        let sn: [u8; 32] = rand::random();
        let mut m = vec![OK];
        m.extend_from_slice(&sn);
        m.extend_from_slice(&secret.mac(b"server", &cn, &sn));
        stream.write_all(&m).await?;
        let mut tag = [0u8; 32];
        match stream.read_exact(&mut tag).await {
            Ok(_) => {}
            // The client checks our proof first and hangs up when it fails: the two
            // sides hold different secrets.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(HandshakeError::Auth),
            Err(e) => return Err(e.into()),
        }
        if !secret.verify(b"client", &cn, &sn, &tag) {
            let _ = stream.write_all(&[AUTH_FAILED]).await;
            return Err(HandshakeError::Auth);
        }
        stream.write_all(&[OK]).await?;
        Ok(())
    })
    .await
}

/// Client side of the handshake, speaking `version` (tests use another version to check
/// that a mismatch is refused).
pub async fn connect_handshake(
    stream: &mut TcpStream,
    secret: &Secret,
    version: u32,
) -> Result<(), HandshakeError> {
    timed(async {
        let cn: [u8; 32] = rand::random();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&version.to_le_bytes());
        hello.extend_from_slice(&cn);
        stream.write_all(&hello).await?;
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).await?;
        match status[0] {
            OK => {}
            VERSION_MISMATCH => {
                let mut v = [0u8; 4];
                stream.read_exact(&mut v).await?;
                return Err(HandshakeError::Version {
                    ours: version,
                    theirs: u32::from_le_bytes(v),
                });
            }
            _ => return Err(HandshakeError::NotCkmerge),
        }
        let mut rest = [0u8; 64];
        stream.read_exact(&mut rest).await?;
        let sn: [u8; 32] = rest[..32].try_into().unwrap();
        let tag: [u8; 32] = rest[32..].try_into().unwrap();
        if !secret.verify(b"server", &cn, &sn, &tag) {
            return Err(HandshakeError::Auth);
        }
        stream.write_all(&secret.mac(b"client", &cn, &sn)).await?;
        let mut status = [0u8; 1];
        match stream.read_exact(&mut status).await {
            Ok(_) if status[0] == OK => Ok(()),
            Ok(_) => Err(HandshakeError::Auth),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(HandshakeError::Auth),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// Frames on an authenticated stream, with the raised frame limit.
pub fn framed<Item, SinkItem>(
    stream: TcpStream,
) -> tarpc::serde_transport::Transport<TcpStream, Item, SinkItem, Bincode<Item, SinkItem>>
where
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_framed(stream);
    tarpc::serde_transport::new(codec, Bincode::default())
}

/// Connects to a worker at `addr`, runs the handshake and returns a client.
pub async fn connect(
    addr: &str,
    secret: &Secret,
    version: u32,
) -> Result<WorkerApiClient, HandshakeError> {
    let mut stream = timed(async { Ok(TcpStream::connect(addr).await?) }).await?;
    stream.set_nodelay(true)?;
    connect_handshake(&mut stream, secret, version).await?;
    let transport = framed(stream);
    Ok(WorkerApiClient::new(tarpc::client::Config::default(), transport).spawn())
}

/// A request context whose deadline is `timeout` from now (tarpc's default is 10 s,
/// far too short for an evaluation of a real model).
pub fn context_with_timeout(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}

/// Resident set size of this process, from `/proc` (0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (s, _) = l.accept().await.unwrap();
        (c.await.unwrap(), s)
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn same_secret_and_version_connect() {
        let (mut c, mut s) = pair().await;
        let k = secret("0123456789abcdef0123");
        let k2 = k.clone();
        let srv = tokio::spawn(async move { accept_handshake(&mut s, &k2).await });
        connect_handshake(&mut c, &k, PROTOCOL_VERSION)
            .await
            .unwrap();
        srv.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        let (mut c, mut s) = pair().await;
        let srv = tokio::spawn(async move {
            accept_handshake(&mut s, &secret("server-secret-0123456")).await
        });
        let e = connect_handshake(&mut c, &secret("client-secret-0123456"), PROTOCOL_VERSION)
            .await
            .unwrap_err();
        assert!(matches!(e, HandshakeError::Auth), "{e}");
        drop(c);
        // The client refuses the server's proof first and hangs up; the server reports it.
        let se = srv.await.unwrap().unwrap_err();
        assert!(matches!(se, HandshakeError::Auth), "{se}");
    }

    #[tokio::test]
    async fn version_mismatch_is_reported_with_both_versions() {
        let (mut c, mut s) = pair().await;
        let k = secret("0123456789abcdef0123");
        let k2 = k.clone();
        let srv = tokio::spawn(async move { accept_handshake(&mut s, &k2).await });
        let e = connect_handshake(&mut c, &k, PROTOCOL_VERSION + 7)
            .await
            .unwrap_err();
        assert!(
            matches!(e, HandshakeError::Version { theirs, .. } if theirs == PROTOCOL_VERSION),
            "{e}"
        );
        let se = srv.await.unwrap().unwrap_err();
        assert!(matches!(se, HandshakeError::Version { .. }), "{se}");
    }

    #[test]
    fn a_worker_error_displays_as_its_message_alone() {
        // The coordinator journals what a worker said; the kind must not change the text.
        let e = WorkerError::new(WorkerErrorKind::Evaluate, "weights must be finite");
        assert_eq!(e.to_string(), "weights must be finite");
        let wire = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<WorkerError>(&wire).unwrap(), e);
    }

    #[test]
    fn short_secrets_are_refused_and_whitespace_is_trimmed() {
        assert!(Secret::new(b"short".to_vec()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        let a = Secret::load(Some(&f)).unwrap();
        let cn = [1u8; 32];
        let sn = [2u8; 32];
        assert_eq!(
            a.mac(b"x", &cn, &sn),
            secret("0123456789abcdef0123").mac(b"x", &cn, &sn)
        );
    }
}
