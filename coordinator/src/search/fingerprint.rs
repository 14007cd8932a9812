//! What a run's trials were measured on, stored with the run (`RUN_DIR/fingerprint.json`)
//! and checked on every resume: the parts of the config that define a trial's value, and
//! a mark of every input file (checkpoint files and data files). Without it, a resume
//! after `RUN_DIR/config.toml` was edited, or after a checkpoint or data file was replaced
//! under the same path, would mix trials of two objectives in one journal, silently.
//!
//! A file's mark is its size and a SHA-256 over its first, middle and last MiB (the whole
//! file when smaller than 3 MiB): reading 3 MiB per file keeps a resume fast on
//! checkpoints of hundreds of GB, and any rewrite of a safetensors file (header, shapes,
//! offsets or the values of its first, middle or last tensors) changes it. A change that
//! keeps the size and touches only bytes outside the samples is not detected.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::SearchConfig;

pub const FINGERPRINT_FILE: &str = "fingerprint.json";

const SAMPLE: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// `SearchConfig::objective_key`: checkpoints, space, data, seed, acquisition.
    pub objective: serde_json::Value,
    pub files: Vec<FileMark>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileMark {
    pub path: PathBuf,
    pub bytes: u64,
    /// SHA-256 of the sampled bytes, hex.
    pub sample_sha256: String,
}

impl FileMark {
    pub fn of(path: &Path) -> Result<FileMark> {
        let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let bytes = f.metadata()?.len();
        let mut h = Sha256::new();
        let starts = if bytes <= 3 * SAMPLE {
            vec![(0, bytes)]
        } else {
            vec![
                (0, SAMPLE),
                (bytes / 2 - SAMPLE / 2, SAMPLE),
                (bytes - SAMPLE, SAMPLE),
            ]
        };
        let mut buf = Vec::new();
        for (at, len) in starts {
            buf.resize(len as usize, 0);
            f.seek(SeekFrom::Start(at))
                .and_then(|_| f.read_exact(&mut buf))
                .with_context(|| format!("reading {}", path.display()))?;
            h.update(&buf);
        }
        Ok(FileMark {
            path: path.to_path_buf(),
            bytes,
            sample_sha256: format!("{:x}", h.finalize()),
        })
    }
}

/// Every file of the inputs, in a stable order: each checkpoint directory's files (not
/// its subdirectories), then the data files as the evaluator reads them.
fn input_files(cfg: &SearchConfig) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for c in &cfg.checkpoints {
        let mut files: Vec<PathBuf> = std::fs::read_dir(c)
            .with_context(|| format!("listing the checkpoint {}", c.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        out.extend(files);
    }
    for d in cfg.datasets() {
        out.extend(ckmerge_worker::data::data_files(&d.files).map_err(anyhow::Error::msg)?);
    }
    Ok(out)
}

impl Fingerprint {
    /// The fingerprint of `cfg`'s objective and inputs as they are now.
    pub fn of(cfg: &SearchConfig) -> Result<Fingerprint> {
        Ok(Fingerprint {
            objective: cfg.objective_key(),
            files: input_files(cfg)?
                .iter()
                .map(|p| FileMark::of(p))
                .collect::<Result<_>>()?,
        })
    }

    pub fn read(run_dir: &Path) -> Result<Option<Fingerprint>> {
        let path = run_dir.join(FINGERPRINT_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).with_context(|| {
                format!(
                    "{}: damaged (it is written only by ckmerge)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("serialises") + "\n";
        super::write_atomic(&run_dir.join(FINGERPRINT_FILE), json.as_bytes())
    }

    /// What differs in `now` from this (the run's) fingerprint, one line per difference.
    pub fn differences(&self, now: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (self.objective.as_object(), now.objective.as_object()) {
            for (k, v) in a {
                if b.get(k) != Some(v) {
                    out.push(format!(
                        "config `{k}`: the run has {v}, now {}",
                        b.get(k).unwrap_or(&serde_json::Value::Null)
                    ));
                }
            }
        }
        for m in &self.files {
            match now.files.iter().find(|n| n.path == m.path) {
                None => out.push(format!(
                    "{}: no longer an input (removed?)",
                    m.path.display()
                )),
                Some(n) if n.bytes != m.bytes => out.push(format!(
                    "{}: {} bytes when the run started, {} now",
                    m.path.display(),
                    m.bytes,
                    n.bytes
                )),
                Some(n) if n.sample_sha256 != m.sample_sha256 => out.push(format!(
                    "{}: its contents changed since the run started",
                    m.path.display()
                )),
                Some(_) => {}
            }
        }
        for n in &now.files {
            if !self.files.iter().any(|m| m.path == n.path) {
                out.push(format!("{}: a new input", n.path.display()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_mark_sees_a_changed_sample_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut bytes = vec![7u8; (5 * SAMPLE) as usize];
        std::fs::write(&p, &bytes).unwrap();
        let a = FileMark::of(&p).unwrap();
        bytes[(5 * SAMPLE / 2) as usize] = 8; // the middle sample
        std::fs::write(&p, &bytes).unwrap();
        let b = FileMark::of(&p).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_ne!(a.sample_sha256, b.sample_sha256);
        std::fs::write(&p, b"small").unwrap();
        assert_eq!(FileMark::of(&p).unwrap().bytes, 5);
    }
}
