//! Which GPUs a worker uses and how a model is placed on them: `--gpus` resolution and
//! the split of the decoder layers into contiguous ranges, one per GPU, by bytes.

use std::ops::Range;

/// `--gpus` as [`resolve_gpus`], except that `auto` means the CPU when `cpu_only` says
/// why the work cannot run on a GPU (said in the log): `auto` is "the best device for
/// this work". An explicit choice of GPUs is kept, and the load refuses it by name.
pub fn resolve_gpus_for(arg: &str, cpu_only: Option<&str>) -> Result<Option<Vec<usize>>, String> {
    match cpu_only {
        Some(why) if arg.trim() == "auto" => {
            tracing::info!("running on the CPU (--gpus auto): {why}");
            Ok(None)
        }
        _ => resolve_gpus(arg),
    }
}

/// Why `--gpus auto` holds a model of `model_type` (config.json's) on the CPU: its GPU
/// path has compiled and its CPU reference is tested, but it has not yet run on a GPU
/// (`scripts/gpu-check.sh` checks it). Explicit GPUs use the path.
pub fn unverified_on_gpu(model_type: &str) -> Option<&'static str> {
    match model_type {
        "qwen3" => Some(
            "Qwen3's GPU path (its per-head q/k norms) has not been run on a GPU yet (pass --gpus to use it)",
        ),
        "olmo" => Some(
            "OLMo's GPU path (parameter-free LayerNorms, clip_qkv) has not been run on a GPU yet (pass --gpus to use it)",
        ),
        "olmo2" => Some(
            "OLMo 2's GPU path (output norms, q/k norms over the projections) has not been run on a GPU yet (pass --gpus to use it)",
        ),
        "baichuan" => Some(
            "Baichuan 2's GPU path (its normalised head; the 13B's ALiBi) has not been run on a GPU yet (pass --gpus to use it)",
        ),
        "smollm3" => Some(
            "SmolLM3's GPU path (its layers without RoPE) has not been run on a GPU yet (pass --gpus to use it)",
        ),
        _ => None,
    }
}

/// config.json's `model_type` in model directory `dir`, where it can be read (the load
/// reports what is wrong with it otherwise).
pub fn model_type(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some(v.get("model_type")?.as_str()?.to_string())
}

/// Resolves a `--gpus` argument: None for the CPU, else the CUDA ordinals to use. `auto`
/// picks every visible GPU and says so, or says why it runs on the CPU; `all` and explicit
/// lists fail when there is no usable GPU. An ordinal may repeat: the layers are then split
/// across the same GPU twice, which runs the multi-GPU path (shards, hidden states copied
/// between them) on a machine with one.
pub fn resolve_gpus(arg: &str) -> Result<Option<Vec<usize>>, String> {
    use ckmerge_kernels::cuda::device::device_count;
    match arg.trim() {
        "none" | "cpu" => Ok(None),
        "auto" => match device_count() {
            Ok(n) => {
                tracing::info!("using {n} GPU(s) (--gpus auto)");
                Ok(Some((0..n).collect()))
            }
            Err(e) => {
                tracing::info!("running on the CPU (--gpus auto): {e}");
                Ok(None)
            }
        },
        "all" => {
            let n = device_count().map_err(|e| format!("--gpus all: {e}"))?;
            Ok(Some((0..n).collect()))
        }
        list => {
            let ids = list
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    format!("--gpus {list}: use auto, all, none or CUDA ordinals like 0,1")
                })?;
            let n = device_count().map_err(|e| format!("--gpus {list}: {e}"))?;
            if let Some(bad) = ids.iter().find(|&&i| i >= n) {
                return Err(format!("--gpus {list}: GPU {bad} asked for, {n} visible"));
            }
            Ok(Some(ids))
        }
    }
}

/// Bytes each layer range needs on a GPU: every source plus the merged copy.
#[derive(Clone, Debug)]
pub struct MemoryNeed {
    /// Per decoder layer, in order.
    pub layers: Vec<u64>,
    /// Embedding (first GPU) and final norm + head (last GPU).
    pub first_extra: u64,
    pub last_extra: u64,
    /// Activations of one batch, on every GPU.
    pub activations: u64,
}

/// Splits layers `0..n` into contiguous ranges, one per GPU, as even in bytes as the
/// layer granularity allows; fails, saying how many GPUs of this size it would take,
/// when they do not fit. `free[i]`: usable bytes on GPU `i`.
pub fn plan_layers(need: &MemoryNeed, free: &[u64]) -> Result<Vec<Range<usize>>, String> {
    let n = need.layers.len();
    let k = free.len().min(n.max(1));
    if k == 0 {
        return Err("no GPU to place the model on".into());
    }
    let total: u64 = need.layers.iter().sum::<u64>() + need.first_extra + need.last_extra;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let fits = |ranges: &[Range<usize>]| {
        ranges.iter().enumerate().all(|(i, r)| {
            let mut b: u64 = need.layers[r.clone()].iter().sum::<u64>() + need.activations;
            if i == 0 {
                b += need.first_extra;
            }
            if i + 1 == ranges.len() {
                b += need.last_extra;
            }
            b <= free[i]
        })
    };
    // Cut where the running total passes each GPU's even share.
    let mut ranges = Vec::with_capacity(k);
    let (mut start, mut acc) = (0usize, need.first_extra);
    for i in 0..n {
        acc += need.layers[i];
        let share = total * (ranges.len() as u64 + 1) / k as u64;
        let left = n - i - 1;
        let gpus_left = k - ranges.len() - 1;
        if ranges.len() + 1 < k && (acc >= share || left == gpus_left) && left >= gpus_left {
            ranges.push(start..i + 1);
            start = i + 1;
        }
    }
    ranges.push(start..n);
    if fits(&ranges) {
        return Ok(ranges);
    }
    let smallest = free.iter().copied().min().unwrap_or(0);
    let usable = smallest.saturating_sub(need.activations).max(1);
    let gpus = total.div_ceil(usable);
    Err(format!(
        "the model does not fit: its sources and merged copy need {:.1} GiB plus {:.1} GiB of activations per GPU, and the {} GPU(s) have {:.1} GiB free (smallest); it needs about {gpus} GPUs of this size — split it over nodes with workers.pipelines, or use fewer sources or a smaller batch",
        gib(total),
        gib(need.activations),
        free.len(),
        gib(smallest)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(layers: &[u64], first: u64, last: u64, act: u64) -> MemoryNeed {
        MemoryNeed {
            layers: layers.to_vec(),
            first_extra: first,
            last_extra: last,
            activations: act,
        }
    }

    #[test]
    fn auto_means_the_cpu_for_cpu_only_work_and_an_explicit_choice_stays() {
        // No GPU is touched for `auto` with a reason, whatever the machine has.
        assert_eq!(resolve_gpus_for("auto", Some("tasks")), Ok(None));
        assert_eq!(resolve_gpus_for(" auto ", Some("tasks")), Ok(None));
        assert_eq!(resolve_gpus_for("none", None), Ok(None));
        // An explicit list is resolved as asked (an error where there is no GPU), never
        // turned into the CPU.
        assert_ne!(resolve_gpus_for("0", Some("tasks")), Ok(None));
    }

    #[test]
    fn auto_holds_a_model_whose_gpu_path_has_not_run_on_a_gpu_on_the_cpu() {
        let arch = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/trajectory/architectures");
        let qwen3 = model_type(&arch.join("qwen3/a")).unwrap();
        assert_eq!(qwen3, "qwen3");
        let why = unverified_on_gpu(&qwen3).expect("Qwen3 is not yet checked on a GPU");
        assert!(why.contains("--gpus"), "{why}");
        assert_eq!(resolve_gpus_for("auto", Some(why)), Ok(None));
        for t in ["olmo", "olmo2", "smollm3", "baichuan"] {
            assert!(unverified_on_gpu(t).is_some(), "{t}");
        }
        assert_eq!(unverified_on_gpu("llama"), None);
        // Unreadable: no reason (the load says what is wrong).
        assert_eq!(model_type(&arch.join("no-such-model")), None);
    }

    #[test]
    fn layers_are_split_evenly_by_bytes() {
        let n = need(&[10; 8], 10, 10, 1);
        assert_eq!(plan_layers(&n, &[100, 100]).unwrap(), vec![0..4, 4..8]);
        // Four GPUs: contiguous, non-empty, none more than one layer over an even share.
        let r = plan_layers(&n, &[100; 4]).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].start, r[3].end), (0, 8));
        assert!(r
            .windows(2)
            .all(|w| w[0].end == w[1].start && !w[0].is_empty()));
        let load = |i: usize| {
            10 * r[i].len() as u64 + if i == 0 { 10 } else { 0 } + if i == 3 { 10 } else { 0 }
        };
        assert!((0..4).all(|i| load(i) <= 100 / 4 + 10), "{r:?}");
        // One GPU takes everything that fits.
        assert_eq!(plan_layers(&n, &[101]).unwrap(), vec![0..8]);
        // More GPUs than layers: one layer each, the rest unused.
        let small = need(&[10; 2], 0, 0, 0);
        assert_eq!(plan_layers(&small, &[100; 4]).unwrap(), vec![0..1, 1..2]);
    }

    #[test]
    fn a_model_that_does_not_fit_says_how_many_gpus_it_needs() {
        let gib = 1u64 << 30;
        let n = need(&[10 * gib; 8], 5 * gib, 5 * gib, gib);
        let e = plan_layers(&n, &[40 * gib, 40 * gib]).unwrap_err();
        assert!(e.contains("it needs about 3 GPUs"), "{e}");
        assert!(e.contains("workers.pipelines"), "{e}");
    }
}
