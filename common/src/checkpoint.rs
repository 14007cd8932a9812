//! Reading a Hugging Face model directory: `config.json` plus weights, either safetensors
//! (one `model.safetensors` or shards listed by `model.safetensors.index.json`) or
//! PyTorch's `torch.save` files (`pytorch_model.bin`, or shards listed by
//! `pytorch_model.bin.index.json`), read by [`crate::torch_file`] without running Python.
//!
//! Shards are memory-mapped; nothing is copied at open time (torch stores each tensor
//! storage uncompressed, so a `.bin` tensor is a byte range of the file too). Opening
//! validates every shard header (offsets, sizes, dtypes) and cross-checks the index
//! against the shards, so a truncated shard or a stale index is reported before any work
//! starts, naming the file and tensor.
//!
//! The lookup order follows `transformers.PreTrainedModel.from_pretrained`: a single
//! `model.safetensors` wins over an index, and safetensors over `.bin`, so ckmerge reads
//! what transformers would load.
//!
//! A `.bin` state dict holds tied weights twice (`lm_head.weight` and the embedding, one
//! storage), where `save_pretrained` writes safetensors without the copy: a tensor that is
//! exactly another's bytes is dropped as safetensors saving drops it, so `.bin` and
//! safetensors checkpoints of one model list the same tensors and merge together.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::CheckpointError;
use crate::torch_file::{self, TorchFileError};

pub const CONFIG_NAME: &str = "config.json";
pub const SAFE_WEIGHTS_NAME: &str = "model.safetensors";
pub const SAFE_WEIGHTS_INDEX_NAME: &str = "model.safetensors.index.json";
pub const TORCH_WEIGHTS_NAME: &str = "pytorch_model.bin";
pub const TORCH_WEIGHTS_INDEX_NAME: &str = "pytorch_model.bin.index.json";

/// One tensor of a checkpoint, located in a mapped shard.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::shards`].
    pub shard: usize,
    /// Absolute byte range of the data inside the shard file.
    pub start: usize,
    pub end: usize,
    /// A tensor ckmerge copies instead of merging (not F32, BF16 or F16: a bool mask, an
    /// integer table, f64): its safetensors dtype name and element size. Such entries are
    /// in [`Checkpoint::copied`], never in [`Checkpoint::tensors`] (whose `dtype` they
    /// would misstate).
    pub copied: Option<(String, usize)>,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// A mapped weights file: safetensors, or a `torch.save` archive.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    /// The file's `__metadata__`, if any.
    pub metadata: BTreeMap<String, String>,
}

/// An opened, validated Hugging Face model directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Map<String, Value>,
    pub shards: Vec<Shard>,
    /// Tensors in storage order (shard, then offset): the order `save_pretrained` wrote
    /// them, which is the model's module order.
    pub tensors: Vec<TensorEntry>,
    /// Tensors that are not floats ckmerge merges: a merge copies them from the first
    /// checkpoint, after `check_compatible` has checked that every checkpoint holds the
    /// same bytes (they are never averaged).
    pub copied: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens and validates `dir`. Fails with an error naming the offending file and
    /// tensor; never writes anything.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let meta = std::fs::metadata(dir).map_err(|e| CheckpointError::io(dir, e))?;
        if !meta.is_dir() {
            return Err(CheckpointError::NotADirectory { dir: dir.into() });
        }
        let config = read_config(dir)?;
        let neox = config.get("model_type").and_then(Value::as_str) == Some("gpt_neox");
        let skip = |name: &str| is_dropped_buffer(name, neox);

        let single = dir.join(SAFE_WEIGHTS_NAME);
        let index = dir.join(SAFE_WEIGHTS_INDEX_NAME);
        let torch_single = dir.join(TORCH_WEIGHTS_NAME);
        let torch_index = dir.join(TORCH_WEIGHTS_INDEX_NAME);
        let (shards, mut tensors) = if single.is_file() {
            let (shard, tensors) = map_shard(&single, 0, &skip)?;
            (vec![shard], tensors)
        } else if index.is_file() {
            open_sharded(dir, &index, map_shard, &skip)?
        } else if torch_single.is_file() {
            let (shard, tensors) = map_torch_file(&torch_single, 0, &skip)?;
            (vec![shard], tensors)
        } else if torch_index.is_file() {
            open_sharded(dir, &torch_index, map_torch_file, &skip)?
        } else {
            return Err(CheckpointError::NoWeights { dir: dir.into() });
        };
        drop_aliases(&mut tensors);
        let (copied, tensors): (Vec<TensorEntry>, Vec<TensorEntry>) =
            tensors.into_iter().partition(|t| t.copied.is_some());

        let mut by_name = HashMap::with_capacity(tensors.len());
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for t in tensors.iter().chain(&copied) {
            if let Some(&shard) = seen.get(t.name.as_str()) {
                return Err(CheckpointError::DuplicateTensor {
                    file: shards[t.shard].path.clone(),
                    other: shards[shard].path.clone(),
                    tensor: t.name.clone(),
                });
            }
            seen.insert(&t.name, t.shard);
        }
        for (i, t) in tensors.iter().enumerate() {
            by_name.insert(t.name.clone(), i);
        }
        Ok(Checkpoint {
            dir: dir.into(),
            config,
            shards,
            tensors,
            copied,
            by_name,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The copied (non-float) tensor `name`, if any.
    pub fn copied_tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.copied.iter().find(|t| t.name == name)
    }

    /// The raw little-endian bytes of `t`, straight from the mapping.
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.shards[t.shard].map[t.start..t.end]
    }

    pub fn shard_path(&self, t: &TensorEntry) -> &Path {
        &self.shards[t.shard].path
    }

    /// Tells the kernel that bytes `lo..hi` of `t`'s data will not be read again soon, so
    /// a streaming pass over a model larger than memory keeps its resident set near one
    /// chunk. The page cache keeps the data; a later read simply faults it back in.
    pub fn release(&self, t: &TensorEntry, lo: usize, hi: usize) {
        debug_assert!(lo <= hi && hi <= t.nbytes());
        let map = &self.shards[t.shard].map;
        // SAFETY: the mapping is read-only and file-backed (MAP_SHARED, never written), so
        // MADV_DONTNEED only drops our page-table entries; any later access re-reads the
        // same bytes from the page cache. No reference into the range is invalidated.
        let r =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, t.start + lo, hi - lo) };
        if let Err(e) = r {
            tracing::debug!(
                "madvise(DONTNEED) on {}: {e}",
                self.shards[t.shard].path.display()
            );
        }
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }

    /// The model's dtype if every tensor has the same one.
    pub fn uniform_dtype(&self) -> Option<DType> {
        let first = self.tensors.first()?.dtype;
        self.tensors
            .iter()
            .all(|t| t.dtype == first)
            .then_some(first)
    }

    /// Files that belong in a model directory besides the weights: configs, tokenizer
    /// files, and custom modeling code (`*.py`, for `trust_remote_code` models such as
    /// Baichuan). Trainer state (`optimizer.pt`, `rng_state.pth`, `trainer_state.json`, ...)
    /// and weights are deliberately not included: they do not describe the merged model.
    pub fn aux_files(&self) -> Result<Vec<PathBuf>, CheckpointError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| CheckpointError::io(&self.dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| CheckpointError::io(&self.dir, e))?;
            let ft = entry
                .file_type()
                .map_err(|e| CheckpointError::io(entry.path(), e))?;
            if !(ft.is_file() || ft.is_symlink() && entry.path().is_file()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_model_aux_file(&name) {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Whether a file of a model directory describes the model (and so is copied into a
/// merged model) rather than being weights or training state.
pub fn is_model_aux_file(name: &str) -> bool {
    const EXACT: [&str; 9] = [
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "preprocessor_config.json",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    EXACT.contains(&name)
        || name.starts_with("vocab.")
        || name.starts_with("chat_template")
        || name.ends_with(".tiktoken")
        || name.ends_with(".py")
}

fn read_config(dir: &Path) -> Result<Map<String, Value>, CheckpointError> {
    let path = dir.join(CONFIG_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingConfig { dir: dir.into() })
        }
        Err(e) => return Err(CheckpointError::io(&path, e)),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CheckpointError::BadConfig {
            file: path,
            reason: "expected a JSON object".into(),
        }),
        Err(e) => Err(CheckpointError::BadConfig {
            file: path,
            reason: e.to_string(),
        }),
    }
}

/// Maps a weights file read-only, to be read front to back.
fn map_file(path: &Path) -> Result<Mmap, CheckpointError> {
    let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    // SAFETY: the mapping is read-only. ckmerge never writes its inputs; a checkpoint
    // rewritten by another process during a merge is documented as unsupported (as it is
    // for transformers and safetensors, which map files the same way).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
    let _ = map.advise(Advice::Sequential);
    Ok(map)
}

/// Maps and validates one safetensors file; returns it with its tensors in storage
/// order, dtypes checked, located as shard number `shard_idx`.
fn map_shard(
    path: &Path,
    shard_idx: usize,
    skip: Skip,
) -> Result<(Shard, Vec<TensorEntry>), CheckpointError> {
    let map = map_file(path)?;
    // `read_metadata` checks the header, that offsets are contiguous and match each
    // tensor's shape and dtype, and that the file is exactly as long as the header says.
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        CheckpointError::BadSafetensors {
            file: path.into(),
            reason: e.to_string(),
        }
    })?;
    let data_start = 8 + header_len;
    let mut tensors = Vec::new();
    for (name, info) in header.tensors().into_iter().filter(|(n, _)| !skip(n)) {
        let (dtype, copied) = match DType::from_safetensors(info.dtype) {
            Some(d) => (d, None),
            // Copied, not merged; whole bytes only (sub-byte floats are refused).
            None if info.dtype.bitsize().is_multiple_of(8) => (
                DType::F32,
                Some((info.dtype.to_string(), info.dtype.bitsize() / 8)),
            ),
            None => {
                return Err(CheckpointError::UnsupportedDtype {
                    file: path.into(),
                    tensor: name.clone(),
                    dtype: info.dtype.to_string(),
                })
            }
        };
        tensors.push(TensorEntry {
            name,
            dtype,
            shape: info.shape.clone(),
            shard: shard_idx,
            start: data_start + info.data_offsets.0,
            end: data_start + info.data_offsets.1,
            copied,
        });
    }
    tensors.sort_by_key(|t| t.start);
    let metadata = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let shard = Shard {
        path: path.into(),
        map,
        metadata,
    };
    Ok((shard, tensors))
}

/// Maps one `torch.save` archive and locates its tensors (see [`crate::torch_file`]).
fn map_torch_file(
    path: &Path,
    shard_idx: usize,
    skip: Skip,
) -> Result<(Shard, Vec<TensorEntry>), CheckpointError> {
    let map = map_file(path)?;
    let stored = torch_file::read_state_dict(&map).map_err(|e| match e {
        TorchFileError::Forbidden(global) => CheckpointError::ForbiddenGlobal {
            file: path.into(),
            global,
        },
        e => CheckpointError::BadTorchFile {
            file: path.into(),
            reason: e.to_string(),
        },
    })?;
    let mut tensors = Vec::with_capacity(stored.len());
    for t in stored.into_iter().filter(|t| !skip(&t.name)) {
        // Floats ckmerge merges, or the safetensors name of a type it copies.
        let (dtype, copied) = match t.storage.as_str() {
            "Float" => (DType::F32, None),
            "BFloat16" => (DType::BF16, None),
            "Half" => (DType::F16, None),
            other => {
                let name = match other {
                    "Bool" => "BOOL",
                    "Byte" => "U8",
                    "Char" => "I8",
                    "Short" => "I16",
                    "Int" => "I32",
                    "Long" => "I64",
                    "Double" => "F64",
                    _ => {
                        return Err(CheckpointError::UnsupportedDtype {
                            file: path.into(),
                            tensor: t.name,
                            dtype: format!("torch {other}"),
                        })
                    }
                };
                let size = torch_file::element_size(other).expect("a known storage");
                (DType::F32, Some((name.to_string(), size)))
            }
        };
        tensors.push(TensorEntry {
            name: t.name,
            dtype,
            shape: t.shape,
            shard: shard_idx,
            start: t.start,
            end: t.end,
            copied,
        });
    }
    // Storage order, as for safetensors; a shared storage keeps its tensors in dict order.
    tensors.sort_by_key(|t| t.start);
    let shard = Shard {
        path: path.into(),
        map,
        metadata: BTreeMap::new(),
    };
    Ok((shard, tensors))
}

/// Drops each tensor that is exactly an earlier one's bytes (same file, range, dtype and
/// shape): tied weights in a `.bin` state dict, which safetensors files written by
/// `save_pretrained` hold once. The first in storage order stays (the embedding, which
/// the model lists before its head). Safetensors files cannot hold such aliases (their
/// header validation refuses overlapping ranges), so this only ever applies to `.bin`.
fn drop_aliases(tensors: &mut Vec<TensorEntry>) {
    let mut seen = std::collections::HashSet::new();
    tensors.retain(|t| {
        let key = (
            t.shard,
            t.start,
            t.end,
            t.dtype,
            t.copied.clone(),
            t.shape.clone(),
        );
        let first = seen.insert(key);
        if !first {
            tracing::debug!(
                "`{}` is another tensor's storage (a tied weight): dropped",
                t.name
            );
        }
        first
    });
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// How one weights file is mapped and read: [`map_shard`] or [`map_torch_file`].
type MapFn = fn(&Path, usize, Skip) -> Result<(Shard, Vec<TensorEntry>), CheckpointError>;

/// Which tensor names a checkpoint's reader leaves out ([`is_dropped_buffer`]).
type Skip<'a> = &'a dyn Fn(&str) -> bool;

/// Buffers old checkpoints hold that are not weights, and that transformers ignores when
/// loading (they are recomputed from the config): rotary `inv_freq` tables in any model
/// (`rotary_emb.inv_freq`, ignored by every model since they became non-persistent), and
/// GPT-NeoX's causal mask `attention.bias` (bool) and `attention.masked_bias` (Pythia's
/// older revisions; its `_keys_to_ignore_on_load_unexpected`). They are neither merged
/// nor written, as transformers' own save leaves them out.
pub fn is_dropped_buffer(name: &str, gpt_neox: bool) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
        || gpt_neox
            && (name.ends_with(".attention.bias") || name.ends_with(".attention.masked_bias"))
}

/// Opens the shards an index lists, each with `map` (safetensors or torch).
fn open_sharded(
    dir: &Path,
    index_path: &Path,
    map: MapFn,
    skip: Skip,
) -> Result<(Vec<Shard>, Vec<TensorEntry>), CheckpointError> {
    let text =
        std::fs::read_to_string(index_path).map_err(|e| CheckpointError::io(index_path, e))?;
    let index: IndexFile = serde_json::from_str(&text).map_err(|e| CheckpointError::BadIndex {
        file: index_path.into(),
        reason: e.to_string(),
    })?;
    if index.weight_map.is_empty() {
        return Err(CheckpointError::BadIndex {
            file: index_path.into(),
            reason: "`weight_map` is empty".into(),
        });
    }

    // Shard files in the order of their names (model-00001-of-... sorts correctly).
    let mut files: Vec<&str> = index.weight_map.values().map(String::as_str).collect();
    files.sort_unstable();
    files.dedup();
    let mut shards = Vec::with_capacity(files.len());
    let mut tensors = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let rel = Path::new(f);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(CheckpointError::BadIndex {
                file: index_path.into(),
                reason: format!("shard path `{f}` must be a file name inside the model directory"),
            });
        }
        let path = dir.join(rel);
        if !path.is_file() {
            let tensor = index
                .weight_map
                .iter()
                .find(|(_, v)| v.as_str() == *f)
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            return Err(CheckpointError::MissingShard {
                index: index_path.into(),
                dir: dir.into(),
                tensor,
                shard: f.to_string(),
            });
        }
        let (shard, shard_tensors) = map(&path, i, skip)?;
        tensors.extend(shard_tensors);
        shards.push(shard);
    }

    // The index and the shards must agree exactly: a tensor present in a shard but not
    // in the index would be silently dropped by transformers, so refuse both ways.
    let mut located: HashMap<&str, usize> = HashMap::with_capacity(tensors.len());
    for t in &tensors {
        let expected = index.weight_map.get(&t.name);
        let here = files[t.shard];
        match expected {
            Some(f) if f == here => {
                located.insert(&t.name, t.shard);
            }
            // Indexed under another shard: reported below as missing from that shard.
            Some(_) => {}
            None => {
                return Err(CheckpointError::UnindexedTensor {
                    index: index_path.into(),
                    tensor: t.name.clone(),
                    shard: shards[t.shard].path.clone(),
                })
            }
        }
    }
    for (name, f) in index.weight_map.iter().filter(|(n, _)| !skip(n)) {
        if !located.contains_key(name.as_str()) {
            return Err(CheckpointError::IndexTensorMissing {
                index: index_path.into(),
                tensor: name.clone(),
                shard: dir.join(f),
            });
        }
    }
    Ok((shards, tensors))
}
