//! Every CUDA kernel against its CPU reference, on fresh random inputs. Runs where a GPU
//! and its driver are present; elsewhere each test prints why it skipped and passes
//! (`CKMERGE_REQUIRE_GPU=1`, set by scripts/gpu-check.sh, turns a skip into a failure).
//!
//! Tolerances, per output dtype:
//! - merge: bit-identical to `weighted_sum` (same FMA chain, same rounding);
//! - embedding, bias, residual add, row gathers: exact;
//! - norms, activations, softmax, cross-entropy (f32 reductions in another order, CUDA's
//!   expf/erff): 2e-6 relative + 1e-6 absolute in f32; one ulp in bf16/f16 outputs;
//! - GEMMs and attention (cuBLAS's accumulation order): 2e-5 relative to the row's
//!   magnitude in f32; bf16 inputs are compared with the CPU on the same bf16-rounded
//!   inputs, within 1e-3 relative.
//!
//! Size: one parity test per kernel family, sharing the upload and comparison helpers.

use ckmerge_common::DType;
use ckmerge_kernels::cuda::device::Gpu;
use ckmerge_kernels::cuda::merge::{FusedMerge, MergeTensor};
use ckmerge_kernels::cuda::ops::{self as g, ptr, Gemm, Operand};
use ckmerge_kernels::merge::{bf16_bits_to_f32, f32_to_bf16_bits_rne};
use ckmerge_kernels::ops::{self, Activation, HeadLayout};
use ckmerge_kernels::{weighted_sum, Input};
use cudarc::driver::CudaSlice;
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(
                std::env::var("CKMERGE_REQUIRE_GPU").as_deref() != Ok("1"),
                "CKMERGE_REQUIRE_GPU=1 but: {e}"
            );
            eprintln!("skipping GPU parity test: {e}");
            None
        }
    }
}

fn rand_f32(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn encode(dt: DType, x: &[f32]) -> Vec<u8> {
    match dt {
        DType::F32 => bytemuck::cast_slice(x).to_vec(),
        DType::BF16 => x
            .iter()
            .flat_map(|&v| f32_to_bf16_bits_rne(v).to_le_bytes())
            .collect(),
        DType::F16 => x
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

fn decode(dt: DType, b: &[u8]) -> Vec<f32> {
    match dt {
        DType::F32 => bytemuck::cast_slice(b).to_vec(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Values as the dtype stores them (rounded), back in f32.
fn rounded(dt: DType, x: &[f32]) -> Vec<f32> {
    decode(dt, &encode(dt, x))
}

fn up_f32(gpu: &Gpu, x: &[f32]) -> CudaSlice<f32> {
    gpu.stream.clone_htod(x).unwrap()
}
fn up_bytes(gpu: &Gpu, x: &[u8]) -> CudaSlice<u8> {
    gpu.stream.clone_htod(x).unwrap()
}
fn zeros_f32(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.stream.alloc_zeros::<f32>(n.max(1)).unwrap()
}
fn zeros_bytes(gpu: &Gpu, n: usize) -> CudaSlice<u8> {
    gpu.stream.alloc_zeros::<u8>(n.max(1)).unwrap()
}
fn down_f32(gpu: &Gpu, x: &CudaSlice<f32>) -> Vec<f32> {
    gpu.stream.clone_dtoh(x).unwrap()
}
fn down_bytes(gpu: &Gpu, x: &CudaSlice<u8>) -> Vec<u8> {
    gpu.stream.clone_dtoh(x).unwrap()
}

/// |got - want| <= rel * |want| + abs, elementwise.
fn close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= rel * b.abs() + abs,
            "{what}: element {i}: GPU {a} vs CPU {b}"
        );
    }
}

/// Within one ulp of the 16-bit dtype at the reference value.
fn within_ulp(what: &str, dt: DType, got: &[f32], want: &[f32]) {
    let eps = match dt {
        DType::BF16 => 2f32.powi(-7),
        DType::F16 => 2f32.powi(-10),
        DType::F32 => 2f32.powi(-22),
    };
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let ulp = eps * b.abs().max(f32::MIN_POSITIVE * 1e3);
        assert!(
            (a - b).abs() <= ulp * 1.01,
            "{what}: element {i}: GPU {a} vs CPU {b}"
        );
    }
}

#[test]
fn merge_is_bit_identical_to_the_cpu_kernel() {
    let Some(gpu) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let lens = [1usize, 7, 8, 4095, 8195, 100_003];
    for dt in [DType::BF16, DType::F16, DType::F32] {
        for n_src in [1usize, 2, 3, 5] {
            let weights: Vec<f32> = (0..n_src).map(|_| rng.gen_range(-0.5..1.5)).collect();
            let host: Vec<Vec<Vec<u8>>> = lens
                .iter()
                .map(|&n| {
                    (0..n_src)
                        .map(|_| encode(dt, &rand_f32(&mut rng, n, 4.0)))
                        .collect()
                })
                .collect();
            let srcs: Vec<Vec<CudaSlice<u8>>> = host
                .iter()
                .map(|t| t.iter().map(|s| up_bytes(&gpu, s)).collect())
                .collect();
            let dsts: Vec<CudaSlice<u8>> = lens
                .iter()
                .map(|&n| zeros_bytes(&gpu, n * dt.size()))
                .collect();
            let tensors: Vec<MergeTensor> = (0..lens.len())
                .map(|i| MergeTensor {
                    dtype: dt,
                    dst: &dsts[i],
                    srcs: srcs[i].iter().collect(),
                })
                .collect();
            let mut plans = FusedMerge::plan(&gpu, &tensors).unwrap();
            assert_eq!(plans.len(), 1, "one launch for every tensor of one dtype");
            plans[0].run(&gpu, &weights).unwrap();
            gpu.synchronize().unwrap();
            for (i, &n) in lens.iter().enumerate() {
                let inputs: Vec<Input> = host[i].iter().map(|b| Input::new(dt, b)).collect();
                let mut want = vec![0u8; n * dt.size()];
                weighted_sum(&inputs, &weights, dt, &mut want);
                let got = down_bytes(&gpu, &dsts[i]);
                assert!(
                    got[..want.len()] == want[..],
                    "{dt} x{n_src}, tensor of {n}: GPU merge differs from the CPU kernel"
                );
            }
        }
    }
}

#[test]
fn norms_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, h) = (37, 1000);
    let x = rand_f32(&mut rng, rows * h, 3.0);
    for (wd, od) in [
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F16, DType::F16),
        (DType::F32, DType::F32),
    ] {
        let w = rounded(wd, &rand_f32(&mut rng, h, 1.5));
        let b = rounded(wd, &rand_f32(&mut rng, h, 0.5));
        let (dx, dw, db) = (
            up_f32(&gpu, &x),
            up_bytes(&gpu, &encode(wd, &w)),
            up_bytes(&gpu, &encode(wd, &b)),
        );
        let out = zeros_bytes(&gpu, rows * h * od.size());
        for layer in [false, true] {
            let mut want = vec![0f32; rows * h];
            if layer {
                ops::layer_norm(&x, &w, &b, 1e-5, &mut want);
                // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
                unsafe {
                    g::layer_norm(
                        &gpu,
                        wd,
                        od,
                        ptr(&gpu, &dx),
                        ptr(&gpu, &dw),
                        ptr(&gpu, &db),
                        1e-5,
                        ptr(&gpu, &out),
                        rows,
                        h,
                    )
                }
                .unwrap();
            } else {
                ops::rms_norm(&x, &w, 1e-5, &mut want);
                // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
                unsafe {
                    g::rms_norm(
                        &gpu,
                        wd,
                        od,
                        ptr(&gpu, &dx),
                        ptr(&gpu, &dw),
                        1e-5,
                        ptr(&gpu, &out),
                        rows,
                        h,
                    )
                }
                .unwrap();
            }
            let got = decode(od, &down_bytes(&gpu, &out));
            let what = format!(
                "{} {wd}->{od}",
                if layer { "layer_norm" } else { "rms_norm" }
            );
            match od {
                DType::F32 => close(&what, &got, &want, 2e-6, 1e-6),
                _ => within_ulp(&what, od, &got, &rounded(od, &want)),
            }
        }
    }
}

/// The norms as the GPU model also uses them: RMSNorm in place over groups narrower than
/// a row (Qwen3's per-head q/k norms, `x` = `out`), the LayerNorm kernel with weight 1
/// and bias 0 as OLMo's parameter-free LayerNorm (`ops::layer_norm_plain`), Baichuan 2's
/// NormHead, and `clip_qkv`.
#[test]
fn group_and_parameter_free_norms_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (rows, heads, hd) = (29, 6, 24);
    let x = rand_f32(&mut rng, rows * heads * hd, 3.0);
    let w = rounded(DType::BF16, &rand_f32(&mut rng, hd, 1.5));
    let mut want = vec![0f32; x.len()];
    ops::rms_norm(&x, &w, 1e-6, &mut want);
    let (dx, dw) = (up_f32(&gpu, &x), up_bytes(&gpu, &encode(DType::BF16, &w)));
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes; the kernel
    // reads each value before writing it (in place).
    unsafe {
        g::rms_norm(
            &gpu,
            DType::BF16,
            DType::F32,
            ptr(&gpu, &dx),
            ptr(&gpu, &dw),
            1e-6,
            ptr(&gpu, &dx),
            rows * heads,
            hd,
        )
    }
    .unwrap();
    close(
        "rms_norm in place over heads",
        &down_f32(&gpu, &dx),
        &want,
        2e-6,
        1e-6,
    );

    let h = 1000;
    let x = rand_f32(&mut rng, rows * h, 3.0);
    let mut want = vec![0f32; x.len()];
    ops::layer_norm_plain(&x, h, 1e-5, &mut want);
    let (dx, ones, zeros) = (
        up_f32(&gpu, &x),
        up_f32(&gpu, &vec![1.0; h]),
        up_f32(&gpu, &vec![0.0; h]),
    );
    let out = zeros_f32(&gpu, rows * h);
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe {
        g::layer_norm(
            &gpu,
            DType::F32,
            DType::F32,
            ptr(&gpu, &dx),
            ptr(&gpu, &ones),
            ptr(&gpu, &zeros),
            1e-5,
            ptr(&gpu, &out),
            rows,
            h,
        )
    }
    .unwrap();
    close(
        "parameter-free layer_norm",
        &down_f32(&gpu, &out),
        &want,
        2e-6,
        1e-6,
    );

    // Baichuan 2's NormHead: each head row's inverse norm (f64 sums on the CPU), then the
    // logits scaled by it (exact products).
    let (vocab, hid) = (300, 256);
    let head = rounded(DType::BF16, &rand_f32(&mut rng, vocab * hid, 0.1));
    let want: Vec<f32> = head
        .chunks(hid)
        .map(|r| {
            let n = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            (1.0 / n.max(1e-12)) as f32
        })
        .collect();
    let (dh, scale) = (
        up_bytes(&gpu, &encode(DType::BF16, &head)),
        zeros_f32(&gpu, vocab),
    );
    // SAFETY: as above.
    unsafe {
        g::row_inv_norm(
            &gpu,
            DType::BF16,
            ptr(&gpu, &dh),
            ptr(&gpu, &scale),
            vocab,
            hid,
        )
    }
    .unwrap();
    let got = down_f32(&gpu, &scale);
    close("row_inv_norm", &got, &want, 1e-6, 0.0);
    let logits = rand_f32(&mut rng, 7 * vocab, 4.0);
    let dl = up_f32(&gpu, &logits);
    // SAFETY: as above.
    unsafe { g::scale_cols(&gpu, ptr(&gpu, &dl), ptr(&gpu, &scale), 7, vocab) }.unwrap();
    let want: Vec<f32> = logits
        .chunks(vocab)
        .flat_map(|r| r.iter().zip(&got).map(|(v, s)| v * s).collect::<Vec<_>>())
        .collect();
    assert_eq!(down_f32(&gpu, &dl), want, "scale_cols");

    // clip_qkv: exact, NaN kept.
    let mut v = rand_f32(&mut rng, 4099, 6.0);
    v[17] = f32::NAN;
    let dv = up_f32(&gpu, &v);
    // SAFETY: as above.
    unsafe { g::clamp(&gpu, ptr(&gpu, &dv), 3.0, v.len()) }.unwrap();
    ops::clamp(&mut v, 3.0);
    let got = down_f32(&gpu, &dv);
    assert!(got[17].is_nan(), "clamp keeps NaN");
    for (i, (a, b)) in got.iter().zip(&v).enumerate().filter(|(i, _)| *i != 17) {
        assert_eq!(a.to_bits(), b.to_bits(), "clamp, value {i}");
    }
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (rows, n, vocab) = (19, 513, 50_257);
    // Embedding lookup, bias, residual add: exact.
    let table = rounded(DType::BF16, &rand_f32(&mut rng, vocab * 64, 1.0));
    let tokens: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let dt = up_bytes(&gpu, &encode(DType::BF16, &table));
    let dtok = gpu.stream.clone_htod(&tokens).unwrap();
    let x = zeros_f32(&gpu, rows * 64);
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe {
        g::embed(
            &gpu,
            DType::BF16,
            ptr(&gpu, &dtok),
            ptr(&gpu, &dt),
            ptr(&gpu, &x),
            rows,
            64,
        )
    }
    .unwrap();
    let want: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| table[t as usize * 64..(t as usize + 1) * 64].to_vec())
        .collect();
    assert_eq!(down_f32(&gpu, &x), want, "embed");

    let y = rand_f32(&mut rng, rows * n, 2.0);
    let z = rand_f32(&mut rng, rows * n, 2.0);
    let bias = rounded(DType::F16, &rand_f32(&mut rng, n, 1.0));
    let (dy, dz, dbias) = (
        up_f32(&gpu, &y),
        up_f32(&gpu, &z),
        up_bytes(&gpu, &encode(DType::F16, &bias)),
    );
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe { g::add(&gpu, ptr(&gpu, &dy), ptr(&gpu, &dz), rows * n) }.unwrap();
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe { g::add_bias(&gpu, DType::F16, ptr(&gpu, &dy), ptr(&gpu, &dbias), rows, n) }.unwrap();
    let mut want = y.clone();
    ops::add_in_place(&mut want, &z);
    want.chunks_mut(n)
        .for_each(|r| r.iter_mut().zip(&bias).for_each(|(a, b)| *a += b));
    assert_eq!(down_f32(&gpu, &dy), want, "add + add_bias");

    // Row gather (the scored rows before the head) and conversion: exact.
    let rows_bf16 = encode(DType::BF16, &y);
    let idx: Vec<u32> = vec![3, 0, 18, 7];
    let (dsrc, didx) = (
        up_bytes(&gpu, &rows_bf16),
        gpu.stream.clone_htod(&idx).unwrap(),
    );
    let picked = zeros_bytes(&gpu, idx.len() * n * 2);
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe {
        g::gather_rows(
            &gpu,
            DType::BF16,
            ptr(&gpu, &dsrc),
            ptr(&gpu, &didx),
            ptr(&gpu, &picked),
            idx.len(),
            n,
        )
    }
    .unwrap();
    let want: Vec<u8> = idx
        .iter()
        .flat_map(|&i| rows_bf16[i as usize * n * 2..(i as usize + 1) * n * 2].to_vec())
        .collect();
    assert_eq!(
        down_bytes(&gpu, &picked)[..want.len()],
        want[..],
        "gather_rows"
    );
    let conv = zeros_bytes(&gpu, rows * n * 2);
    let dy0 = up_f32(&gpu, &y);
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe {
        g::to_compute(
            &gpu,
            DType::BF16,
            ptr(&gpu, &dy0),
            ptr(&gpu, &conv),
            rows * n,
        )
    }
    .unwrap();
    assert_eq!(
        down_bytes(&gpu, &conv)[..rows_bf16.len()],
        rows_bf16[..],
        "to_compute (bf16 round to nearest even)"
    );

    // Activations (times `up` where given), written in each compute dtype.
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
    ] {
        for od in [DType::F32, DType::BF16] {
            let out = zeros_bytes(&gpu, rows * n * od.size());
            // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
            unsafe {
                g::act_mul(
                    &gpu,
                    od,
                    ptr(&gpu, &dz),
                    ptr(&gpu, &dy),
                    act,
                    ptr(&gpu, &out),
                    rows * n,
                )
            }
            .unwrap();
            let mut want = z.clone();
            ops::activate(&mut want, act);
            let y_now = down_f32(&gpu, &dy);
            want.iter_mut().zip(&y_now).for_each(|(a, u)| *a *= u);
            let got = decode(od, &down_bytes(&gpu, &out));
            let what = format!("{act:?} -> {od}");
            match od {
                DType::F32 => close(&what, &got, &want, 4e-6, 1e-6),
                _ => close(&what, &got, &rounded(od, &want), 2f32.powi(-7), 1e-6),
            }
        }
    }

    // Cross-entropy over a large vocabulary, per row in f64.
    let logits = rand_f32(&mut rng, rows * vocab, 8.0);
    let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let (dl, dtg) = (
        up_f32(&gpu, &logits),
        gpu.stream.clone_htod(&targets).unwrap(),
    );
    let dn = gpu.stream.alloc_zeros::<f64>(rows).unwrap();
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe {
        g::nll_rows(
            &gpu,
            ptr(&gpu, &dl),
            ptr(&gpu, &dtg),
            ptr(&gpu, &dn),
            rows,
            vocab,
        )
    }
    .unwrap();
    let got: f64 = gpu.stream.clone_dtoh(&dn).unwrap().iter().sum();
    let want = ops::nll_sum(&logits, vocab, &targets);
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "nll: GPU {got} vs CPU {want}"
    );

    // Per-row log-probability and is-greedy (multiple-choice continuations), with ties:
    // row 0's target is its maximum, row 1's target ties an earlier maximum (not greedy),
    // row 2's an later one (greedy).
    let mut logits = logits;
    let mut targets = targets;
    for (r, (t, tie)) in [(5usize, None), (9, Some(3usize)), (4, Some(11))]
        .into_iter()
        .enumerate()
    {
        let row = &mut logits[r * vocab..(r + 1) * vocab];
        targets[r] = t as u32;
        row[t] = 20.0;
        if let Some(j) = tie {
            row[j] = 20.0;
        }
    }
    let (dl, dtg) = (
        up_f32(&gpu, &logits),
        gpu.stream.clone_htod(&targets).unwrap(),
    );
    let dlp = gpu.stream.alloc_zeros::<f64>(rows).unwrap();
    let dg = gpu.stream.alloc_zeros::<u8>(rows).unwrap();
    // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
    unsafe {
        g::logprob_rows(
            &gpu,
            ptr(&gpu, &dl),
            ptr(&gpu, &dtg),
            ptr(&gpu, &dlp),
            ptr(&gpu, &dg),
            rows,
            vocab,
        )
    }
    .unwrap();
    let (lp, greedy) = (
        gpu.stream.clone_dtoh(&dlp).unwrap(),
        gpu.stream.clone_dtoh(&dg).unwrap(),
    );
    for (r, (&got, &top)) in lp.iter().zip(&greedy).enumerate() {
        let (want, want_top) = ops::target_logprob(&logits[r * vocab..(r + 1) * vocab], targets[r]);
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "logprob row {r}: GPU {got} vs CPU {want}"
        );
        assert_eq!(top == 1, want_top, "is-greedy row {r}");
    }
    assert_eq!(&greedy[..3], &[1, 0, 1], "the first maximum wins a tie");
}

#[test]
fn gemm_matches_the_cpu_linear() {
    let Some(gpu) = gpu() else { return };
    let blas = cudarc::cublas::CudaBlas::new(gpu.stream.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (m, k, n) = (67, 320, 200);
    for dt in [DType::F32, DType::BF16] {
        let a = rounded(dt, &rand_f32(&mut rng, m * k, 1.0));
        let w = rounded(dt, &rand_f32(&mut rng, n * k, 0.2));
        let (da, dw) = (
            up_bytes(&gpu, &encode(dt, &a)),
            up_bytes(&gpu, &encode(dt, &w)),
        );
        let dc = zeros_f32(&gpu, m * n);
        // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
        unsafe {
            Gemm::linear(m, n, k, dt).run(
                &blas,
                ptr(&gpu, &da),
                ptr(&gpu, &dw),
                ptr(&gpu, &dc),
                1,
                0,
                0,
                0,
            )
        }
        .unwrap();
        let mut want = vec![0f32; m * n];
        ops::linear(&a, m, k, &w, n, None, &mut want);
        let got = down_f32(&gpu, &dc);
        let scale = want.iter().fold(0f32, |s, v| s.max(v.abs()));
        close(&format!("linear {dt}"), &got, &want, 0.0, 2e-5 * scale);
    }
}

/// `cuda::ops::causal_attention` (gather_heads with rotary, scores GEMM, causal softmax,
/// values GEMM, scatter_heads), the composition the GPU forward pass calls, against
/// ops::apply_rope + ops::causal_attention, with grouped-query heads and partial rotary.
#[test]
fn attention_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let blas = cudarc::cublas::CudaBlas::new(gpu.stream.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (batch, seq, heads, kv, hd) = (2usize, 48usize, 4usize, 2usize, 32usize);
    let rows = batch * seq;
    let (qd, kvd) = (heads * hd, kv * hd);
    let q = rand_f32(&mut rng, rows * qd, 1.0);
    let k = rand_f32(&mut rng, rows * kvd, 1.0);
    let v = rand_f32(&mut rng, rows * kvd, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    // Rotary on 16 of the 32 dimensions; then ALiBi (Baichuan 2 13B: no rotary, a slope
    // per query head added to the scores).
    let slopes = [0.5f32, 0.25, 0.125, 0.0625];
    for (rot, alibi) in [(16usize, None), (0, Some(&slopes[..]))] {
        let inv: Vec<f64> = (0..rot / 2)
            .map(|i| 10000f64.powf(-(2.0 * i as f64) / rot as f64))
            .collect();
        let (cos, sin) = ops::rope_tables(&inv, seq);
        let (mut qr, mut kr) = (q.clone(), k.clone());
        ops::apply_rope(&mut qr, qd, 0, heads, hd, rot, seq, &cos, &sin);
        ops::apply_rope(&mut kr, kvd, 0, kv, hd, rot, seq, &cos, &sin);
        let mut want = vec![0f32; rows * qd];
        let ql = HeadLayout {
            row_stride: qd,
            head_stride: hd,
        };
        let kl = HeadLayout {
            row_stride: kvd,
            head_stride: hd,
        };
        ops::causal_attention_biased(
            &qr, ql, &kr, &v, kl, &mut want, ql, batch, seq, heads, kv, hd, scale, alibi,
        );

        let od = DType::F32;
        let (dq, dk, dv) = (up_f32(&gpu, &q), up_f32(&gpu, &k), up_f32(&gpu, &v));
        // (No rotary: empty tables, never read; one value keeps the allocation non-empty.)
        let nonempty = |t: &[f32]| if t.is_empty() { vec![0.0] } else { t.to_vec() };
        let (dcos, dsin) = (up_f32(&gpu, &nonempty(&cos)), up_f32(&gpu, &nonempty(&sin)));
        let dslopes = up_f32(&gpu, &slopes);
        let heads_len = batch * heads * seq * hd;
        let (qh, kh, vh) = (
            zeros_f32(&gpu, heads_len),
            zeros_f32(&gpu, heads_len),
            zeros_f32(&gpu, heads_len),
        );
        let opq = Operand {
            row_stride: qd,
            offset: 0,
            head_stride: hd,
            heads,
        };
        let opk = Operand {
            row_stride: kvd,
            offset: 0,
            head_stride: hd,
            heads: kv,
        };
        let scores = zeros_f32(&gpu, batch * heads * seq * seq);
        let probs = zeros_f32(&gpu, batch * heads * seq * seq);
        let out_h = zeros_f32(&gpu, heads_len);
        let out = zeros_f32(&gpu, rows * qd);
        let scratch = g::AttentionScratch {
            qh: ptr(&gpu, &qh),
            kh: ptr(&gpu, &kh),
            vh: ptr(&gpu, &vh),
            scores: ptr(&gpu, &scores),
            probs: ptr(&gpu, &probs),
            out_h: ptr(&gpu, &out_h),
        };
        // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
        unsafe {
            g::causal_attention(
                &gpu,
                &blas,
                od,
                [
                    (ptr(&gpu, &dq), opq),
                    (ptr(&gpu, &dk), opk),
                    (ptr(&gpu, &dv), opk),
                ],
                &scratch,
                ptr(&gpu, &out),
                batch,
                seq,
                heads,
                hd,
                rot,
                (ptr(&gpu, &dcos), ptr(&gpu, &dsin)),
                alibi.map(|_| ptr(&gpu, &dslopes)),
            )
        }
        .unwrap();
        let got = down_f32(&gpu, &out);
        let what = if alibi.is_some() {
            "attention f32, ALiBi"
        } else {
            "attention f32"
        };
        close(what, &got, &want, 0.0, 2e-5);
    }
}

/// The flash kernel (bf16/f16 tensor cores, online softmax) against the f32 reference on
/// the same rounded q, k, v, over every instantiated head size, sequences that end inside
/// a tile, grouped and plain heads, partial and no rotary. The output starts as NaN, so
/// an unwritten element fails. Tolerance: P is rounded to the compute type before the
/// P V product and the output is rounded once (bf16: 2^-9 relative each, f16: 2^-12), so
/// |GPU - CPU| <= 2e-2 |CPU| + 4e-3 in bf16 and 4e-3 |CPU| + 1e-3 in f16; a wrong
/// fragment layout or mask errs by the values' own size (0.1-1).
#[test]
fn flash_attention_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (cd, rel, abs) in [(DType::BF16, 2e-2, 4e-3), (DType::F16, 4e-3, 1e-3)] {
        for (i, &hd) in g::FLASH_HEAD_DIMS.iter().enumerate() {
            // (windows, seq, heads, kv heads, rotary dims) varied with the head size.
            let (batch, seq, heads, kv, rot) = match i % 3 {
                0 => (2usize, 128usize, 4usize, 2usize, hd),
                1 => (3, 100, 4, 1, hd / 2),
                _ => (1, 65, 2, 2, 0),
            };
            assert!(g::flash_supported(cd, hd));
            let rows = batch * seq;
            let (qd, kvd) = (heads * hd, kv * hd);
            let inv: Vec<f64> = (0..rot / 2)
                .map(|i| 10000f64.powf(-(2.0 * i as f64) / rot as f64))
                .collect();
            let (cos, sin) = match rot {
                0 => (vec![0.0], vec![0.0]), // unread, but a buffer must exist
                _ => ops::rope_tables(&inv, seq),
            };
            let q = rand_f32(&mut rng, rows * qd, 2.0);
            let k = rand_f32(&mut rng, rows * kvd, 1.0);
            let v = rand_f32(&mut rng, rows * kvd, 1.0);

            let (mut qr, mut kr) = (q.clone(), k.clone());
            if rot > 0 {
                ops::apply_rope(&mut qr, qd, 0, heads, hd, rot, seq, &cos, &sin);
                ops::apply_rope(&mut kr, kvd, 0, kv, hd, rot, seq, &cos, &sin);
            }
            let (qr, kr, vr) = (rounded(cd, &qr), rounded(cd, &kr), rounded(cd, &v));
            let ql = HeadLayout {
                row_stride: qd,
                head_stride: hd,
            };
            let kl = HeadLayout {
                row_stride: kvd,
                head_stride: hd,
            };
            let mut want = vec![0f32; rows * qd];
            let scale = 1.0 / (hd as f32).sqrt();
            ops::causal_attention(
                &qr, ql, &kr, &vr, kl, &mut want, ql, batch, seq, heads, kv, hd, scale,
            );

            let (dq, dk, dv) = (up_f32(&gpu, &q), up_f32(&gpu, &k), up_f32(&gpu, &v));
            let (dcos, dsin) = (up_f32(&gpu, &cos), up_f32(&gpu, &sin));
            let size = cd.size();
            let qh = zeros_bytes(&gpu, rows * qd * size);
            let (kh, vh) = (
                zeros_bytes(&gpu, rows * kvd * size),
                zeros_bytes(&gpu, rows * kvd * size),
            );
            let out = up_bytes(&gpu, &vec![0xff; rows * qd * size]);
            let op = |heads, stride| Operand {
                row_stride: stride,
                offset: 0,
                head_stride: hd,
                heads,
            };
            // SAFETY: every buffer was allocated above, on this GPU, for these shapes.
            unsafe {
                g::flash_causal_attention(
                    &gpu,
                    cd,
                    [
                        (ptr(&gpu, &dq), op(heads, qd)),
                        (ptr(&gpu, &dk), op(kv, kvd)),
                        (ptr(&gpu, &dv), op(kv, kvd)),
                    ],
                    (ptr(&gpu, &qh), ptr(&gpu, &kh), ptr(&gpu, &vh)),
                    ptr(&gpu, &out),
                    batch,
                    seq,
                    heads,
                    hd,
                    rot,
                    (ptr(&gpu, &dcos), ptr(&gpu, &dsin)),
                )
            }
            .unwrap();
            let got = decode(cd, &down_bytes(&gpu, &out));
            close(
                &format!("flash attention {cd} hd {hd} seq {seq} heads {heads}/{kv}"),
                &got,
                &want,
                rel,
                abs,
            );
        }
    }
}
