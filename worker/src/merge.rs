//! Streaming N-way merge of Hugging Face checkpoints into a new model directory.
//!
//! Memory stays bounded by one piece of output per thread (at most [`PIECE_BYTES`])
//! whatever the model size: inputs are memory-mapped, each tensor is merged piece by
//! piece straight from the mappings into a reused buffer and written at its offset in
//! the shard, and the input pages of a finished piece are released. The output is staged in a hidden sibling directory
//! and renamed into place after everything is synced ([`StagedDir`]), so a crash or kill
//! at any moment leaves no output directory, and inputs are never written.
//!
//! Everything that can be checked is checked before the first byte is written: all
//! inputs open and validate, agree with each other, the output does not overlap an
//! input, and the filesystem has room.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ckmerge_common::checkpoint::SAFE_WEIGHTS_INDEX_NAME;
use ckmerge_common::write::{
    index_json, plan_shards, sync_dir, OutputError, ShardPlan, StagedDir, TensorSpec,
};
use ckmerge_common::{
    check_compatible, Checkpoint, CheckpointError, DType, GroupMap, Grouping, MergeWeights,
};
use ckmerge_kernels::{weighted_sum_serial, Input};
use rayon::prelude::*;

use serde_json::{json, Value};

/// Output bytes merged and written as one unit by one thread: the working memory is one
/// such buffer per thread, whatever the tensor sizes.
pub const PIECE_BYTES: usize = 4 << 20;

/// Merged pieces waiting for the writer: enough to keep it busy while the merge threads
/// run ahead, few enough to keep memory at a few tens of MiB.
const IN_FLIGHT: usize = 4;

/// A run of elements of one tensor, written at `offset` in its shard file.
struct Piece {
    tensor: usize,
    start: usize,
    len: usize,
    offset: u64,
}

/// Splits the tensors of one shard (in file order, data starting at `data_start`) into
/// pieces of at most [`PIECE_BYTES`].
fn plan_pieces(specs: &[TensorSpec], tensors: &[usize], data_start: u64) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut offset = data_start;
    for &i in tensors {
        let size = specs[i].element_size();
        let n = specs[i].numel();
        let per = (PIECE_BYTES / size).max(1);
        let mut start = 0;
        while start < n {
            let len = per.min(n - start);
            pieces.push(Piece {
                tensor: i,
                start,
                len,
                offset: offset + (start * size) as u64,
            });
            start += len;
        }
        offset += specs[i].nbytes();
    }
    pieces
}

/// What to merge, and where.
#[derive(Clone, Debug)]
pub struct MergeRequest {
    /// Checkpoint directories, in the order their weights are given.
    pub sources: Vec<PathBuf>,
    /// One weight per source (or one vector per group of `groups`), applied as f32 (see
    /// `ckmerge_kernels::merge`).
    pub weights: MergeWeights,
    pub out: PathBuf,
    /// Output dtype for every tensor; `None` keeps each tensor's source dtype.
    pub dtype: Option<DType>,
    pub max_shard_bytes: u64,
    /// Replace an existing output directory (a previous model directory only).
    pub force: bool,
    /// Extra provenance recorded in `ckmerge.json` (for example the command line).
    pub provenance: Value,
    /// The tensor groups that per-group `weights` refer to.
    pub groups: Option<Grouping>,
    /// Split the merge across processes by output shard (see [`MergePart`]).
    pub part: Option<MergePart>,
}

/// One process's share of a merge split by output shard, for clusters: every part plans
/// the same shards and writes those whose index `j` has `j % count == index` into a shared
/// directory beside the output (`.NAME.ckmerge-parts`), each shard written to a temporary
/// name, synced and renamed, so a finished shard is never partial and a rerun of a part
/// skips shards already there. `Finish` checks every shard is there, writes the index,
/// config and provenance, and moves the whole into place atomically. The shards are the
/// bytes a single-process merge writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergePart {
    Shards { index: usize, count: usize },
    Finish { count: usize },
}

/// What a finished merge wrote.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    pub out: PathBuf,
    pub tensors: usize,
    pub shards: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// Progress reporting, so the library stays free of terminal code.
pub trait Progress: Sync {
    /// Called once, after validation, with the number of output bytes to write.
    fn start(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

impl Progress for () {}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Request(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |cause| MergeError::Io {
        path: path.into(),
        cause,
    }
}

/// Merges `req.sources` with `req.weights` into the model directory `req.out`.
pub fn merge_to_dir(
    req: &MergeRequest,
    progress: &dyn Progress,
) -> Result<MergeSummary, MergeError> {
    let t0 = Instant::now();
    if req.sources.is_empty() {
        return Err(MergeError::Request("no checkpoints to merge".into()));
    }
    if req.weights.is_single() {
        // Checked again below against the tensors; a bad vector fails before any file
        // is opened.
        req.weights
            .check(req.sources.len(), &GroupMap::single(0))
            .map_err(MergeError::Request)?;
    }

    // Validate everything before creating anything.
    let ckpts = req
        .sources
        .iter()
        .map(|p| Checkpoint::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    check_compatible(&ckpts)?;
    StagedDir::check_disjoint(&req.out, &req.sources)?;

    let first = &ckpts[0];
    let names: Vec<String> = first.tensors.iter().map(|t| t.name.clone()).collect();
    // The weights each tensor is merged with.
    let groups = GroupMap::new(req.groups.as_ref(), &names).map_err(MergeError::Request)?;
    req.weights
        .check(req.sources.len(), &groups)
        .map_err(MergeError::Request)?;
    let tensor_weights: Vec<&[f32]> = (0..names.len())
        .map(|i| req.weights.for_tensor(&groups, i))
        .collect();
    // What the header and the provenance record: the one vector, or one per group.
    let recorded = match req.weights.groups() {
        [one] => json!(one),
        all => json!(all),
    };
    // The merged tensors, then those copied from the first source (checked equal in all
    // by check_compatible), written after them.
    let mut specs: Vec<TensorSpec> = first
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: req.dtype.unwrap_or(t.dtype),
            shape: t.shape.clone(),
            copied: None,
        })
        .collect();
    specs.extend(first.copied.iter().map(|t| TensorSpec {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        copied: t.copied.clone(),
    }));
    let abs_sources: Vec<String> = req
        .sources
        .iter()
        .map(|p| {
            p.canonicalize()
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        })
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert(
        "ckmerge_version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    metadata.insert(
        "ckmerge_sources".to_string(),
        json!(abs_sources).to_string(),
    );
    metadata.insert("ckmerge_weights".to_string(), recorded.to_string());
    let plans = plan_shards(&specs, req.max_shard_bytes, &metadata);
    let total: u64 = specs.iter().map(TensorSpec::nbytes).sum();

    let bytes_read = AtomicU64::new(0);
    // NaN or inf written (a source holds them, or --dtype overflowed), and where first.
    let non_finite = AtomicU64::new(0);
    let first_non_finite = std::sync::Mutex::new(None::<String>);
    // Writes one shard, header and data, to `path` and syncs it.
    let write_shard = |plan: &ShardPlan, path: &Path| -> Result<(), MergeError> {
        let path = path.to_path_buf();
        let file = File::create(&path).map_err(io(&path))?;
        file.write_all_at(&plan.header, 0).map_err(io(&path))?;
        // The rayon threads merge pieces into buffers from a small pool; one writer thread
        // copies them into the page cache. A single writer matters: concurrent writes to
        // one file serialise on its inode lock and burn CPU spinning on it.
        let pieces = plan_pieces(&specs, &plan.tensors, plan.header.len() as u64);
        std::thread::scope(|scope| -> Result<(), MergeError> {
            let (full_tx, full_rx) =
                crossbeam_channel::bounded::<(u64, Vec<u32>, usize)>(IN_FLIGHT);
            let (free_tx, free_rx) = crossbeam_channel::unbounded::<Vec<u32>>();
            for _ in 0..IN_FLIGHT + rayon::current_num_threads() {
                free_tx
                    .send(vec![0u32; PIECE_BYTES / 4])
                    .expect("receiver alive");
            }
            let (file, path) = (&file, &path);
            let writer = scope.spawn(move || -> Result<(), MergeError> {
                for (offset, buf, len) in full_rx {
                    file.write_all_at(&bytemuck::cast_slice::<u32, u8>(&buf)[..len], offset)
                        .map_err(io(path))?;
                    // The merge side may have stopped early; nothing to do then.
                    let _ = free_tx.send(buf);
                }
                Ok(())
            });
            let merged = pieces.par_iter().try_for_each(|p| -> Result<(), ()> {
                // An error here means the writer stopped; its error is reported below.
                let mut buf = free_rx.recv().map_err(|_| ())?;
                let spec = &specs[p.tensor];
                let out_bytes = p.len * spec.element_size();
                let out = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut buf)[..out_bytes];
                if spec.copied.is_some() {
                    // Not merged: the first source's bytes (equal in all, checked).
                    let t = first.copied_tensor(&spec.name).expect("listed from it");
                    let sz = spec.element_size();
                    let (lo, hi) = (p.start * sz, (p.start + p.len) * sz);
                    out.copy_from_slice(&first.bytes(t)[lo..hi]);
                    first.release(t, lo, hi);
                    bytes_read.fetch_add(out_bytes as u64, Ordering::Relaxed);
                    full_tx.send((p.offset, buf, out_bytes)).map_err(|_| ())?;
                    progress.advance(out_bytes as u64);
                    return Ok(());
                }
                let srcs: Vec<_> = ckpts
                    .iter()
                    .map(|c| c.tensor(&spec.name).expect("checked by check_compatible"))
                    .collect();
                let inputs: Vec<Input> = ckpts
                    .iter()
                    .zip(&srcs)
                    .map(|(c, t)| {
                        let sz = t.dtype.size();
                        Input::new(t.dtype, &c.bytes(t)[p.start * sz..(p.start + p.len) * sz])
                    })
                    .collect();
                weighted_sum_serial(&inputs, tensor_weights[p.tensor], spec.dtype, out);
                let bad = ckmerge_kernels::merge::count_non_finite(spec.dtype, out);
                if bad > 0 {
                    non_finite.fetch_add(bad as u64, Ordering::Relaxed);
                    if let Ok(mut f) = first_non_finite.lock() {
                        f.get_or_insert_with(|| spec.name.clone());
                    }
                }
                for (c, t) in ckpts.iter().zip(&srcs) {
                    let sz = t.dtype.size();
                    c.release(t, p.start * sz, (p.start + p.len) * sz);
                    bytes_read.fetch_add((p.len * sz) as u64, Ordering::Relaxed);
                }
                full_tx.send((p.offset, buf, out_bytes)).map_err(|_| ())?;
                progress.advance(out_bytes as u64);
                Ok(())
            });
            drop(full_tx);
            drop(free_rx);
            writer.join().expect("the writer thread does not panic")?;
            merged.map_err(|()| {
                MergeError::Request("the merge stopped because the writer stopped".into())
            })
        })?;
        file.sync_all().map_err(io(&path))?;
        Ok(())
    };

    // Shard hashes computed while later shards are merged (single process only).
    let mut hashed: Option<BTreeMap<String, String>> = None;
    let staged = match req.part {
        Some(MergePart::Shards { index, count }) => {
            if count == 0 || index >= count {
                return Err(MergeError::Request(format!(
                    "part {index}/{count}: the index must be below the count (0-based, as SLURM_PROCID)"
                )));
            }
            let final_path = StagedDir::absolute(&req.out)?;
            if final_path.exists() && !req.force {
                return Err(MergeError::Output(OutputError::Exists(req.out.clone())));
            }
            let dir = parts_dir(&final_path)?;
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let mine: Vec<&ShardPlan> = plans
                .iter()
                .enumerate()
                .filter(|(j, _)| j % count == index)
                .map(|(_, p)| p)
                .collect();
            progress.start(mine.iter().map(|p| p.data_bytes).sum());
            let mut part_first = None;
            for plan in &mine {
                let done = dir.join(&plan.file_name);
                let record = non_finite_record(&dir, plan);
                if record.exists()
                    && std::fs::metadata(&done)
                        .is_ok_and(|m| m.len() == plan.header.len() as u64 + plan.data_bytes)
                {
                    continue; // written by an earlier run of this part
                }
                let tmp = dir.join(format!("{}.partial-{}", plan.file_name, std::process::id()));
                let before = non_finite.load(Ordering::Relaxed);
                write_shard(plan, &tmp)?;
                // The shard's count of non-finite values, for the finish step's record
                // (shards are written one at a time, so the difference is this shard's).
                let first = first_non_finite.lock().ok().and_then(|mut f| f.take());
                let record_json = json!({
                    "non_finite_values": non_finite.load(Ordering::Relaxed) - before,
                    "first": first,
                });
                part_first = part_first.or(first);
                write_synced(&record, record_json.to_string().as_bytes())?;
                std::fs::rename(&tmp, &done).map_err(io(&done))?;
            }
            sync_dir(&dir)?;
            progress.finish();
            if let Ok(mut f) = first_non_finite.lock() {
                *f = part_first;
            }
            warn_non_finite(&non_finite, &first_non_finite, req.dtype);
            return Ok(MergeSummary {
                out: dir,
                tensors: mine.iter().map(|p| p.tensors.len()).sum(),
                shards: mine.len(),
                bytes_read: bytes_read.into_inner(),
                bytes_written: mine.iter().map(|p| p.data_bytes).sum(),
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        Some(MergePart::Finish { count }) => {
            let dir = parts_dir(&StagedDir::absolute(&req.out)?)?;
            for (j, plan) in plans.iter().enumerate() {
                let f = dir.join(&plan.file_name);
                let want = plan.header.len() as u64 + plan.data_bytes;
                let record = std::fs::read(non_finite_record(&dir, plan))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
                match (std::fs::metadata(&f), record) {
                    (Ok(m), Some(r)) if m.len() == want => {
                        // The parts merged; their counts are the merge's.
                        let n = r["non_finite_values"].as_u64().unwrap_or(0);
                        non_finite.fetch_add(n, Ordering::Relaxed);
                        if let (Some(name), Ok(mut first)) =
                            (r["first"].as_str(), first_non_finite.lock())
                        {
                            first.get_or_insert_with(|| name.to_owned());
                        }
                    }
                    _ => {
                        return Err(MergeError::Request(format!(
                        "{}: shard missing or incomplete; run part {}/{count} of this merge first",
                        f.display(),
                        j % count.max(1)
                    )))
                    }
                }
            }
            let staged = StagedDir::create(&req.out, req.force)?;
            for plan in &plans {
                let to = staged.path().join(&plan.file_name);
                std::fs::rename(dir.join(&plan.file_name), &to).map_err(io(&to))?;
            }
            staged
        }
        None => {
            let staged = StagedDir::create(&req.out, req.force)?;
            staged.check_space(total)?;
            progress.start(total);
            // Each finished shard is hashed on a thread of its own while the next is
            // merged (read back from the page cache): only the last shard's hash adds
            // to the wall time.
            let (tx, rx) = crossbeam_channel::unbounded::<(String, PathBuf)>();
            let hasher = std::thread::spawn(move || {
                rx.into_iter()
                    .map(|(name, path)| crate::verify::sha256_file(&path).map(|h| (name, h)))
                    .collect::<Result<BTreeMap<String, String>, MergeError>>()
            });
            let written = plans.iter().try_for_each(|plan| {
                let path = staged.path().join(&plan.file_name);
                write_shard(plan, &path)?;
                tx.send((plan.file_name.clone(), path))
                    .expect("the hasher runs until the sender is dropped");
                Ok::<(), MergeError>(())
            });
            drop(tx);
            let hashes = hasher.join().expect("the hasher does not panic");
            written?;
            hashed = Some(hashes?);
            staged
        }
    };
    let bytes_read = bytes_read.into_inner();
    let non_finite = warn_non_finite(&non_finite, &first_non_finite, req.dtype);

    if let Some(index) = index_json(&specs, &plans) {
        write_synced(
            &staged.path().join(SAFE_WEIGHTS_INDEX_NAME),
            index.as_bytes(),
        )?;
    }
    copy_aux_files(first, staged.path(), req.dtype)?;
    // Each shard's SHA-256, for `ckmerge verify`: hashed during the merge, or here for
    // the shards of a split merge's parts (read back, one shard per thread).
    let shard_sha256 = match hashed {
        Some(h) => h,
        None => plans
            .par_iter()
            .map(|p| {
                crate::verify::sha256_file(&staged.path().join(&p.file_name))
                    .map(|h| (p.file_name.clone(), h))
            })
            .collect::<Result<BTreeMap<String, String>, MergeError>>()?,
    };
    let provenance = json!({
        "tool": "ckmerge",
        "version": env!("CARGO_PKG_VERSION"),
        "method": "linear",
        "formula": "sum_i w_i * theta_i, fp32 fused multiply-add chain in source order, rounded once (nearest-even)",
        "sources": abs_sources.iter().enumerate().map(|(i, p)| {
            let mut src = json!({"path": p});
            if let [one] = req.weights.groups() {
                src["weight"] = json!(one[i]);
            }
            // A checkpoint from the Hugging Face cache: which repository and commit.
            if let Some(h) = ckmerge_common::hub::describe(Path::new(p)) {
                src["hub"] = json!(h);
            }
            src
        }).collect::<Vec<_>>(),
        "weights_sum": match req.weights.groups() {
            [one] => json!(one.iter().map(|&w| w as f64).sum::<f64>()),
            _ => Value::Null,
        },
        "groups": req.groups.as_ref().map(|g| g.patterns().iter().zip(req.weights.groups()).map(|(p, w)| json!({"pattern": p, "weights": w})).collect::<Vec<_>>()),
        "dtype": req.dtype.map(|d| d.to_string()).unwrap_or_else(|| "as in sources".into()),
        "tensors": specs.len(),
        "total_bytes": total,
        "non_finite_values": non_finite,
        "shards": plans.iter().map(|p| p.file_name.clone()).collect::<Vec<_>>(),
        "shard_sha256": shard_sha256,
        "request": req.provenance,
    });
    let text = serde_json::to_string_pretty(&provenance).expect("plain JSON") + "\n";
    write_synced(&staged.path().join("ckmerge.json"), text.as_bytes())?;

    let out = staged.commit()?;
    if let Some(MergePart::Finish { .. }) = req.part {
        let dir = parts_dir(&out)?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    progress.finish();
    Ok(MergeSummary {
        out,
        tensors: specs.len(),
        shards: plans.len(),
        bytes_read,
        bytes_written: total,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Says (in the log) how many values of the output are NaN or inf, and where the first
/// is: a merge does not refuse them (a source may hold them on purpose), but the user
/// must hear of it. Returns the count.
fn warn_non_finite(
    count: &AtomicU64,
    first: &std::sync::Mutex<Option<String>>,
    dtype: Option<DType>,
) -> u64 {
    let n = count.load(Ordering::Relaxed);
    if n > 0 {
        let at = first
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_default();
        let cast = match dtype {
            Some(d) => format!(", or they overflowed the output dtype {d}"),
            None => String::new(),
        };
        tracing::warn!(
            "{n} values of the merged model are NaN or inf (the first in tensor `{at}`): a source holds NaN or inf there{cast}"
        );
    }
    n
}

/// Where a part of a split merge records how many values of `plan`'s shard are not
/// finite: the finish step, which merges nothing itself, sums these for ckmerge.json.
fn non_finite_record(parts_dir: &Path, plan: &ShardPlan) -> PathBuf {
    parts_dir.join(format!("{}.non-finite.json", plan.file_name))
}

/// The directory the parts of a split merge into `out` share.
fn parts_dir(out: &Path) -> Result<PathBuf, MergeError> {
    let name = out
        .file_name()
        .ok_or_else(|| MergeError::Request(format!("{}: not a directory name", out.display())))?;
    Ok(out
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!(".{}.ckmerge-parts", name.to_string_lossy())))
}

/// Copies config, generation config, tokenizer and custom-code files from the first
/// source. When every tensor is converted to one dtype, `config.json` says so (both the
/// `torch_dtype` key of transformers 4 and the `dtype` key of transformers 5, where
/// present), because transformers loads `torch_dtype="auto"` from it.
fn copy_aux_files(first: &Checkpoint, dir: &Path, dtype: Option<DType>) -> Result<(), MergeError> {
    for src in first.aux_files()? {
        let name = src.file_name().expect("a file").to_owned();
        let dst = dir.join(&name);
        if name == "config.json" {
            let mut config = first.config.clone();
            if let Some(d) = dtype {
                for key in ["torch_dtype", "dtype"] {
                    if config.contains_key(key) {
                        config.insert(key.into(), Value::String(d.torch_name().into()));
                    }
                }
            }
            let text =
                serde_json::to_string_pretty(&Value::Object(config)).expect("plain JSON") + "\n";
            write_synced(&dst, text.as_bytes())?;
        } else {
            // A failure here is most likely the output's (a full disk): name both.
            std::fs::copy(&src, &dst).map_err(|e| {
                MergeError::Request(format!(
                    "copying {} to {}: {e}",
                    src.display(),
                    dst.display()
                ))
            })?;
            File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(io(&dst))?;
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), MergeError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}
