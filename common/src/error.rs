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

    #[error("{dir}: no weights found; expected model.safetensors or pytorch_model.bin, or model.safetensors.index.json or pytorch_model.bin.index.json with the shards it lists")]
    NoWeights { dir: PathBuf },

    #[error("{file}: not a readable torch.save file: {reason}")]
    BadTorchFile { file: PathBuf, reason: String },

    #[error("{file}: the pickle imports `{global}`, which a state dict never needs; refused without running it (the file may be malicious, or it holds more than tensors: load it in Python with torch.load(..., weights_only=True) and save the state dict alone)")]
    ForbiddenGlobal { file: PathBuf, global: String },

    #[error("{file}: not a valid safetensors file ({reason}); it is truncated or corrupt: re-copy or re-save this shard")]
    BadSafetensors { file: PathBuf, reason: String },

    #[error("{file}: tensor `{tensor}` has dtype {dtype}, which ckmerge can neither merge (F32, BF16, F16) nor copy (whole-byte types equal in every checkpoint)")]
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
