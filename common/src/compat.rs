//! Whether checkpoints can be merged: same architecture and sizes in `config.json`, and
//! the same tensor names, shapes and dtypes. All mismatches are gathered into one report
//! (up to [`MAX_LISTED`] lines) so a user fixes everything in one go instead of one error
//! per run.

use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::CheckpointError;

/// Mismatches listed in full before the report says "and N more".
pub const MAX_LISTED: usize = 10;

/// `config.json` keys that legitimately differ between checkpoints of one run: they
/// record how a file was saved, not what the model is.
const IGNORED_CONFIG_KEYS: [&str; 6] = [
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "use_cache",
];

/// Checks that every checkpoint matches the first. Returns one error listing every
/// mismatch (capped), each naming both checkpoints and the files involved.
pub fn check_compatible(ckpts: &[Checkpoint]) -> Result<(), CheckpointError> {
    let Some(first) = ckpts.first() else {
        return Ok(());
    };
    let mut problems: Vec<String> = Vec::new();

    for other in &ckpts[1..] {
        let mut keys: Vec<&String> = first.config.keys().chain(other.config.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            if IGNORED_CONFIG_KEYS.contains(&k.as_str()) {
                continue;
            }
            let (a, b) = (first.config.get(k), other.config.get(k));
            if a != b {
                problems.push(format!(
                    "config.json `{k}`: {} in {} but {} in {}",
                    show(a),
                    first.dir.display(),
                    show(b),
                    other.dir.display()
                ));
            }
        }

        for t in &first.tensors {
            match other.tensor(&t.name) {
                None => problems.push(format!(
                    "tensor `{}`: in {} but missing from {}",
                    t.name,
                    first.shard_path(t).display(),
                    other.dir.display()
                )),
                Some(u) if u.shape != t.shape || u.dtype != t.dtype => problems.push(format!(
                    "tensor `{}`: {} {:?} in {} but {} {:?} in {}",
                    t.name,
                    t.dtype,
                    t.shape,
                    first.shard_path(t).display(),
                    u.dtype,
                    u.shape,
                    other.shard_path(u).display()
                )),
                Some(_) => {}
            }
        }
        for u in &other.tensors {
            if first.tensor(&u.name).is_none() {
                problems.push(format!(
                    "tensor `{}`: in {} but missing from {}",
                    u.name,
                    other.shard_path(u).display(),
                    first.dir.display()
                ));
            }
        }
        // Tensors a merge copies (not floats it merges) must be the same in every
        // checkpoint: byte for byte, since they are copied from the first, never averaged.
        for t in &first.copied {
            let dtype = |t: &crate::TensorEntry| t.copied.clone().unwrap_or_default().0;
            match other.copied_tensor(&t.name) {
                None => problems.push(format!(
                    "tensor `{}` ({}): in {} but missing from {} (or a float there)",
                    t.name,
                    dtype(t),
                    first.shard_path(t).display(),
                    other.dir.display()
                )),
                Some(u) if u.shape != t.shape || u.copied != t.copied || other.bytes(u) != first.bytes(t) => {
                    problems.push(format!(
                        "tensor `{}` ({} {:?}) differs between {} and {} ({} {:?}): tensors that are not F32, BF16 or F16 are copied from the first checkpoint, never averaged, so they must be equal in all",
                        t.name,
                        dtype(t),
                        t.shape,
                        first.shard_path(t).display(),
                        other.shard_path(u).display(),
                        dtype(u),
                        u.shape
                    ))
                }
                Some(_) => {}
            }
        }
        for u in &other.copied {
            if first.copied_tensor(&u.name).is_none() {
                problems.push(format!(
                    "tensor `{}`: in {} but missing from {} (or a float there)",
                    u.name,
                    other.shard_path(u).display(),
                    first.dir.display()
                ));
            }
        }
    }

    if problems.is_empty() {
        return Ok(());
    }
    let total = problems.len();
    let mut report: Vec<String> = problems
        .into_iter()
        .take(MAX_LISTED)
        .map(|p| format!("  - {p}"))
        .collect();
    if total > MAX_LISTED {
        report.push(format!("  ... and {} more", total - MAX_LISTED));
    }
    report.push("Only checkpoints of the same model (one training run) can be merged.".to_string());
    Err(CheckpointError::Incompatible {
        report: report.join("\n"),
    })
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "absent".into(),
        Some(v) => v.to_string(),
    }
}
