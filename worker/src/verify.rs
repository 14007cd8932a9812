//! `ckmerge verify DIR`: is a merged model what ckmerge wrote, and what its sources and
//! weights give? Two checks, both streaming in bounded memory:
//! - integrity: every shard's SHA-256 against the one `ckmerge.json` recorded when it was
//!   written (a damaged or replaced shard, a truncated copy);
//! - derivation: each output tensor recomputed from the sources with the recorded weights
//!   (per group where the merge used groups) and the output's dtype, compared bit for bit,
//!   one piece at a time. The sources are those `ckmerge.json` names, or others given in
//!   their place (the same checkpoints moved).

use std::io::Read;
use std::path::{Path, PathBuf};

use ckmerge_common::{check_compatible, Checkpoint, GroupMap, Grouping, MergeWeights};
use ckmerge_kernels::{weighted_sum_serial, Input};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::merge::MergeError;

/// Elements recomputed and compared at a time.
const PIECE: usize = 1 << 20;

/// What `verify` found. `ok()` when nothing differs.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub shards_hashed: usize,
    /// Shards whose bytes differ from the recorded SHA-256 (or are missing).
    pub bad_shards: Vec<String>,
    /// Tensors recomputed from the sources (0 without sources).
    pub tensors_checked: usize,
    /// Tensors whose bytes differ from the recomputation, with the first differing element.
    pub bad_tensors: Vec<String>,
    pub sources: Vec<PathBuf>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.bad_shards.is_empty() && self.bad_tensors.is_empty()
    }
}

fn request(msg: impl Into<String>) -> MergeError {
    MergeError::Request(msg.into())
}

/// SHA-256 of a file, hex, read in 8 MiB blocks.
pub fn sha256_file(path: &Path) -> Result<String, MergeError> {
    let io = |cause| MergeError::Io {
        path: path.into(),
        cause,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Verifies the merged model in `dir` (see the module doc). `sources`: checkpoints to
/// recompute from in place of those recorded; `rederive`: recompute at all.
pub fn verify(
    dir: &Path,
    sources: Option<&[PathBuf]>,
    rederive: bool,
) -> Result<VerifyReport, MergeError> {
    let prov_path = dir.join("ckmerge.json");
    let text = std::fs::read_to_string(&prov_path).map_err(|e| {
        request(format!(
            "{}: {e}; only a model written by ckmerge merge can be verified",
            prov_path.display()
        ))
    })?;
    let prov: Value = serde_json::from_str(&text)
        .map_err(|e| request(format!("{}: not JSON ({e})", prov_path.display())))?;
    let mut report = VerifyReport::default();

    // Integrity.
    match prov.get("shard_sha256").and_then(Value::as_object) {
        Some(hashes) => {
            for (name, want) in hashes {
                let got = sha256_file(&dir.join(name)).ok();
                report.shards_hashed += 1;
                if got.as_deref() != want.as_str() {
                    report.bad_shards.push(match got {
                        Some(_) => format!("{name}: its SHA-256 differs from the recorded one"),
                        None => format!("{name}: missing or unreadable"),
                    });
                }
            }
        }
        None => report.bad_shards.push(
            "ckmerge.json records no shard hashes (written by a ckmerge before they were recorded)"
                .into(),
        ),
    }
    if !rederive {
        return Ok(report);
    }

    // Derivation.
    let recorded: Vec<PathBuf> = prov["sources"]
        .as_array()
        .ok_or_else(|| request("ckmerge.json lists no sources"))?
        .iter()
        .map(|s| s["path"].as_str().map(PathBuf::from))
        .collect::<Option<_>>()
        .ok_or_else(|| request("ckmerge.json: a source without a path"))?;
    let paths: Vec<PathBuf> = match sources {
        Some(s) if s.len() != recorded.len() => {
            return Err(request(format!(
                "the merge had {} sources; {} given",
                recorded.len(),
                s.len()
            )))
        }
        Some(s) => s.to_vec(),
        None => recorded,
    };
    let ckpts = paths
        .iter()
        .map(|p| Checkpoint::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    check_compatible(&ckpts)?;
    report.sources = paths;
    let weights = recorded_weights(&prov)?;
    let grouping = match prov.get("groups").and_then(Value::as_array) {
        Some(gs) => Some(
            Grouping::parse(
                &gs.iter()
                    .map(|g| g["pattern"].as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>(),
            )
            .map_err(request)?,
        ),
        None => None,
    };
    let names: Vec<String> = ckpts[0].tensors.iter().map(|t| t.name.clone()).collect();
    let groups = GroupMap::new(grouping.as_ref(), &names).map_err(request)?;
    weights.check(ckpts.len(), &groups).map_err(request)?;

    let out = Checkpoint::open(dir)?;
    if out.tensors.len() != names.len() {
        report.bad_tensors.push(format!(
            "the output has {} tensors, the sources {}",
            out.tensors.len(),
            names.len()
        ));
    }
    for (i, name) in names.iter().enumerate() {
        let Some(o) = out.tensor(name) else {
            report
                .bad_tensors
                .push(format!("{name}: missing from the output"));
            continue;
        };
        let srcs: Vec<_> = ckpts
            .iter()
            .map(|c| c.tensor(name).expect("checked by check_compatible"))
            .collect();
        if o.shape != srcs[0].shape {
            report.bad_tensors.push(format!(
                "{name}: shape {:?}, sources {:?}",
                o.shape, srcs[0].shape
            ));
            continue;
        }
        let w = weights.for_tensor(&groups, i);
        let (n, osz) = (o.numel(), o.dtype.size());
        let got = out.bytes(o);
        let mut buf = vec![0u8; PIECE.min(n) * osz];
        let mut at = 0;
        let mut differs = None;
        while at < n && differs.is_none() {
            let len = PIECE.min(n - at);
            let inputs: Vec<Input> = ckpts
                .iter()
                .zip(&srcs)
                .map(|(c, t)| {
                    let sz = t.dtype.size();
                    Input::new(t.dtype, &c.bytes(t)[at * sz..(at + len) * sz])
                })
                .collect();
            let want = &mut buf[..len * osz];
            weighted_sum_serial(&inputs, w, o.dtype, want);
            let have = &got[at * osz..(at + len) * osz];
            if have != want {
                let k = have
                    .chunks(osz)
                    .zip(want.chunks(osz))
                    .position(|(a, b)| a != b)
                    .expect("they differ");
                differs = Some(at + k);
            }
            for (c, t) in ckpts.iter().zip(&srcs) {
                let sz = t.dtype.size();
                c.release(t, at * sz, (at + len) * sz);
            }
            at += len;
        }
        report.tensors_checked += 1;
        if let Some(k) = differs {
            report.bad_tensors.push(format!(
                "{name}: element {k} differs from the recomputed merge"
            ));
        }
    }
    // Tensors the merge copied (not floats it merges): the first source's bytes.
    for t in &ckpts[0].copied {
        report.tensors_checked += 1;
        match out.copied_tensor(&t.name) {
            Some(o) if o.copied == t.copied && out.bytes(o) == ckpts[0].bytes(t) => {}
            Some(_) => report
                .bad_tensors
                .push(format!("{}: differs from the copied source tensor", t.name)),
            None => report
                .bad_tensors
                .push(format!("{}: missing from the output", t.name)),
        }
    }
    Ok(report)
}

/// The weights `ckmerge.json` records: one per source, or one vector per group.
fn recorded_weights(prov: &Value) -> Result<MergeWeights, MergeError> {
    let f32s = |v: &Value| -> Option<Vec<f32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32))
            .collect()
    };
    if let Some(gs) = prov.get("groups").and_then(Value::as_array) {
        let per: Option<Vec<Vec<f32>>> = gs.iter().map(|g| f32s(&g["weights"])).collect();
        return per
            .map(MergeWeights::per_group)
            .ok_or_else(|| request("ckmerge.json: a group without its weights"));
    }
    let one: Option<Vec<f32>> = prov["sources"].as_array().and_then(|s| {
        s.iter()
            .map(|s| s["weight"].as_f64().map(|x| x as f32))
            .collect()
    });
    one.map(MergeWeights::single)
        .ok_or_else(|| request("ckmerge.json: a source without its weight"))
}
