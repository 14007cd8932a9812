//! Work done next to the weights: the streaming out-of-core merge that writes a merged
//! Hugging Face model directory, the model definitions and held-out data, and the
//! in-memory merge-and-evaluate API ([`eval::Evaluator`]) that workers serve.

pub mod choice;
pub mod data;
pub mod eval;
pub mod listen;
pub mod merge;
pub mod model;
pub mod serve;
pub mod tenancy;
pub mod test_support;
pub mod verify;

pub use merge::{merge_to_dir, MergeError, MergeRequest, MergeSummary, Progress};
pub mod gpu;
