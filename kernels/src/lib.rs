//! Compute without policy. The CPU kernels here are the numerical reference for every
//! device: any GPU kernel added later must match them within the tolerance stated in its
//! module, tested on fresh random inputs.

pub mod merge;
pub mod ops;
pub mod vmath;

pub use merge::{lerp, weighted_sum, weighted_sum_serial, weighted_sum_to_f32, Input};
