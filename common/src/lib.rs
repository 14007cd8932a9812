//! What every ckmerge process shares: the error types, the tensor dtypes ckmerge merges,
//! the types that cross crate and process boundaries ([`WindowSpec`], [`MergeWeights`],
//! [`Grouping`]),
//! the coordinator–worker protocol ([`protocol`]), and Hugging Face checkpoint I/O (model
//! directories holding `config.json` and safetensors or `pytorch_model.bin` weights,
//! single-file or sharded with an index).
//!
//! Invariants owned here:
//! - a [`Checkpoint`] is validated completely when opened (every shard's header, every
//!   index entry, every dtype), so later code never meets a malformed tensor;
//! - nothing here writes into a directory the user gave; the writer only creates files.

pub mod checkpoint;
pub mod compat;
pub mod dtype;
pub mod error;
pub mod groups;
pub mod hub;
pub mod protocol;
pub mod race;
pub mod size;
pub mod torch_file;
pub mod weights;
pub mod window;
pub mod write;

pub use checkpoint::{Checkpoint, TensorEntry};
pub use compat::check_compatible;
pub use dtype::DType;
pub use error::CheckpointError;
pub use groups::{GroupMap, Grouping};
pub use weights::MergeWeights;
pub use window::{TokenBits, WindowSpec};
