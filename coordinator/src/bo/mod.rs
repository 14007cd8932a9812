//! Batch Bayesian optimisation over merge weights.
//!
//! The method of Liu et al. (arXiv 2403.19390, "checkpoint merging via Bayesian
//! optimization"): a Gaussian-process surrogate of the held-out mean NLL, with EI, PI and
//! LCB combined by GP-Hedge (Hoffman, Brochu and de Freitas 2011), starting from the two
//! ends of `lambda`'s range. Generalised here to N checkpoints on the simplex (searched in
//! the unit cube through a stick-breaking bijection) and to batches of proposals that
//! account for evaluations still running (the expected improvement a point adds to them
//! under the joint posterior with EI; the Kriging believer with the other acquisitions).
//!
//! What must stay true: the surrogate only ever sees completed evaluations (a failure is
//! remembered as a point not to propose again, never as a value); for a given seed and the
//! same sequence of observations the proposals are identical; the whole state serialises
//! ([`Optimizer`] is `Serialize`), so a restarted coordinator resumes exactly.

pub mod acquisition;
pub mod gp;
pub mod optimizer;
pub mod posterior;
pub mod space;

pub use acquisition::{Acquisition, Hedge};
pub use optimizer::{BoConfig, Observation, Optimizer, StopReason};
pub use space::SearchSpace;
