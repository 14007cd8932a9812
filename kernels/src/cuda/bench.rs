//! Merge bandwidth on one GPU, against a device-to-device copy measured in the same run
//! (for `ckmerge gpu-bench merge` and scripts/gpu-check.sh). The merge of N sources moves
//! (N + 1) x the model's bytes (N reads, one write); a copy moves 2 x its bytes. Both are
//! timed over whole launches after a warm-up, on synchronised streams.

use std::time::Instant;

use ckmerge_common::DType;
use cudarc::driver::CudaSlice;

use super::device::Gpu;
use super::merge::{FusedMerge, MergeTensor};
use super::GpuError;

#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeBandwidth {
    pub gpu: String,
    pub dtype: String,
    pub sources: usize,
    pub tensors: usize,
    pub model_bytes: u64,
    /// Bytes moved by one merge, (N + 1) x model bytes, over its time.
    pub merge_gb_s: f64,
    pub merge_ms: f64,
    /// Read + write bytes of a device-to-device copy of the same total size, over its time.
    pub copy_gb_s: f64,
    pub ratio: f64,
}

/// Splits `total` elements into tensors shaped like a transformer's (a few large
/// matrices, many small vectors), so the one-launch table is exercised as in a model.
fn tensor_lens(total: usize) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut left = total;
    let mut i = 0usize;
    while left > 0 {
        let n = match i % 5 {
            0 => 4096,      // a norm vector
            1 => left / 16, // attention-sized matrices
            _ => left / 8,  // MLP-sized
        }
        .clamp(1, left);
        lens.push(n);
        left -= n;
        i += 1;
    }
    lens
}

/// Fills `buf` with values in [-1, 1) of `dtype` (a repeated 16 MiB random pattern,
/// shifted per buffer): never time on zeros, which can hide unwritten output and run
/// faster than real data.
fn fill_random(
    gpu: &Gpu,
    buf: &mut CudaSlice<u8>,
    dtype: DType,
    seed: u64,
) -> Result<(), GpuError> {
    const PATTERN: usize = 16 << 20;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // xorshift64*: plenty for bench data.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 * 2.0 - 1.0
    };
    let pattern: Vec<u8> = match dtype {
        DType::BF16 => (0..PATTERN / 2)
            .flat_map(|_| half::bf16::from_f32(next()).to_le_bytes())
            .collect(),
        DType::F16 => (0..PATTERN / 2)
            .flat_map(|_| half::f16::from_f32(next()).to_le_bytes())
            .collect(),
        DType::F32 => (0..PATTERN / 4)
            .flat_map(|_| next().to_le_bytes())
            .collect(),
    };
    let len = buf.len();
    let mut at = 0;
    while at < len {
        let n = PATTERN.min(len - at);
        let mut view = buf.slice_mut(at..at + n);
        gpu.stream.memcpy_htod(&pattern[..n], &mut view)?;
        at += n;
    }
    Ok(())
}

pub fn merge_bandwidth(
    gpu: &Gpu,
    model_bytes: u64,
    n_src: usize,
    dtype: DType,
    iters: usize,
) -> Result<MergeBandwidth, GpuError> {
    let s = &gpu.stream;
    let elems = (model_bytes as usize / dtype.size()).max(1);
    let lens = tensor_lens(elems);
    let mut srcs: Vec<Vec<CudaSlice<u8>>> = lens
        .iter()
        .map(|&n| {
            (0..n_src)
                .map(|_| s.alloc_zeros::<u8>(n * dtype.size()))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    let dsts: Vec<CudaSlice<u8>> = lens
        .iter()
        .map(|&n| s.alloc_zeros::<u8>(n * dtype.size()))
        .collect::<Result<_, _>>()?;
    for (i, b) in srcs.iter_mut().flatten().enumerate() {
        fill_random(gpu, b, dtype, i as u64 + 1)?;
    }
    let tensors: Vec<MergeTensor> = dsts
        .iter()
        .zip(&srcs)
        .map(|(d, ss)| MergeTensor {
            dtype,
            dst: d,
            srcs: ss.iter().collect(),
        })
        .collect();
    let mut plans = FusedMerge::plan(gpu, &tensors)?;
    let w: Vec<f32> = (0..n_src).map(|i| 1.0 / (i + 1) as f32).collect();
    let time = |f: &mut dyn FnMut() -> Result<(), GpuError>| -> Result<f64, GpuError> {
        f()?;
        gpu.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        gpu.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    };
    let merge_s = time(&mut || {
        for p in plans.iter_mut() {
            p.run(gpu, &w)?;
        }
        Ok(())
    })?;
    drop(tensors);
    drop(srcs);
    // The copy: one buffer of the merge's total traffic / 2 (read + write).
    let bytes = (elems * dtype.size()) as u64;
    let copy_len = ((n_src as u64 + 1) * bytes / 2) as usize;
    let mut a = s.alloc_zeros::<u8>(copy_len)?;
    fill_random(gpu, &mut a, dtype, 0)?;
    let mut b = s.alloc_zeros::<u8>(copy_len)?;
    let copy_s = time(&mut || {
        s.memcpy_dtod(&a, &mut b)?;
        Ok(())
    })?;
    let merge_gb_s = (n_src as u64 + 1) as f64 * bytes as f64 / merge_s / 1e9;
    let copy_gb_s = 2.0 * copy_len as f64 / copy_s / 1e9;
    Ok(MergeBandwidth {
        gpu: gpu.name.clone(),
        dtype: dtype.to_string(),
        sources: n_src,
        tensors: lens.len(),
        model_bytes: bytes,
        merge_gb_s,
        merge_ms: merge_s * 1e3,
        copy_gb_s,
        ratio: merge_gb_s / copy_gb_s,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn tensor_lengths_cover_the_total() {
        for total in [1usize, 100, 1 << 20, 123_456_789] {
            let l = super::tensor_lens(total);
            assert_eq!(l.iter().sum::<usize>(), total);
            assert!(l.iter().all(|&n| n > 0));
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AttentionTiming {
    pub gpu: String,
    pub kernel: String,
    pub hd: usize,
    pub warps: u32,
    pub asynchronous: bool,
    pub windows: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ms: f64,
    /// Causal FLOPs (4 x hd per query-key pair at or below the diagonal) over the time.
    pub tflop_s: f64,
    /// Output bit for bit the first variant's (all compute the same function).
    pub identical: bool,
}

/// Times every bench variant of the flash kernel at head size `hd` (bf16) on the same
/// random gathered heads, after checking each writes exactly what the first one does.
pub fn attention_variants(
    gpu: &Gpu,
    windows: usize,
    seq: usize,
    (heads, kv_heads, hd): (usize, usize, usize),
    iters: usize,
) -> Result<Vec<AttentionTiming>, GpuError> {
    use super::ops::{flash_attention, ptr, FlashVariant};
    let s = &gpu.stream;
    let dt = DType::BF16;
    let mut bufs = Vec::new();
    for (i, n) in [heads, kv_heads, kv_heads].into_iter().enumerate() {
        let mut b = s.alloc_zeros::<u8>(windows * n * seq * hd * dt.size())?;
        fill_random(gpu, &mut b, dt, 100 + i as u64)?;
        bufs.push(b);
    }
    let out_len = windows * seq * heads * hd * dt.size();
    let mut first: Option<Vec<u8>> = None;
    let mut rows = Vec::new();
    let pairs = (seq * (seq + 1) / 2) as f64;
    let flops = 4.0 * hd as f64 * heads as f64 * windows as f64 * pairs;
    for v in FlashVariant::BENCH.into_iter().filter(|v| v.hd == hd) {
        let mut out = s.alloc_zeros::<u8>(out_len)?;
        fill_random(gpu, &mut out, dt, 7)?; // poison: every element must be rewritten
        let run = || {
            // SAFETY: `bufs` and `out` are live allocations on this GPU of the sizes the
            // shapes imply (allocated above for these shapes).
            unsafe {
                flash_attention(
                    gpu,
                    v,
                    v.kernel(),
                    (
                        ptr(gpu, &bufs[0]),
                        ptr(gpu, &bufs[1]),
                        ptr(gpu, &bufs[2]),
                        ptr(gpu, &out),
                    ),
                    windows,
                    seq,
                    (heads, kv_heads, hd),
                )
            }
        };
        run()?;
        gpu.synchronize()?;
        let got = s.clone_dtoh(&out)?;
        let identical = match &first {
            None => {
                first = Some(got);
                true
            }
            Some(f) => *f == got,
        };
        let t0 = Instant::now();
        for _ in 0..iters {
            run()?;
        }
        gpu.synchronize()?;
        let secs = t0.elapsed().as_secs_f64() / iters as f64;
        rows.push(AttentionTiming {
            gpu: gpu.name.clone(),
            kernel: v.kernel(),
            hd,
            warps: v.warps,
            asynchronous: v.asynchronous,
            windows,
            seq,
            heads,
            kv_heads,
            ms: secs * 1e3,
            tflop_s: flops / secs / 1e12,
            identical,
        });
    }
    Ok(rows)
}
