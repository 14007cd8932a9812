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
//! make a recorded exchange useless. The secret is per run (the launcher generates it).
//!
//! Every frame after the handshake is authenticated too: each direction has its own key,
//! `HMAC(secret, "c2s" | cn | sn)` and `HMAC(secret, "s2c" | cn | sn)`, and each frame
//! carries an HMAC of its length and one of its payload, both under that key with the
//! frame's sequence number, counting that direction's frames from 0 ([`AuthCodec`]). Without it, a peer on the path could relay a real
//! handshake and then inject `load` (any paths), `shutdown` or forged scores; a frame
//! that is forged, altered, replayed, reordered or dropped now fails the connection. The
//! stream is not encrypted (frames are readable on the wire): run clusters on a trusted
//! network, or tunnel them.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::bytes::{Bytes, BytesMut};
use tarpc::tokio_util::codec::{Decoder, Encoder, Framed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::groups::Grouping;
use crate::weights::MergeWeights;
use crate::window::WindowSpec;

/// Bumped whenever a message or the handshake changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 8;

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

/// A named data set: held-out text (its files, or directories of them, scored as one
/// stream of windows) or a multiple-choice task (one JSONL file, scored as
/// lm-evaluation-harness scores `multiple_choice` tasks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub name: String,
    pub files: Vec<PathBuf>,
    #[serde(default)]
    pub kind: SetKind,
}

/// What a data set is, and so how it is scored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetKind {
    /// Held-out text: mean NLL per scored token.
    #[default]
    Text,
    /// A multiple-choice task: the gold choice's cross-entropy among the choices, mean
    /// per item (`choice_nll`), beside acc and acc_norm.
    Task,
}

impl DatasetSpec {
    pub fn new(name: impl Into<String>, files: Vec<PathBuf>) -> DatasetSpec {
        DatasetSpec {
            name: name.into(),
            files,
            kind: SetKind::Text,
        }
    }

    /// A multiple-choice task read from `file`.
    pub fn task(name: impl Into<String>, file: PathBuf) -> DatasetSpec {
        DatasetSpec {
            name: name.into(),
            files: vec![file],
            kind: SetKind::Task,
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
    /// Named data sets; the first `objective_sets` make up the objective (a trial scores
    /// those only), the rest are scored for the report.
    pub datasets: Vec<DatasetSpec>,
    /// How many of the leading `datasets` a trial scores (at least 1).
    pub objective_sets: usize,
    /// With early stopping: the seed of the fixed random orders in which the objective's
    /// units (a text's windows, a task's items) are scored, set `d` with
    /// [`crate::race::set_seed`]; None: file order.
    pub window_seed: Option<u64>,
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
    /// Tokens read (after `max_tokens`); for a task, the tokens of all its requests (what
    /// one scoring runs through the model).
    pub tokens: usize,
    /// Scoring windows cut from them; for a task, its requests (items times choices).
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
    /// Score every data set, not only the objective's.
    pub all_datasets: bool,
    /// With early stopping: race the objective's sets against the incumbent (see
    /// [`crate::race`]); the reply then carries every scored unit's value.
    pub race: Option<crate::race::Race>,
}

/// The score of one model on one data set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetScore {
    pub name: String,
    /// Tokens scored: predicted tokens of the text, or of every choice of a task.
    pub tokens: usize,
    /// The set's value, lower is better: the mean NLL per scored token of a text, or a
    /// task's `choice_nll` (mean over items of `-log softmax(lls)[gold]`, in nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`: for a task, the perplexity over its choices (1 when the model puts
    /// all the choices' probability on the gold one, the number of choices when uniform).
    pub perplexity: f64,
    /// A task's accuracies; None for text. (Never skipped when None: the wire format,
    /// bincode, is not self-describing.)
    #[serde(default)]
    pub task: Option<TaskMetrics>,
}

/// What lm-evaluation-harness reports for a `multiple_choice` task, plus the gold
/// choice's mean log-likelihood.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    pub items: usize,
    pub acc: f64,
    pub acc_norm: f64,
    /// Mean log-likelihood of the gold choice given its context.
    pub gold_ll: f64,
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
    /// A raced request: the value of each unit scored (a text's window NLL sums, a
    /// task's item choice NLLs), the objective's sets one after the other, each in
    /// scoring order.
    pub units: Vec<f64>,
    /// A raced request stopped early: how far it got (the objective's scores are then the
    /// estimates of the whole sets').
    pub partial: Option<crate::race::Partial>,
    /// A raced request scored whole that raced a leader: how it compares with that leader,
    /// paired on the leader's units.
    pub versus_leader: Option<crate::race::Versus>,
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
    /// Multiple-choice requests, one per row of `seq` tokens (right-padded): the last
    /// stage returns each one's continuation log-likelihood instead of an NLL sum. Empty
    /// for text windows.
    pub rows: Vec<ChoiceRow>,
}

/// One multiple-choice request in a [`StageRequest`]: its row holds `input` (context +
/// continuation without its last token) in its first `input_len` tokens; the last
/// `targets.len()` of those positions predict `targets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceRow {
    pub input_len: usize,
    pub targets: Vec<u32>,
}

/// What the rest of a pipeline returns for a [`StageRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageReply {
    /// Text windows: their summed NLL.
    Nll(f64),
    /// Multiple-choice rows: each one's log-likelihood and whether every target was
    /// the greedy choice.
    LogProbs(Vec<(f64, bool)>),
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
    /// The rest of the pipeline on one batch; returns its summed NLL (text) or its rows'
    /// log-likelihoods (multiple choice).
    async fn stage_forward(req: StageRequest) -> Result<StageReply, WorkerError>;
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

    /// The session of a finished handshake, for the side that is the client (`client`).
    fn session(&self, cn: &[u8; 32], sn: &[u8; 32], client: bool) -> Session {
        let (c2s, s2c) = (self.mac(b"c2s", cn, sn), self.mac(b"s2c", cn, sn));
        let (send, recv) = if client { (c2s, s2c) } else { (s2c, c2s) };
        Session { send, recv }
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

/// The keys one side of a connection authenticates its frames with (see the module doc).
#[derive(Clone)]
pub struct Session {
    send: [u8; 32],
    recv: [u8; 32],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session { keys hidden }")
    }
}

/// Server side of the handshake. On error the stream is closed by the caller dropping it.
pub async fn accept_handshake(
    stream: &mut TcpStream,
    secret: &Secret,
) -> Result<Session, HandshakeError> {
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
        Ok(secret.session(&cn, &sn, false))
    })
    .await
}

/// Client side of the handshake, speaking `version` (tests use another version to check
/// that a mismatch is refused).
pub async fn connect_handshake(
    stream: &mut TcpStream,
    secret: &Secret,
    version: u32,
) -> Result<Session, HandshakeError> {
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
            Ok(_) if status[0] == OK => Ok(secret.session(&cn, &sn, true)),
            Ok(_) => Err(HandshakeError::Auth),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(HandshakeError::Auth),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

const TAG: usize = 32;
/// A frame's head: its payload length (u32, big-endian) and the head's tag.
const HEAD: usize = 4 + TAG;

/// The session layer of every connection after the handshake (see the module doc). A
/// frame is `len (u32 BE) | HMAC(key, "head" | seq | len) | payload | HMAC(key, seq |
/// payload)`: the length is authenticated on its own, before any buffer is sized by it,
/// so a peer without the keys cannot make the other side reserve a large frame.
pub struct AuthCodec {
    session: Session,
    sent: u64,
    received: u64,
    /// The payload length of a frame whose head was verified and whose body is awaited.
    pending: Option<usize>,
}

impl AuthCodec {
    pub fn new(session: Session) -> AuthCodec {
        AuthCodec {
            session,
            sent: 0,
            received: 0,
            pending: None,
        }
    }

    fn mac(key: &[u8; 32], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        for p in parts {
            m.update(p);
        }
        m
    }

    fn refused(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "frame {} failed authentication ({what}: forged, altered, replayed or out of order); closing the connection",
                self.received
            ),
        )
    }
}

impl Decoder for AuthCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, io::Error> {
        let seq = self.received.to_le_bytes();
        let len = match self.pending {
            Some(len) => len,
            None => {
                if src.len() < HEAD {
                    return Ok(None);
                }
                let len_bytes: [u8; 4] = src[..4].try_into().expect("4 bytes");
                Self::mac(&self.session.recv, &[b"head", &seq, &len_bytes])
                    .verify_slice(&src[4..HEAD]) // constant time
                    .map_err(|_| self.refused("its length"))?;
                let len = u32::from_be_bytes(len_bytes) as usize;
                if len > MAX_FRAME_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a frame of {len} bytes is over the limit of {MAX_FRAME_BYTES}"),
                    ));
                }
                let _ = src.split_to(HEAD);
                self.pending = Some(len);
                len
            }
        };
        if src.len() < len + TAG {
            src.reserve(len + TAG - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(len + TAG);
        let tag = frame.split_off(len);
        Self::mac(&self.session.recv, &[&seq, &frame])
            .verify_slice(&tag)
            .map_err(|_| self.refused("its payload"))?;
        self.pending = None;
        self.received += 1;
        Ok(Some(frame))
    }
}

impl Encoder<Bytes> for AuthCodec {
    type Error = io::Error;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), io::Error> {
        if payload.len() > MAX_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a message of {} bytes is over the frame limit of {MAX_FRAME_BYTES}",
                    payload.len()
                ),
            ));
        }
        let seq = self.sent.to_le_bytes();
        let len = (payload.len() as u32).to_be_bytes();
        let head = Self::mac(&self.session.send, &[b"head", &seq, &len]).finalize();
        let tag = Self::mac(&self.session.send, &[&seq, &payload]).finalize();
        dst.reserve(HEAD + payload.len() + TAG);
        dst.extend_from_slice(&len);
        dst.extend_from_slice(&head.into_bytes());
        dst.extend_from_slice(&payload);
        dst.extend_from_slice(&tag.into_bytes());
        self.sent += 1;
        Ok(())
    }
}

/// The tarpc transport of an authenticated connection.
pub type AuthTransport<Item, SinkItem> = tarpc::tokio_serde::Framed<
    Framed<TcpStream, AuthCodec>,
    Item,
    SinkItem,
    Bincode<Item, SinkItem>,
>;

/// Authenticated frames (see [`AuthCodec`]) on a stream after its handshake.
pub fn framed<Item, SinkItem>(stream: TcpStream, session: Session) -> AuthTransport<Item, SinkItem>
where
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    tarpc::tokio_serde::Framed::new(
        Framed::new(stream, AuthCodec::new(session)),
        Bincode::default(),
    )
}

/// Connects to a worker at `addr`, runs the handshake and returns a client.
pub async fn connect(
    addr: &str,
    secret: &Secret,
    version: u32,
) -> Result<WorkerApiClient, HandshakeError> {
    let mut stream = timed(async { Ok(TcpStream::connect(addr).await?) }).await?;
    stream.set_nodelay(true)?;
    let session = connect_handshake(&mut stream, secret, version).await?;
    let transport = framed(stream, session);
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

    #[test]
    fn frames_forged_altered_replayed_or_reordered_are_refused() {
        let k = secret("0123456789abcdef0123");
        let (cn, sn) = ([1u8; 32], [2u8; 32]);
        let mut client = AuthCodec::new(k.session(&cn, &sn, true));
        let mut server = AuthCodec::new(k.session(&cn, &sn, false));
        let frame = |codec: &mut AuthCodec, payload: &[u8]| {
            let mut b = BytesMut::new();
            codec
                .encode(Bytes::copy_from_slice(payload), &mut b)
                .unwrap();
            b
        };
        let (f0, f1) = (frame(&mut client, b"load"), frame(&mut client, b"evaluate"));
        // In order: accepted, the payload without its tag.
        assert_eq!(
            &server.decode(&mut f0.clone()).unwrap().unwrap()[..],
            b"load"
        );
        // Replayed (frame 0 again where frame 1 is due): refused.
        assert!(server.decode(&mut f0.clone()).is_err());
        let mut fresh = AuthCodec::new(k.session(&cn, &sn, false));
        // Reordered (frame 1 first): refused.
        assert!(fresh.decode(&mut f1.clone()).is_err());
        // Altered: refused.
        let mut fresh = AuthCodec::new(k.session(&cn, &sn, false));
        let mut bad = f0.clone();
        let last = bad.len() - TAG - 1;
        bad[last] ^= 1;
        assert!(fresh.decode(&mut bad).is_err());
        // The client's own frames sent back to it (another direction's key): refused.
        let mut c2 = AuthCodec::new(k.session(&cn, &sn, true));
        assert!(c2.decode(&mut f0.clone()).is_err());
        // A session of other nonces (another connection): refused.
        let mut other = AuthCodec::new(k.session(&cn, &[3u8; 32], false));
        assert!(other.decode(&mut f0.clone()).is_err());
        // A head claiming a 1 GiB frame, without the keys: refused from its 36 bytes,
        // before any buffer is sized by it.
        let mut fresh = AuthCodec::new(k.session(&cn, &sn, false));
        let mut huge = BytesMut::with_capacity(HEAD);
        huge.extend_from_slice(&(1u32 << 30).to_be_bytes());
        huge.extend_from_slice(&[0u8; TAG]);
        let e = fresh.decode(&mut huge).unwrap_err().to_string();
        assert!(e.contains("its length"), "{e}");
        assert!(huge.capacity() < 1 << 20);
        // A frame arriving in pieces is assembled, and the next one follows.
        let mut fresh = AuthCodec::new(k.session(&cn, &sn, false));
        let mut both = f0.clone();
        both.extend_from_slice(&f1);
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for chunk in both.chunks(7) {
            src.extend_from_slice(chunk);
            while let Some(f) = fresh.decode(&mut src).unwrap() {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got, vec![b"load".to_vec(), b"evaluate".to_vec()]);
    }

    /// Issue 14, item 14: after relaying a real handshake, a peer on the path injected
    /// requests. The relay here copies the handshake both ways, then writes a frame of
    /// its own: the server's transport refuses it and ends the connection.
    #[tokio::test]
    async fn a_relayed_handshake_then_an_injected_frame_is_refused() {
        use futures::StreamExt;
        let k = secret("0123456789abcdef0123");
        let server_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server_l.local_addr().unwrap();
        let relay_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay_l.local_addr().unwrap();
        let k2 = k.clone();
        let server = tokio::spawn(async move {
            let (mut s, _) = server_l.accept().await.unwrap();
            let session = accept_handshake(&mut s, &k2).await.unwrap();
            let mut t: AuthTransport<String, String> = framed(s, session);
            t.next().await
        });
        let relay = tokio::spawn(async move {
            let (mut c, _) = relay_l.accept().await.unwrap();
            let mut s = TcpStream::connect(server_addr).await.unwrap();
            // The handshake, byte for byte: hello 44, server 65, proof 32, OK 1.
            let copy = |n: usize| vec![0u8; n];
            let mut b = copy(44);
            c.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
            let mut b = copy(65);
            s.read_exact(&mut b).await.unwrap();
            c.write_all(&b).await.unwrap();
            let mut b = copy(32);
            c.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
            let mut b = copy(1);
            s.read_exact(&mut b).await.unwrap();
            c.write_all(&b).await.unwrap();
            // Now inject: a length-delimited frame with a made-up tag.
            let payload = b"shutdown, from someone without the keys";
            let mut frame = ((payload.len() + TAG) as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(payload);
            frame.extend_from_slice(&[0u8; TAG]);
            s.write_all(&frame).await.unwrap();
            (c, s)
        });
        let mut c = TcpStream::connect(relay_addr).await.unwrap();
        connect_handshake(&mut c, &k, PROTOCOL_VERSION)
            .await
            .unwrap();
        let got = server.await.unwrap();
        let e = got.expect("the server read something").unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        drop(relay.await.unwrap());
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
