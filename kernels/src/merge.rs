//! The merge kernel: `out = sum_i w_i * x_i` over N tensors of the same length.
//!
//! Numerics (the contract every device implementation follows, so CPU and GPU results
//! are bit-identical, not merely close):
//! - inputs (F32, BF16 or F16, each its own dtype) are widened exactly to f32;
//! - the sum is one chain of fused multiply-adds in input order, starting from `-0.0`:
//!   `acc = fma(w_0, x_0, -0.0); acc = fma(w_1, x_1, acc); ...` (starting from `-0.0`
//!   makes the first step exactly `round(w_0 * x_0)`, sign of zero included);
//! - `acc` is rounded once to the output dtype, round-to-nearest-even; NaN stays NaN.
//!
//! Against the exact (f64) sum `r`, the result is within half an output ulp of `r` (so
//! within one ulp, as promised to users) plus the fp32 accumulation error, at most
//! `N * 2^-24 * sum_i |w_i * x_i|`. For 16-bit outputs
//! the second term is far below an ulp except where the terms cancel; for F32 outputs
//! fp32 accumulation is the whole story. The tests check exactly this bound.
//!
//! Throughput: the work is split into chunks for rayon, each processed in L1-sized blocks
//! so the f32 accumulator never leaves cache; the inner loops are straight-line and
//! auto-vectorise. On x86-64 the block routine is compiled for AVX-512 and for AVX2+FMA
//! and picked at run time; without hardware FMA `f32::mul_add` falls back to the (exact
//! but slow) libm `fmaf`, so results never depend on the CPU.
//!
//! Size: about half of this file is its tests (every dtype, alignment, NaN and rounding
//! case).

use ckmerge_common::DType;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// One input tensor: raw little-endian bytes of `dtype` elements.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(dtype: DType, bytes: &'a [u8]) -> Self {
        Input { dtype, bytes }
    }
}

/// Elements per inner block: the f32 accumulator (4 KiB) and one converted input block
/// stay in L1.
const BLOCK: usize = 1024;
/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const TASK: usize = 64 * BLOCK;

/// `out = sum_i weights[i] * inputs[i]`, written as `out_dtype` into `out`, on all
/// rayon threads.
///
/// Panics if the lengths disagree (`out.len() / out_dtype.size()` elements in every
/// input) or if there are no inputs: callers validate shapes before calling.
pub fn weighted_sum(inputs: &[Input<'_>], weights: &[f32], out_dtype: DType, out: &mut [u8]) {
    check_args(inputs, weights, out_dtype, out);
    let osz = out_dtype.size();
    out.par_chunks_mut(TASK * osz)
        .enumerate()
        .for_each(|(t, chunk)| merge_range(inputs, weights, t * TASK, out_dtype, chunk));
}

/// [`weighted_sum`] on the calling thread only, for callers that parallelise at a
/// coarser grain (the streaming merge gives each thread its own piece of the file).
/// Bit-identical to [`weighted_sum`].
pub fn weighted_sum_serial(
    inputs: &[Input<'_>],
    weights: &[f32],
    out_dtype: DType,
    out: &mut [u8],
) {
    check_args(inputs, weights, out_dtype, out);
    merge_range(inputs, weights, 0, out_dtype, out)
}

fn check_args(inputs: &[Input<'_>], weights: &[f32], out_dtype: DType, out: &[u8]) {
    assert!(!inputs.is_empty(), "weighted_sum needs at least one input");
    assert_eq!(inputs.len(), weights.len(), "one weight per input");
    let osz = out_dtype.size();
    assert_eq!(
        out.len() % osz,
        0,
        "output length is not a whole number of elements"
    );
    let n = out.len() / osz;
    for (i, x) in inputs.iter().enumerate() {
        assert_eq!(
            x.bytes.len(),
            n * x.dtype.size(),
            "input {i} has {} bytes, expected {n} {} elements",
            x.bytes.len(),
            x.dtype
        );
    }
}

/// Merges elements `start ..` into `out`, block by block.
fn merge_range(
    inputs: &[Input<'_>],
    weights: &[f32],
    start: usize,
    out_dtype: DType,
    out: &mut [u8],
) {
    let block = block_fn();
    for (b, out_block) in out.chunks_mut(BLOCK * out_dtype.size()).enumerate() {
        // SAFETY: `block_fn` only returns a variant whose target features the running
        // CPU has (checked with `is_x86_feature_detected!`).
        unsafe { block(inputs, weights, start + b * BLOCK, out_dtype, out_block) }
    }
}

/// [`weighted_sum`] rounded once to `round_to` (the dtype `ckmerge merge` would write)
/// and widened back into the f32 buffer `out`, so an in-memory evaluation scores exactly
/// the model a merge writes. Bit-identical to `weighted_sum` then an exact widening.
pub fn weighted_sum_to_f32(
    inputs: &[Input<'_>],
    weights: &[f32],
    round_to: DType,
    out: &mut [f32],
) {
    // The same checks as for an F32 output of `out.len()` elements.
    check_args(inputs, weights, DType::F32, bytemuck::cast_slice(out));
    let block = block_fn();
    out.par_chunks_mut(TASK).enumerate().for_each(|(t, chunk)| {
        let mut tmp = [0u8; BLOCK * 4];
        for (b, ob) in chunk.chunks_mut(BLOCK).enumerate() {
            let bytes = &mut tmp[..ob.len() * round_to.size()];
            // SAFETY: as in `merge_range`: the variant matches the running CPU.
            unsafe { block(inputs, weights, t * TASK + b * BLOCK, round_to, bytes) };
            match round_to {
                DType::F32 => {
                    for (o, c) in ob.iter_mut().zip(bytes.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                DType::BF16 => {
                    for (o, c) in ob.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
                DType::F16 => {
                    for (o, c) in ob.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    }
                }
            }
        }
    });
}

/// The paper's two-checkpoint merge, `lambda * cur + (1 - lambda) * prev`
/// (`theta = lambda * theta_t + (1 - lambda) * theta_{t-1}`), is [`weighted_sum`] over
/// `[prev, cur]` with these f32 weights `[1 - lambda, lambda]`, with `1 - lambda` computed in f64 and
/// rounded once, as ckmerge does wherever it turns a lambda into weights.
pub use ckmerge_common::weights::lerp_weights;

/// How many values of `bytes` (little-endian `dtype`) are NaN or infinite: those whose
/// exponent bits are all ones. One pass over bytes the merge has just written (still in
/// cache), so the merge can say when its output is not finite.
pub fn count_non_finite(dtype: DType, bytes: &[u8]) -> usize {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000)
            .count(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
            .count(),
        DType::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
            .count(),
    }
}

type BlockFn = unsafe fn(&[Input<'_>], &[f32], usize, DType, &mut [u8]);

fn block_fn() -> BlockFn {
    use std::sync::OnceLock;
    static CHOSEN: OnceLock<BlockFn> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("fma")
            {
                return block_avx512 as BlockFn;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return block_avx2 as BlockFn;
            }
            tracing::warn!("this CPU has no FMA unit: merges are exact but slow");
        }
        block_portable as BlockFn
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn block_avx512(
    inputs: &[Input<'_>],
    weights: &[f32],
    start: usize,
    out_dtype: DType,
    out: &mut [u8],
) {
    merge_block(inputs, weights, start, out_dtype, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2(
    inputs: &[Input<'_>],
    weights: &[f32],
    start: usize,
    out_dtype: DType,
    out: &mut [u8],
) {
    merge_block(inputs, weights, start, out_dtype, out)
}

/// Safe on every CPU; `unsafe` only to share the [`BlockFn`] type.
unsafe fn block_portable(
    inputs: &[Input<'_>],
    weights: &[f32],
    start: usize,
    out_dtype: DType,
    out: &mut [u8],
) {
    merge_block(inputs, weights, start, out_dtype, out)
}

/// Merges elements `start .. start + out.len() / out_dtype.size()` (at most [`BLOCK`]).
#[inline(always)]
fn merge_block(
    inputs: &[Input<'_>],
    weights: &[f32],
    start: usize,
    out_dtype: DType,
    out: &mut [u8],
) {
    let m = out.len() / out_dtype.size();
    debug_assert!(m <= BLOCK);
    let mut acc = [-0.0f32; BLOCK];
    let mut conv = [0.0f32; BLOCK];
    let mut raw = [0u16; BLOCK];
    let acc = &mut acc[..m];
    for (x, &w) in inputs.iter().zip(weights) {
        let sz = x.dtype.size();
        let bytes = &x.bytes[start * sz..(start + m) * sz];
        match x.dtype {
            DType::F32 => {
                let xs = f32s(bytes, &mut conv[..m]);
                for (a, &v) in acc.iter_mut().zip(xs) {
                    *a = v.mul_add(w, *a);
                }
            }
            DType::BF16 => {
                let xs = u16s(bytes, &mut raw[..m]);
                for (a, &v) in acc.iter_mut().zip(xs) {
                    *a = bf16_bits_to_f32(v).mul_add(w, *a);
                }
            }
            DType::F16 => {
                let xs = u16s(bytes, &mut raw[..m]);
                let xs: &[f16] = bytemuck::cast_slice(xs);
                xs.convert_to_f32_slice(&mut conv[..m]);
                for (a, &v) in acc.iter_mut().zip(&conv[..m]) {
                    *a = v.mul_add(w, *a);
                }
            }
        }
    }
    match out_dtype {
        DType::F32 => {
            for (o, a) in out.chunks_exact_mut(4).zip(acc.iter()) {
                o.copy_from_slice(&a.to_le_bytes());
            }
        }
        DType::BF16 => {
            let r = &mut raw[..m];
            for (o, &a) in r.iter_mut().zip(acc.iter()) {
                *o = f32_to_bf16_bits_rne(a);
            }
            out.copy_from_slice(bytemuck::cast_slice(r));
        }
        DType::F16 => {
            let r: &mut [f16] = bytemuck::cast_slice_mut(&mut raw[..m]);
            r.convert_from_f32_slice(acc);
            out.copy_from_slice(bytemuck::cast_slice(r));
        }
    }
}

/// `bytes` as f32s: borrowed when aligned, else copied into `scratch`.
#[inline(always)]
fn f32s<'a>(bytes: &'a [u8], scratch: &'a mut [f32]) -> &'a [f32] {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => s,
        Err(_) => {
            bytemuck::cast_slice_mut::<f32, u8>(scratch).copy_from_slice(bytes);
            scratch
        }
    }
}

/// `bytes` as u16s: borrowed when aligned, else copied into `scratch`.
#[inline(always)]
fn u16s<'a>(bytes: &'a [u8], scratch: &'a mut [u16]) -> &'a [u16] {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => s,
        Err(_) => {
            bytemuck::cast_slice_mut::<u16, u8>(scratch).copy_from_slice(bytes);
            scratch
        }
    }
}

/// Exact widening of a bf16 bit pattern.
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, round to nearest, ties to even; NaN stays NaN (quieted, sign kept);
/// values past bf16's range round to infinity as IEEE requires. Branch-free so the loop
/// vectorises.
#[inline(always)]
pub fn f32_to_bf16_bits_rne(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x0040;
    if x.is_nan() {
        nan as u16
    } else {
        rounded as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_counted_in_every_dtype() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN, f32::INFINITY, -f32::INFINITY, f32::MAX]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::F32, &f32s), 3);
        let halves = |v: &[f32], f: fn(f32) -> u16| -> Vec<u8> {
            v.iter().flat_map(|&x| f(x).to_le_bytes()).collect()
        };
        let v = [1.0f32, f32::NAN, 70000.0, -1e30, 65504.0];
        // f16: 70000 and -1e30 overflow to inf, 65504 is its largest finite value.
        assert_eq!(
            count_non_finite(
                DType::F16,
                &halves(&v, |x| half::f16::from_f32(x).to_bits())
            ),
            3
        );
        // bf16: only the NaN (its range is f32's).
        assert_eq!(
            count_non_finite(DType::BF16, &halves(&v, f32_to_bf16_bits_rne)),
            1
        );
    }
    use half::bf16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    /// Random finite values of `dtype`, as raw bytes and as exact f64s.
    fn random_tensor(
        rng: &mut ChaCha8Rng,
        dtype: DType,
        n: usize,
        scale: f64,
    ) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = Vec::with_capacity(n * dtype.size());
        let mut vals = Vec::with_capacity(n);
        for _ in 0..n {
            let v: f64 = (rng.gen::<f64>() * 2.0 - 1.0) * scale;
            match dtype {
                DType::F32 => {
                    let x = v as f32;
                    bytes.extend_from_slice(&x.to_le_bytes());
                    vals.push(x as f64);
                }
                DType::BF16 => {
                    let x = bf16::from_f64(v);
                    bytes.extend_from_slice(&x.to_bits().to_le_bytes());
                    vals.push(x.to_f64());
                }
                DType::F16 => {
                    let x = f16::from_f64(v);
                    bytes.extend_from_slice(&x.to_bits().to_le_bytes());
                    vals.push(x.to_f64());
                }
            }
        }
        (bytes, vals)
    }

    fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
        match dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
                .collect(),
        }
    }

    /// Unit in the last place of `dtype` at magnitude `r` (subnormals included).
    fn ulp(dtype: DType, r: f64) -> f64 {
        let (mant_bits, min_exp) = match dtype {
            DType::F32 => (23, -126),
            DType::BF16 => (7, -126),
            DType::F16 => (10, -14),
        };
        let e = if r == 0.0 {
            min_exp
        } else {
            (r.abs().log2().floor() as i32).max(min_exp)
        };
        2f64.powi(e - mant_bits)
    }

    fn max_finite(dtype: DType) -> f64 {
        match dtype {
            DType::F32 => f32::MAX as f64,
            DType::BF16 => bf16::MAX.to_f64(),
            DType::F16 => f16::MAX.to_f64(),
        }
    }

    /// The contract in the module docs, against an f64 reference: every element within
    /// one output ulp plus the fp32 accumulation bound. Returns the worst error in ulps.
    fn check_against_reference(
        seed: u64,
        n_inputs: usize,
        len: usize,
        in_dtypes: &[DType],
        out_dtype: DType,
        weights: &[f32],
    ) -> f64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors: Vec<_> = in_dtypes
            .iter()
            .map(|&d| random_tensor(&mut rng, d, len, 2.0))
            .collect();
        let inputs: Vec<Input> = tensors
            .iter()
            .zip(in_dtypes)
            .map(|((b, _), &d)| Input::new(d, b))
            .collect();
        let mut out = vec![0u8; len * out_dtype.size()];
        weighted_sum(&inputs, weights, out_dtype, &mut out);
        let got = decode(out_dtype, &out);
        let mut worst = 0.0f64;
        for j in 0..len {
            let terms: Vec<f64> = tensors
                .iter()
                .zip(weights)
                .map(|((_, v), &w)| w as f64 * v[j])
                .collect();
            let exact: f64 = terms.iter().sum();
            let abs_sum: f64 = terms.iter().map(|t| t.abs()).sum();
            if exact.abs() > max_finite(out_dtype) {
                assert!(
                    got[j].is_infinite() || got[j].abs() >= max_finite(out_dtype),
                    "element {j}: expected overflow, got {}",
                    got[j]
                );
                continue;
            }
            // Round-to-nearest: half an ulp (at the larger of the two magnitudes, in case
            // rounding crossed a power of two), plus the fp32 accumulation error.
            let half_ulp = 0.5 * ulp(out_dtype, exact.abs().max(got[j].abs()));
            let bound = half_ulp + n_inputs as f64 * 2f64.powi(-24) * abs_sum;
            let err = (got[j] - exact).abs();
            assert!(
                err <= bound,
                "seed {seed}, {in_dtypes:?} -> {out_dtype}, weights {weights:?}, element {j} of {len}: \
                 expected {exact:e} (f64 reference), got {:e}; |error| {err:e} > bound {bound:e}",
                got[j]
            );
            worst = worst.max(err / ulp(out_dtype, exact));
        }
        worst
    }

    #[test]
    fn matches_f64_reference_for_every_dtype_pair() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (k, &in_d) in DTYPES.iter().enumerate() {
            for &out_d in &DTYPES {
                for n_inputs in 1..=4 {
                    // Odd lengths, lengths around block and task boundaries.
                    for &len in &[1usize, 7, 1023, 1025, TASK + 17] {
                        let weights: Vec<f32> =
                            (0..n_inputs).map(|_| rng.gen_range(0.0..1.0)).collect();
                        let dts = vec![in_d; n_inputs];
                        check_against_reference(
                            k as u64 * 1000 + len as u64,
                            n_inputs,
                            len,
                            &dts,
                            out_d,
                            &weights,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn weights_outside_unit_interval_and_mixed_input_dtypes() {
        // Extrapolation (w > 1, w < 0) is allowed by the kernel; the bound still holds.
        let weights = [1.75f32, -0.5, -0.25];
        for &out_d in &DTYPES {
            check_against_reference(
                11,
                3,
                4099,
                &[DType::BF16, DType::F16, DType::F32],
                out_d,
                &weights,
            );
        }
    }

    #[test]
    fn sixteen_bit_outputs_are_within_one_ulp_without_cancellation() {
        // Positive weights summing to one over same-sign inputs: no cancellation, so the
        // accumulation term is negligible and the result is within one ulp.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &out_d in &[DType::BF16, DType::F16] {
            let len = 10_000;
            let tensors: Vec<(Vec<u8>, Vec<f64>)> = (0..3)
                .map(|_| {
                    let (_, v) = random_tensor(&mut rng, DType::BF16, len, 1.0);
                    let v: Vec<f64> = v
                        .iter()
                        .map(|x| x.abs() + 0.5)
                        .map(|x| bf16::from_f64(x).to_f64())
                        .collect();
                    let b = v
                        .iter()
                        .flat_map(|&x| bf16::from_f64(x).to_bits().to_le_bytes())
                        .collect();
                    (b, v)
                })
                .collect();
            let w = [0.2f32, 0.3, 0.5];
            let inputs: Vec<Input> = tensors
                .iter()
                .map(|(b, _)| Input::new(DType::BF16, b))
                .collect();
            let mut out = vec![0u8; len * 2];
            weighted_sum(&inputs, &w, out_d, &mut out);
            let got = decode(out_d, &out);
            for j in 0..len {
                let exact: f64 = tensors
                    .iter()
                    .zip(&w)
                    .map(|((_, v), &w)| w as f64 * v[j])
                    .sum();
                assert!(
                    (got[j] - exact).abs() <= ulp(out_d, exact),
                    "element {j}: expected {exact}, got {}",
                    got[j]
                );
            }
        }
    }

    #[test]
    fn nan_and_infinity_propagate() {
        let len = 2051;
        for &in_d in &DTYPES {
            for &out_d in &DTYPES {
                let mut rng = ChaCha8Rng::seed_from_u64(5);
                let (mut a, _) = random_tensor(&mut rng, in_d, len, 1.0);
                let (mut b, _) = random_tensor(&mut rng, in_d, len, 1.0);
                let nan_at = [0usize, 1000, len - 1];
                let sz = in_d.size();
                let (nan_bytes, inf_bytes): (Vec<u8>, Vec<u8>) = match in_d {
                    DType::F32 => (
                        f32::NAN.to_le_bytes().to_vec(),
                        f32::INFINITY.to_le_bytes().to_vec(),
                    ),
                    DType::BF16 => (
                        bf16::NAN.to_bits().to_le_bytes().to_vec(),
                        bf16::INFINITY.to_bits().to_le_bytes().to_vec(),
                    ),
                    DType::F16 => (
                        f16::NAN.to_bits().to_le_bytes().to_vec(),
                        f16::INFINITY.to_bits().to_le_bytes().to_vec(),
                    ),
                };
                for (k, &j) in nan_at.iter().enumerate() {
                    // The NaN sits in a different input each time; zero weight does not hide it.
                    let t = if k % 2 == 0 { &mut a } else { &mut b };
                    t[j * sz..(j + 1) * sz].copy_from_slice(&nan_bytes);
                }
                a[7 * sz..8 * sz].copy_from_slice(&inf_bytes);
                let mut out = vec![0u8; len * out_d.size()];
                weighted_sum(
                    &[Input::new(in_d, &a), Input::new(in_d, &b)],
                    &[0.0, 1.0],
                    out_d,
                    &mut out,
                );
                let got = decode(out_d, &out);
                for &j in &nan_at {
                    assert!(
                        got[j].is_nan(),
                        "{in_d}->{out_d}: element {j} should be NaN, got {}",
                        got[j]
                    );
                }
                // 0 * inf is NaN under IEEE, as in PyTorch.
                assert!(
                    got[7].is_nan(),
                    "{in_d}->{out_d}: 0 * inf should be NaN, got {}",
                    got[7]
                );
                assert!(got
                    .iter()
                    .enumerate()
                    .all(|(j, v)| nan_at.contains(&j) || j == 7 || v.is_finite()));
            }
        }
    }

    #[test]
    fn lerp_is_weighted_sum_bit_for_bit() {
        // The paper's merge of two checkpoints, through the weights every caller uses.
        let lerp = |x, y, lambda, dt, out: &mut [u8]| {
            weighted_sum(&[x, y], &lerp_weights(lambda), dt, out)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (a, _) = random_tensor(&mut rng, DType::BF16, 5000, 1.0);
        let (b, _) = random_tensor(&mut rng, DType::BF16, 5000, 1.0);
        let (x, y) = (Input::new(DType::BF16, &a), Input::new(DType::BF16, &b));
        let mut o1 = vec![0u8; 10_000];
        let mut o2 = vec![0u8; 10_000];
        lerp(x, y, 0.3, DType::BF16, &mut o1);
        weighted_sum(&[x, y], &[0.7, 0.3], DType::BF16, &mut o2);
        assert_eq!(o1, o2);
        weighted_sum_serial(&[x, y], &[0.7, 0.3], DType::BF16, &mut o2);
        assert_eq!(o1, o2);
        let mut wide = vec![0f32; 5000];
        weighted_sum_to_f32(&[x, y], &[0.7, 0.3], DType::BF16, &mut wide);
        let narrow: Vec<u8> = wide
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        assert_eq!(narrow, o1, "rounding through bf16 then widening is exact");
        assert!(wide.iter().all(|v| v.to_bits() & 0xffff == 0));
        // lambda = 1 returns the later checkpoint exactly, lambda = 0 the earlier one.
        lerp(x, y, 1.0, DType::BF16, &mut o1);
        assert_eq!(o1, b);
        lerp(x, y, 0.0, DType::BF16, &mut o1);
        assert_eq!(o1, a);
    }

    #[test]
    fn misaligned_inputs_give_the_same_result() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for &d in &DTYPES {
            let (a, _) = random_tensor(&mut rng, d, 3001, 1.0);
            let mut shifted = vec![0u8; a.len() + 1];
            shifted[1..].copy_from_slice(&a);
            let mut o1 = vec![0u8; 3001 * 4];
            let mut o2 = vec![0u8; 3001 * 4];
            weighted_sum(&[Input::new(d, &a)], &[0.37], DType::F32, &mut o1);
            weighted_sum(
                &[Input::new(d, &shifted[1..])],
                &[0.37],
                DType::F32,
                &mut o2,
            );
            assert_eq!(o1, o2, "{d}");
        }
    }

    #[test]
    fn bf16_rounding_matches_half_crate() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON,
        ];
        for x in specials
            .into_iter()
            .chain((0..200_000).map(|_| f32::from_bits(rng.gen())))
        {
            let ours = f32_to_bf16_bits_rne(x);
            let theirs = bf16::from_f32(x);
            if x.is_nan() {
                assert!(bf16::from_bits(ours).is_nan(), "{x:e}");
            } else {
                assert_eq!(ours, theirs.to_bits(), "{x:e} ({:#010x})", x.to_bits());
            }
        }
    }
}
