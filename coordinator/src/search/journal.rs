//! The trial journal, `RUN_DIR/trials.jsonl`: the source of truth of a search. Every event
//! that matters is one JSON line, written with a single `write` on an `O_APPEND` file and
//! synced before the coordinator acts on it:
//!
//! - `issued`: a trial was sent to a worker (so a restarted coordinator knows what was in
//!   flight and re-issues exactly those points under the same ids);
//! - `done`: a completed evaluation (the value the surrogate sees);
//! - `retry`: an attempt failed (worker lost, deadline, error) and the trial went back to
//!   the queue;
//! - `failed`: the trial failed on its last attempt; remembered, never fed to the GP.
//!
//! A crash can cut the last line short; reading ignores (and reports) a torn last line,
//! and refuses a malformed line anywhere else. Opening the journal to append cuts a torn
//! tail off first, so the next record starts on a line of its own (appended after the
//! torn bytes, it would make both lines one malformed line, and the run could never be
//! resumed again).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ckmerge_common::protocol::DatasetScore;
use ckmerge_common::race::{Partial, Versus};
use serde::{Deserialize, Serialize};

pub const JOURNAL_FILE: &str = "trials.jsonl";

// A run holds one record per event of a trial (hundreds), written once: boxing `Done`'s
// fields to shrink the other variants would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Record {
    Issued {
        trial: u64,
        u: Vec<f64>,
        weights: Vec<f64>,
        worker: String,
        attempt: usize,
        time: f64,
    },
    Done {
        trial: u64,
        u: Vec<f64>,
        weights: Vec<f64>,
        worker: String,
        /// The objective's value (see `config::Objective`): the mean held-out NLL per
        /// token, a task's choice NLL, or the weighted mean of several sets' values.
        mean_nll: f64,
        /// `exp(mean_nll)`.
        perplexity: f64,
        /// Tokens scored, over the objective's sets.
        tokens: usize,
        merge_seconds: f64,
        eval_seconds: f64,
        time: f64,
        /// Each of the objective's sets' own score, where the objective is a task or
        /// more than one set (absent otherwise: `mean_nll` is the one set's).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scores: Vec<DatasetScore>,
        /// With early stopping, a trial scored whole: the value of each of its
        /// objective's units (a text's window NLL sums, a task's item choice NLLs, set
        /// after set, in scoring order): what later trials race against, after a resume
        /// too.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        units: Vec<f64>,
        /// A trial stopped early: how far it got. `mean_nll` is then the estimate of the
        /// objective on the whole sets (the incumbent's plus the estimated difference),
        /// `scores` each set's estimate, and `tokens` what was scored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partial: Option<Partial>,
        /// A leader's confirmation that went on from the units the leader (this trial
        /// id) had scored: `mean_nll` is over the whole sets, `units` every unit's value,
        /// `tokens` only what this trial scored (the leader's record counts the rest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        continues: Option<u64>,
        /// The leader (its trial id) this trial was raced against, as its request sent
        /// it: a trial stopped as better than that leader, paired on its units, is the
        /// next leader whatever the two estimates against the incumbent say.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raced: Option<u64>,
        /// A trial scored whole after racing the leader (`raced`): how it compares with
        /// that leader, paired on the leader's units. An upper bound below zero ends the
        /// leader.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        versus_leader: Option<Versus>,
    },
    Retry {
        trial: u64,
        worker: String,
        error: String,
        time: f64,
    },
    Failed {
        trial: u64,
        u: Vec<f64>,
        weights: Vec<f64>,
        /// (worker, error) of every attempt.
        errors: Vec<(String, String)>,
        time: f64,
    },
}

impl Record {
    pub fn trial(&self) -> u64 {
        match self {
            Record::Issued { trial, .. }
            | Record::Done { trial, .. }
            | Record::Retry { trial, .. }
            | Record::Failed { trial, .. } => *trial,
        }
    }
}

/// Seconds since the Unix epoch, for the records.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (creating) the journal of `run_dir` for appending, first cutting off a torn
    /// last line (bytes after the last newline) that a crash mid-write left.
    pub fn open(run_dir: &Path) -> Result<Journal> {
        let path = run_dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening the journal {}", path.display()))?;
        let whole = whole_lines_len(&path)?;
        if whole < file.metadata()?.len() {
            tracing::warn!(
                "{}: cutting off a torn last line ({} bytes) before appending",
                path.display(),
                file.metadata()?.len() - whole
            );
            file.set_len(whole)
                .and_then(|_| file.sync_data())
                .with_context(|| format!("truncating the torn tail of {}", path.display()))?;
        }
        Ok(Journal { path, file })
    }

    /// Appends `r` and syncs it to disk before returning.
    pub fn append(&mut self, r: &Record) -> Result<()> {
        let mut line = serde_json::to_vec(r).expect("records serialise");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("appending to the journal {}", self.path.display()))
    }
}

/// The length of `path` up to and including its last newline.
fn whole_lines_len(path: &Path) -> Result<u64> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i as u64 + 1))
}

/// What a journal says about a run.
#[derive(Debug, Default)]
pub struct Replay {
    /// Completed and failed trials, in the order they finished.
    pub finished: Vec<Record>,
    /// Trials issued but neither done nor failed: in flight when the coordinator stopped.
    pub in_flight: BTreeMap<u64, Record>,
    /// Failed attempts of the in-flight trials: (worker, error).
    pub attempts: BTreeMap<u64, Vec<(String, String)>>,
    pub next_id: u64,
    /// Problems that did not stop the replay (a torn last line, a duplicate result).
    pub warnings: Vec<String>,
}

/// Reads `run_dir`'s journal. A trial finished twice (which the coordinator never
/// writes) keeps its first result and the second is reported.
pub fn replay(run_dir: &Path) -> Result<Replay> {
    let path = run_dir.join(JOURNAL_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replay::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut r = Replay::default();
    let mut issued: BTreeMap<u64, Record> = BTreeMap::new();
    let mut finished_ids = std::collections::BTreeSet::new();
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        let rec: Record = match serde_json::from_slice(line) {
            Ok(rec) => rec,
            Err(e) if i + 1 == lines.len() => {
                // No newline after it: the write was cut short by a crash.
                r.warnings.push(format!(
                    "{}: ignoring a torn last line ({e})",
                    path.display()
                ));
                continue;
            }
            Err(e) => bail!(
                "{}:{}: malformed journal line ({e}); the journal is written only by ckmerge, so this file was edited or damaged",
                path.display(),
                i + 1
            ),
        };
        let id = rec.trial();
        r.next_id = r.next_id.max(id + 1);
        match &rec {
            Record::Issued { .. } => {
                if !finished_ids.contains(&id) {
                    issued.insert(id, rec);
                }
            }
            Record::Retry { worker, error, .. } => r
                .attempts
                .entry(id)
                .or_default()
                .push((worker.clone(), error.clone())),
            Record::Done { .. } | Record::Failed { .. } => {
                if !finished_ids.insert(id) {
                    r.warnings.push(format!(
                        "{}:{}: trial {id} finished twice; keeping the first result",
                        path.display(),
                        i + 1
                    ));
                    continue;
                }
                issued.remove(&id);
                r.attempts.remove(&id);
                r.finished.push(rec);
            }
        }
    }
    r.in_flight = issued;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(trial: u64, v: f64) -> Record {
        Record::Done {
            trial,
            u: vec![0.5],
            weights: vec![0.5, 0.5],
            worker: "w".into(),
            mean_nll: v,
            perplexity: v.exp(),
            tokens: 10,
            merge_seconds: 0.0,
            eval_seconds: 0.0,
            time: 0.0,
            scores: Vec::new(),
            units: Vec::new(),
            partial: None,
            continues: None,
            raced: None,
            versus_leader: None,
        }
    }

    fn issued(trial: u64) -> Record {
        Record::Issued {
            trial,
            u: vec![0.1 * trial as f64],
            weights: vec![],
            worker: "w".into(),
            attempt: 1,
            time: 0.0,
        }
    }

    #[test]
    fn replay_separates_finished_from_in_flight_and_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        for r in [issued(0), issued(1), done(0, 3.0), issued(2)] {
            j.append(&r).unwrap();
        }
        j.append(&Record::Retry {
            trial: 1,
            worker: "w".into(),
            error: "lost".into(),
            time: 0.0,
        })
        .unwrap();
        drop(j);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"event\":\"done\",\"tri").unwrap();
        let r = replay(dir.path()).unwrap();
        assert_eq!(r.finished, vec![done(0, 3.0)]);
        assert_eq!(r.in_flight.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(r.attempts[&1].len(), 1);
        assert_eq!(r.next_id, 3);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    }

    #[test]
    fn a_torn_tail_is_cut_off_before_appending_so_the_run_stays_resumable() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&done(0, 3.0)).unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"event\":\"done\",\"tri").unwrap();
        drop(f);
        // First resume: the torn line is ignored; this session appends.
        assert_eq!(replay(dir.path()).unwrap().warnings.len(), 1);
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&done(1, 2.0)).unwrap();
        drop(j);
        // Second resume: both records, nothing damaged.
        let r = replay(dir.path()).unwrap();
        assert_eq!(r.finished, vec![done(0, 3.0), done(1, 2.0)]);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn a_damaged_line_inside_is_an_error_and_duplicates_keep_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&done(0, 3.0)).unwrap();
        j.append(&done(0, 4.0)).unwrap();
        let r = replay(dir.path()).unwrap();
        assert_eq!(r.finished, vec![done(0, 3.0)]);
        assert_eq!(r.warnings.len(), 1);
        std::fs::write(dir.path().join(JOURNAL_FILE), "garbage\n{}\n").unwrap();
        let e = replay(dir.path()).unwrap_err().to_string();
        assert!(e.contains("trials.jsonl:1"), "{e}");
    }
}
