//! The coordinator's library: the Bayesian-optimisation engine ([`bo`]) that proposes
//! merge weights. The `ckmerge` binary (`main.rs`) is built on it.

pub mod bo;
