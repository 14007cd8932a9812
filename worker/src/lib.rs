//! Work done next to the weights. Today: the streaming out-of-core merge that writes a
//! merged Hugging Face model directory. The in-memory merge-and-evaluate API that
//! distributed workers serve will live here too.

pub mod data;
pub mod merge;
pub mod model;

pub use merge::{merge_to_dir, MergeError, MergeRequest, MergeSummary, Progress};
