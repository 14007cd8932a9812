//! Compute without policy. The CPU kernels here are the numerical reference for every
//! device: every CUDA kernel in [`cuda`] matches them within the tolerance stated in its
//! parity test, on fresh random inputs.

pub mod cuda;
pub mod merge;
pub mod ops;
pub mod vmath;

pub use merge::{weighted_sum, weighted_sum_serial, weighted_sum_to_f32, Input};
