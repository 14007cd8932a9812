//! The coordinator's library: the Bayesian-optimisation engine ([`bo`]) that proposes
//! merge weights, and the distributed search built on it ([`search`]: config, scheduling
//! over workers, journal, report), and the stable `--json` summaries ([`summary`]). The
//! `ckmerge` binary (`main.rs`) is built on it.

pub mod bo;
pub mod search;
pub mod summary;
