//! Where a GPU forward pass spends its time, for tuning on a lent machine without a
//! profiler: with `CKMERGE_GPU_PROFILE=1` every [`span`] synchronises the stream before and
//! after its work and adds the wall time to a per-name total. The synchronisations slow the
//! pass down (the launch queue drains at every span), so profiled runs are for the split,
//! never for throughput; without the variable a span is a plain call.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::device::Gpu;
use super::GpuError;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CKMERGE_GPU_PROFILE").is_some_and(|v| v != "0"))
}

fn totals() -> &'static Mutex<BTreeMap<&'static str, (f64, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, (f64, u64)>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// Runs `f`; when profiling, timed between two synchronisations and added to `name`.
pub fn span<T>(
    gpu: &Gpu,
    name: &'static str,
    f: impl FnOnce() -> Result<T, GpuError>,
) -> Result<T, GpuError> {
    if !enabled() {
        return f();
    }
    gpu.synchronize()?;
    let t0 = Instant::now();
    let r = f()?;
    gpu.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    let mut t = totals().lock().expect("profile lock");
    let e = t.entry(name).or_default();
    e.0 += dt;
    e.1 += 1;
    Ok(r)
}

/// The totals so far as (name, seconds, calls), largest first; `None` when profiling is off.
pub fn report() -> Option<Vec<(&'static str, f64, u64)>> {
    if !enabled() {
        return None;
    }
    let t = totals().lock().expect("profile lock");
    let mut rows: Vec<_> = t.iter().map(|(k, v)| (*k, v.0, v.1)).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some(rows)
}
