//! Compute without policy. The CPU kernels here are the numerical reference for every
//! device: any GPU kernel added later must match them within one output ulp (see each
//! module's stated bound), tested on fresh random inputs.

pub mod merge;

pub use merge::{lerp, weighted_sum, weighted_sum_serial, Input};
