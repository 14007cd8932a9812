//! Memory bandwidth of the merge kernel alone, on in-memory buffers (no files, no page
//! cache): `cargo run --release -p ckmerge-kernels --example merge_bandwidth [MB per input] [N]`.
//! Prints GB/s counting (N + 1) x tensor bytes per merge (N reads, one write), best of 10,
//! for bf16 -> bf16 and f32 -> f32. scripts/bench_merge.sh runs it beside the STREAM triad.

use ckmerge_common::DType;
use ckmerge_kernels::{weighted_sum, Input};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(512);
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    for dtype in [DType::BF16, DType::F32] {
        let bytes = mb << 20;
        // Non-zero, distinct contents so nothing is special-cased by the hardware.
        let inputs: Vec<Vec<u8>> = (0..n)
            .map(|k| {
                (0..bytes)
                    .map(|i| ((i * 31 + k * 7) % 113) as u8 & 0x3f)
                    .collect()
            })
            .collect();
        let views: Vec<Input> = inputs.iter().map(|b| Input::new(dtype, b)).collect();
        let weights: Vec<f32> = (0..n).map(|k| 1.0 / (k + 2) as f32).collect();
        let mut out = vec![0u8; bytes];
        let mut best = f64::INFINITY;
        for _ in 0..10 {
            let t = Instant::now();
            weighted_sum(&views, &weights, dtype, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let moved = ((n + 1) * bytes) as f64;
        println!(
            "{dtype} {n} inputs x {mb} MiB: {:.2} GB/s",
            moved / best / 1e9
        );
    }
}
