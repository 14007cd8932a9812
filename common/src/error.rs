//! Typed errors for checkpoint I/O. Every variant carries the file (and the tensor, where
//! there is one) and says what the user can do about it: these messages are the whole
//! interface a user has when a 70B checkpoint is malformed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{dir}: not a directory; a checkpoint is a Hugging Face model directory holding config.json and safetensors weights")]
    NotADirectory { dir: PathBuf },

    #[error("{dir}: no config.json; a checkpoint must be a Hugging Face model directory (save it with `model.save_pretrained(dir)`)")]
    MissingConfig { dir: PathBuf },

    #[error("{file}: invalid config.json: {reason}")]
    BadConfig { file: PathBuf, reason: String },

    #[error("{dir}: holds only PyTorch pickle weights ({file}); ckmerge reads safetensors. Convert once with:\n  python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{dir}').save_pretrained('{dir}-safetensors', safe_serialization=True)\"\nand pass the new directory")]
    PickleOnly { dir: PathBuf, file: String },

    #[error("{dir}: no weights found; expected model.safetensors, or model.safetensors.index.json with its model-0000k-of-0000n.safetensors shards")]
    NoWeights { dir: PathBuf },

    #[error("{file}: not a valid safetensors file ({reason}); it is truncated or corrupt: re-copy or re-save this shard")]
    BadSafetensors { file: PathBuf, reason: String },

    #[error("{file}: tensor `{tensor}` has dtype {dtype}; ckmerge merges only F32, BF16 and F16 tensors")]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{file}: invalid index: {reason}; the index must be JSON with a `weight_map` from tensor name to shard file, as written by `save_pretrained`")]
    BadIndex { file: PathBuf, reason: String },

    #[error(
        "{index}: tensor `{tensor}` is mapped to shard {shard}, which does not exist in {dir}"
    )]
    MissingShard {
        index: PathBuf,
        dir: PathBuf,
        tensor: String,
        shard: String,
    },

    #[error("{index}: tensor `{tensor}` is mapped to {shard}, but that file does not contain it; the index and the shards come from different saves")]
    IndexTensorMissing {
        index: PathBuf,
        tensor: String,
        shard: PathBuf,
    },

    #[error("{shard}: tensor `{tensor}` is not listed in {index}; the index and the shards come from different saves")]
    UnindexedTensor {
        index: PathBuf,
        tensor: String,
        shard: PathBuf,
    },

    #[error("{file}: tensor `{tensor}` also appears in {other}; each tensor must be stored once")]
    DuplicateTensor {
        file: PathBuf,
        other: PathBuf,
        tensor: String,
    },

    #[error("the checkpoints cannot be merged:\n{report}")]
    Incompatible { report: String },
}

impl CheckpointError {
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        CheckpointError::Io {
            path: path.into(),
            cause,
        }
    }
}
