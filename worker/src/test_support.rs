//! Fixtures and tolerances shared by the tests of every crate (the worker's golden tests,
//! the end-to-end tests of the binary): the committed training trajectories in
//! `tests/fixtures/trajectory` and the numbers transformers computed on them
//! (`golden.json`, written by `scripts/fixtures/make_trajectory.py`). Not used by ckmerge
//! itself.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Relative tolerance of a mean NLL against transformers' (f32 on both sides).
pub const RTOL: f64 = 1e-4;

/// `tests/fixtures/trajectory` of this repository, or `CKMERGE_FIXTURES` where set: a test
/// binary built here and run on another machine (scripts/gpu-check.sh runs the GPU
/// evaluator's tests on a GPU machine that has no Rust) finds them there.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("CKMERGE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trajectory"),
    }
}

/// `golden.json` of the fixtures.
pub fn golden() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("golden.json")).expect("golden.json"))
        .expect("golden.json is JSON")
}

/// Fails, with both numbers, unless `got` is within [`RTOL`] of transformers' `want`.
pub fn check(what: &str, got: f64, want: f64) {
    let rel = (got - want).abs() / want.abs();
    assert!(
        rel <= RTOL,
        "{what}: transformers {want:.8}, ckmerge {got:.8} (relative error {rel:.2e} > {RTOL:e})"
    );
}

/// transformers' held-out mean NLL of the merge `lambda * cur + (1 - lambda) * previous`
/// of `model`'s trajectory (`"llama"` or `"neox"`), from `golden.json`.
pub fn golden_merge_nll(model: &str, cur: &str, lambda: f64) -> f64 {
    golden()["models"][model]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .find(|m| m["cur"] == cur && m["lambda"] == lambda)
        .unwrap_or_else(|| panic!("golden.json has no {model} merge at {cur}, lambda {lambda}"))
        ["heldout"]["mean_nll"]
        .as_f64()
        .expect("a number")
}
