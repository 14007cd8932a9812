//! Host wrappers for the forward-pass kernels (`ops.cu`) and the cuBLAS GEMMs, on raw
//! device pointers. Everything is enqueued on the GPU's one stream, so operations run in
//! the order they are called and buffers need no event tracking; the caller owns the
//! buffers (as `CudaSlice`s) and keeps them alive until the stream is synchronised.
//!
//! Every wrapper that takes a [`Ptr`] is an `unsafe fn`: nothing here can check that an
//! address is live, on the right device, or as large as the shapes say, so each call site
//! states why its buffers are (a `// SAFETY:` line).
//!
//! Each wrapper names its CPU reference in `crate::ops`; `kernels/tests/gpu_parity.rs`
//! holds every one to it.
//!
//! Size: one short wrapper per kernel of `ops.cu` plus the cuBLAS GEMM and the two
//! attention schedules; kept together so the host side of every kernel is in one place.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use ckmerge_common::DType;

use super::device::Gpu;
use super::merge::dtype_name;
use super::profile::span;
use super::GpuError;

/// A device address (the caller keeps the allocation alive).
pub type Ptr = u64;

/// The device address of `s`.
pub fn ptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> Ptr {
    s.device_ptr(&gpu.stream).0
}

const BLOCK: u32 = 256;

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride launches: enough blocks to fill any current GPU, no more.
fn flat_cfg(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as u64).clamp(1, 65_536) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Binds each argument to a local first: the launch builder keeps pointers to them.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr; $($arg:ident = $val:expr),* $(,)?) => {{
        // Name and shape first: the argument bindings below may shadow what they use.
        let name: String = $name;
        let cfg: LaunchConfig = $cfg;
        $(#[allow(clippy::redundant_locals)] let $arg = $val;)*
        let f = $gpu.func(&name);
        let mut b = $gpu.stream.launch_builder(f);
        $(b.arg(&$arg);)*
        // SAFETY: the argument list matches the kernel's signature in ops.cu (checked by
        // the parity tests), pointers are live device buffers sized by the caller.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(GpuError::from)
    }};
}

fn rows_i32(n: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(n).map_err(|_| GpuError::Request(format!("{what} = {n} exceeds i32")))
}

/// `x[r] = table[tokens[r]]` widened to f32 (embedding lookup).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn embed(
    gpu: &Gpu,
    dt: DType,
    tokens: Ptr,
    table: Ptr,
    x: Ptr,
    rows: usize,
    h: usize,
) -> Result<(), GpuError> {
    launch!(gpu, format!("embed_{}", dtype_name(dt)), rows_cfg(rows);
        tokens = tokens, table = table, x = x, h = rows_i32(h, "hidden")?)
}

/// RMSNorm rows of `h` (ops::rms_norm); weights `wd`, output `od`.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm(
    gpu: &Gpu,
    wd: DType,
    od: DType,
    x: Ptr,
    w: Ptr,
    eps: f32,
    out: Ptr,
    rows: usize,
    h: usize,
) -> Result<(), GpuError> {
    launch!(gpu, format!("rms_norm_{}_{}", dtype_name(wd), dtype_name(od)), rows_cfg(rows);
        x = x, w = w, eps = eps, out = out, h = rows_i32(h, "hidden")?)
}

/// LayerNorm rows of `h` (ops::layer_norm).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn layer_norm(
    gpu: &Gpu,
    wd: DType,
    od: DType,
    x: Ptr,
    w: Ptr,
    b: Ptr,
    eps: f32,
    out: Ptr,
    rows: usize,
    h: usize,
) -> Result<(), GpuError> {
    launch!(gpu, format!("layer_norm_{}_{}", dtype_name(wd), dtype_name(od)), rows_cfg(rows);
        x = x, w = w, b = b, eps = eps, out = out, h = rows_i32(h, "hidden")?)
}

/// `y[r, j] += bias[j]` for `rows` rows of `n`.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn add_bias(
    gpu: &Gpu,
    wd: DType,
    y: Ptr,
    bias: Ptr,
    rows: usize,
    n: usize,
) -> Result<(), GpuError> {
    launch!(gpu, format!("add_bias_{}", dtype_name(wd)), flat_cfg((rows * n) as u64);
        y = y, bias = bias, rows = rows as u64, n = rows_i32(n, "width")?)
}

/// `x += y` over `n` f32s (ops::add_in_place).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn add(gpu: &Gpu, x: Ptr, y: Ptr, n: usize) -> Result<(), GpuError> {
    launch!(gpu, "add_f32".to_string(), flat_cfg(n as u64); x = x, y = y, n = n as u64)
}

/// Clamps `n` f32s to `[-limit, limit]` in place (ops::clamp).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn clamp(gpu: &Gpu, x: Ptr, limit: f32, n: usize) -> Result<(), GpuError> {
    launch!(gpu, "clamp_f32".to_string(), flat_cfg(n as u64); x = x, limit = limit, n = n as u64)
}

/// `out[r] = 1 / max(||w[r, :]||, 1e-12)` over `rows` rows of `h` values in `wd`: Baichuan
/// 2's NormHead (the CPU's `Model::norm_head_scale`).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn row_inv_norm(
    gpu: &Gpu,
    wd: DType,
    w: Ptr,
    out: Ptr,
    rows: usize,
    h: usize,
) -> Result<(), GpuError> {
    launch!(gpu, format!("row_inv_norm_{}", dtype_name(wd)), rows_cfg(rows);
        w = w, out = out, h = rows_i32(h, "hidden")?)
}

/// `x[r, j] *= s[j]` over `rows` rows of `n` f32s (the NormHead's scale on logits).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn scale_cols(gpu: &Gpu, x: Ptr, s: Ptr, rows: usize, n: usize) -> Result<(), GpuError> {
    launch!(gpu, "scale_cols_f32".to_string(), flat_cfg((rows * n) as u64);
        x = x, s = s, rows = rows as u64, n = rows_i32(n, "width")?)
}

/// f32 to the compute dtype.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn to_compute(gpu: &Gpu, od: DType, x: Ptr, out: Ptr, n: usize) -> Result<(), GpuError> {
    launch!(gpu, format!("to_compute_{}", dtype_name(od)), flat_cfg(n as u64);
        x = x, out = out, n = n as u64)
}

/// Activation codes of `act_mul` in ops.cu.
pub fn act_code(a: crate::ops::Activation) -> i32 {
    match a {
        crate::ops::Activation::Silu => 0,
        crate::ops::Activation::Gelu => 1,
        crate::ops::Activation::GeluTanh => 2,
        crate::ops::Activation::Relu => 3,
    }
}

/// `out = act(x) * up` (`up` 0: no multiply) in the compute dtype (ops::activate,
/// ops::silu_mul).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn act_mul(
    gpu: &Gpu,
    od: DType,
    x: Ptr,
    up: Ptr,
    act: crate::ops::Activation,
    out: Ptr,
    n: usize,
) -> Result<(), GpuError> {
    launch!(gpu, format!("act_mul_{}", dtype_name(od)), flat_cfg(n as u64);
        x = x, up = up, kind = act_code(act), out = out, n = n as u64)
}

/// Where one attention operand sits in a projection's output rows (see `gather_heads`).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub row_stride: usize,
    pub offset: usize,
    pub head_stride: usize,
    /// Source heads (key/value heads for grouped-query attention).
    pub heads: usize,
}

/// Gathers an operand into `[batch, heads, seq, hd]` in the compute dtype, repeating
/// key/value heads `heads / src.heads` times and applying rotary embeddings to the first
/// `rot_dim` dims (0: none) — ops::apply_rope's rotate_half convention.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gather_heads(
    gpu: &Gpu,
    od: DType,
    src: Ptr,
    op: Operand,
    dst: Ptr,
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    rot_dim: usize,
    cos: Ptr,
    sin: Ptr,
) -> Result<(), GpuError> {
    let group = (heads / op.heads) as i32;
    launch!(gpu, format!("gather_heads_{}", dtype_name(od)), rows_cfg(batch * seq);
        src = src, row_stride = rows_i32(op.row_stride, "row stride")?, offset = op.offset as i32,
        head_stride = op.head_stride as i32, dst = dst, batch = batch as i32, seq = seq as i32,
        heads = heads as i32, group = group, hd = hd as i32,
        rot_dim = rot_dim as i32, cos = cos, sin = sin)
}

/// `[batch, heads, seq, hd]` f32 back to rows `[batch * seq, heads * hd]`.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn scatter_heads(
    gpu: &Gpu,
    od: DType,
    src: Ptr,
    dst: Ptr,
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
) -> Result<(), GpuError> {
    let n = (batch * heads * seq * hd) as u64;
    launch!(gpu, format!("scatter_heads_{}", dtype_name(od)), flat_cfg(n);
        src = src, dst = dst, batch = batch as i32, seq = seq as i32, heads = heads as i32, hd = hd as i32)
}

/// Causal softmax over `rows` score rows of `seq` (ops::causal_attention's softmax). With
/// `alibi` (`slopes`, `heads`: Baichuan 2 13B), `slopes[h] * j` is added first to query
/// head `h`'s score for key `j` (ops::causal_attention_biased); the rows are then
/// `[windows * heads, seq]`.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply (`slopes`: `heads` f32), alive until the stream
/// has run the launch.
pub unsafe fn causal_softmax(
    gpu: &Gpu,
    od: DType,
    scores: Ptr,
    probs: Ptr,
    (rows, seq): (usize, usize),
    alibi: Option<(Ptr, usize)>,
) -> Result<(), GpuError> {
    let od = dtype_name(od);
    match alibi {
        None => launch!(gpu, format!("causal_softmax_{od}"), rows_cfg(rows);
            scores = scores, probs = probs, seq = seq as i32),
        Some((slopes, heads)) => launch!(gpu, format!("causal_softmax_alibi_{od}"), rows_cfg(rows);
            scores = scores, probs = probs, seq = seq as i32, slopes = slopes, heads = heads as i32),
    }
}

/// `dst[i] = src[idx[i]]`, rows of `h` in the compute dtype.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn gather_rows(
    gpu: &Gpu,
    od: DType,
    src: Ptr,
    idx: Ptr,
    dst: Ptr,
    n: usize,
    h: usize,
) -> Result<(), GpuError> {
    launch!(gpu, format!("gather_rows_{}", dtype_name(od)), rows_cfg(n);
        src = src, idx = idx, dst = dst, h = h as i32)
}

/// Per-row NLL (f64) of `targets` under softmax of f32 logit rows (ops::nll_sum).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn nll_rows(
    gpu: &Gpu,
    logits: Ptr,
    targets: Ptr,
    out: Ptr,
    rows: usize,
    vocab: usize,
) -> Result<(), GpuError> {
    launch!(gpu, "nll_rows".to_string(), rows_cfg(rows);
        logits = logits, targets = targets, out = out, vocab = rows_i32(vocab, "vocab")?)
}

/// Per-row log-probability (f64) of `targets` under softmax of f32 logit rows, and a
/// byte per row, 1 where the target is the row's first maximum (ops::target_logprob).
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn logprob_rows(
    gpu: &Gpu,
    logits: Ptr,
    targets: Ptr,
    logprob: Ptr,
    greedy: Ptr,
    rows: usize,
    vocab: usize,
) -> Result<(), GpuError> {
    launch!(gpu, "logprob_rows".to_string(), rows_cfg(rows);
        logits = logits, targets = targets, logprob = logprob, greedy = greedy,
        vocab = rows_i32(vocab, "vocab")?)
}

fn cuda_type(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
    }
}

/// One GEMM description in row-major terms: `C[m, n] = alpha * A[m, k] * op(B) + beta * C`,
/// `op(B) = B^T` with `B` stored `[n, k]` (a weight, as in `nn.Linear`) when `b_trans`,
/// else `B` stored `[k, n]`. Leading dimensions are row strides. `A` and `B` in `ab`
/// (bf16, f16 or f32), `C` in f32, accumulation in f32 (TF32 is not used for f32 inputs:
/// cuBLAS's default math mode).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ab: DType,
    pub b_trans: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `C[m, n] = A[m, k] W[n, k]^T` (a linear layer without bias).
    pub fn linear(m: usize, n: usize, k: usize, ab: DType) -> Gemm {
        Gemm {
            m,
            n,
            k,
            ab,
            b_trans: true,
            lda: k,
            ldb: k,
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// Runs `count` of them, operands `stride_*` elements apart (count 1: plain GEMM).
    /// Row-major C = A op(B) is column-major C^T = op(B)^T A^T, so cuBLAS gets B first.
    ///
    /// # Safety
    /// `a`, `b` and `c` are live device allocations on `blas`'s stream's context holding
    /// `count` operands of the shapes, strides and dtypes this `Gemm` describes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        blas: &CudaBlas,
        a: Ptr,
        b: Ptr,
        c: Ptr,
        count: usize,
        stride_a: usize,
        stride_b: usize,
        stride_c: usize,
    ) -> Result<(), GpuError> {
        let int = |v: usize, what: &str| rows_i32(v, what);
        let op_b = if self.b_trans {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        };
        let t = cuda_type(self.ab);
        let (alpha, beta) = (self.alpha, self.beta);
        // SAFETY: pointers are live device buffers the caller sized for these shapes.
        unsafe {
            blas::gemm_strided_batched_ex(
                *blas.handle(),
                op_b,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                int(self.n, "n")?,
                int(self.m, "m")?,
                int(self.k, "k")?,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                t,
                int(self.ldb, "ldb")?,
                stride_b as i64,
                a as *const c_void,
                t,
                int(self.lda, "lda")?,
                stride_a as i64,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                int(self.ldc, "ldc")?,
                stride_c as i64,
                int(count, "batch")?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// Gathers q, k and v (rotary on q and k) into `dst`, each operand with its own heads, or
/// with `repeat_to` heads (key/value heads repeated, as the batched GEMMs need).
///
/// # Safety
/// As for [`gather_heads`], for every operand and destination.
#[allow(clippy::too_many_arguments)]
unsafe fn gather_qkv(
    gpu: &Gpu,
    cd: DType,
    src: [(Ptr, Operand); 3],
    dst: [Ptr; 3],
    (windows, seq): (usize, usize),
    repeat_to: Option<usize>,
    (hd, rot_dim): (usize, usize),
    (cos, sin): (Ptr, Ptr),
) -> Result<(), GpuError> {
    span(gpu, "attention: gather heads + rotary", || {
        for (i, ((p, op), d)) in src.into_iter().zip(dst).enumerate() {
            let rot = if i < 2 { rot_dim } else { 0 };
            let heads = repeat_to.unwrap_or(op.heads);
            // SAFETY: the caller's contract covers every operand and destination.
            unsafe { gather_heads(gpu, cd, p, op, d, windows, seq, heads, hd, rot, cos, sin) }?;
        }
        Ok(())
    })
}

/// Scratch space for [`causal_attention`], each sized for its `windows`: `qh`, `kh`, `vh`
/// `[windows, heads, seq, hd]` in the compute dtype, `scores` `[windows, heads, seq, seq]`
/// in f32, `probs` the same in the compute dtype, `out_h` `[windows, heads, seq, hd]` in f32.
#[derive(Clone, Copy, Debug)]
pub struct AttentionScratch {
    pub qh: Ptr,
    pub kh: Ptr,
    pub vh: Ptr,
    pub scores: Ptr,
    pub probs: Ptr,
    pub out_h: Ptr,
}

/// Causal attention over `windows` windows of `seq` rows, as the forward pass composes it
/// (the reference: ops::apply_rope on q and k, then ops::causal_attention): q, k and v
/// gathered from projection rows (`src`: the first row's address and the layout of each)
/// with rotary on q and k, scores by a strided-batched GEMM scaled by 1/sqrt(hd), causal
/// softmax (with `alibi`'s per-head slopes, `heads` f32, where given: then `rot_dim` is 0),
/// the values GEMM, and the result scattered into `out`, rows `[windows * seq, heads * hd]`
/// in the compute dtype `cd`.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn causal_attention(
    gpu: &Gpu,
    blas: &CudaBlas,
    cd: DType,
    src: [(Ptr, Operand); 3],
    scratch: &AttentionScratch,
    out: Ptr,
    windows: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    rot_dim: usize,
    (cos, sin): (Ptr, Ptr),
    alibi: Option<Ptr>,
) -> Result<(), GpuError> {
    let s = scratch;
    let dst = [s.qh, s.kh, s.vh];
    gather_qkv(
        gpu,
        cd,
        src,
        dst,
        (windows, seq),
        Some(heads),
        (hd, rot_dim),
        (cos, sin),
    )?;
    let items = windows * heads;
    let scores = Gemm {
        m: seq,
        n: seq,
        k: hd,
        ab: cd,
        b_trans: true,
        lda: hd,
        ldb: hd,
        ldc: seq,
        alpha: 1.0 / (hd as f32).sqrt(),
        beta: 0.0,
    };
    span(gpu, "attention: scores GEMM", || {
        scores.run(
            blas,
            s.qh,
            s.kh,
            s.scores,
            items,
            seq * hd,
            seq * hd,
            seq * seq,
        )
    })?;
    span(gpu, "attention: causal softmax", || {
        causal_softmax(
            gpu,
            cd,
            s.scores,
            s.probs,
            (items * seq, seq),
            alibi.map(|a| (a, heads)),
        )
    })?;
    let values = Gemm {
        m: seq,
        n: hd,
        k: seq,
        ab: cd,
        b_trans: false,
        lda: seq,
        ldb: hd,
        ldc: hd,
        alpha: 1.0,
        beta: 0.0,
    };
    span(gpu, "attention: values GEMM", || {
        values.run(
            blas,
            s.probs,
            s.vh,
            s.out_h,
            items,
            seq * seq,
            seq * hd,
            seq * hd,
        )
    })?;
    span(gpu, "attention: scatter heads", || {
        scatter_heads(gpu, cd, s.out_h, out, windows, seq, heads, hd)
    })
}

/// Head sizes the flash-attention kernel is instantiated for (multiples of 16, the MMA's
/// depth).
pub const FLASH_HEAD_DIMS: [usize; 6] = [16, 32, 64, 80, 96, 128];

/// Whether [`flash_attention`] covers this compute dtype and head size. It runs on tensor
/// cores in bf16/f16 only; f32 models (and other head sizes) use [`causal_attention`],
/// which materialises the scores.
pub fn flash_supported(cd: DType, hd: usize) -> bool {
    cd != DType::F32 && FLASH_HEAD_DIMS.contains(&hd)
}

/// Causal flash attention (the reference: ops::apply_rope on q and k, then
/// ops::causal_attention): q, k and v gathered from projection rows with rotary on q and
/// k, into `qh` `[windows, heads, seq, hd]` and `kh`, `vh` `[windows, kv_heads, seq, hd]`
/// (compute dtype, key/value heads not repeated), then one kernel that never materialises
/// the scores and writes `out`, rows `[windows * seq, heads * hd]` in the compute dtype.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flash_causal_attention(
    gpu: &Gpu,
    cd: DType,
    src: [(Ptr, Operand); 3],
    (qh, kh, vh): (Ptr, Ptr, Ptr),
    out: Ptr,
    windows: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    rot_dim: usize,
    (cos, sin): (Ptr, Ptr),
) -> Result<(), GpuError> {
    if !flash_supported(cd, hd) {
        return Err(GpuError::Request(format!(
            "flash attention covers bf16/f16 with head sizes {FLASH_HEAD_DIMS:?}, not {cd} with {hd}"
        )));
    }
    let kv_heads = src[1].1.heads;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || windows > 65_535 || heads > 65_535 {
        return Err(GpuError::Request(format!(
            "flash attention: {heads} query heads over {kv_heads} key/value heads in {windows} windows"
        )));
    }
    let dst = [qh, kh, vh];
    gather_qkv(
        gpu,
        cd,
        src,
        dst,
        (windows, seq),
        None,
        (hd, rot_dim),
        (cos, sin),
    )?;
    span(gpu, "attention: flash kernel", || {
        flash_attention(
            gpu,
            FlashVariant::for_head_dim(hd),
            format!("flash_attention_{}_d{hd}", dtype_name(cd)),
            (qh, kh, vh, out),
            windows,
            seq,
            (heads, kv_heads, hd),
        )
    })
}

/// Warps (of 16 query rows each) per block of the forward pass's flash kernel, and the
/// largest head size whose next key/value tile is copied with `cp.async` while the current
/// one is used (two tile pairs of 64 keys must fit in 48 KB of static shared memory).
/// Chosen on an H100 with `ckmerge gpu-bench --attention` (BENCHMARKS.md): at head size 64,
/// 8 warps with `cp.async` ran 0.84 ms where 4 warps without ran 1.03 ms. Since the cheaper
/// softmax arithmetic, 4 warps with `cp.async` measured fastest there (0.67 vs 0.81 ms);
/// the switch waits for an end-to-end run of scripts/gpu-check.sh.
pub const FLASH_WARPS: u32 = 8;
pub const FLASH_ASYNC_MAX_HEAD_DIM: usize = 80;

/// A schedule of the flash kernel: `warps` x 16 query rows per block, and whether the
/// next key/value tile is copied (`cp.async`) while the current one is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashVariant {
    pub hd: usize,
    pub warps: u32,
    pub asynchronous: bool,
}

impl FlashVariant {
    /// What the forward pass runs at head size `hd`.
    pub const fn for_head_dim(hd: usize) -> FlashVariant {
        FlashVariant {
            hd,
            warps: FLASH_WARPS,
            asynchronous: hd <= FLASH_ASYNC_MAX_HEAD_DIM,
        }
    }

    /// The variants `ckmerge gpu-bench --attention` times (bf16).
    pub const BENCH: [FlashVariant; 6] = [
        FlashVariant::bench(64, 4, false),
        FlashVariant::bench(64, 8, false),
        FlashVariant::bench(64, 4, true),
        FlashVariant::bench(64, 8, true),
        FlashVariant::bench(128, 4, false),
        FlashVariant::bench(128, 8, false),
    ];

    const fn bench(hd: usize, warps: u32, asynchronous: bool) -> FlashVariant {
        FlashVariant {
            hd,
            warps,
            asynchronous,
        }
    }

    /// The bench instantiation's kernel name.
    pub fn kernel(self) -> String {
        let a = if self.asynchronous { "_async" } else { "" };
        format!("flash_attention_bf16_d{}_w{}{a}", self.hd, self.warps)
    }
}

/// Launches flash kernel `name` (built with `variant`'s schedule) on gathered heads:
/// q `[windows, heads, seq, hd]`, k and v `[windows, kv_heads, seq, hd]`, out rows
/// `[windows * seq, heads * hd]`.
///
/// # Safety
/// Every [`Ptr`] argument is a live device allocation on `gpu`'s context, of the size and
/// dtype the shapes and dtypes here imply, alive until the stream has run the launch.
pub unsafe fn flash_attention(
    gpu: &Gpu,
    variant: FlashVariant,
    name: String,
    (qh, kh, vh, out): (Ptr, Ptr, Ptr, Ptr),
    windows: usize,
    seq: usize,
    (heads, kv_heads, hd): (usize, usize, usize),
) -> Result<(), GpuError> {
    let rows = 16 * variant.warps as usize;
    let cfg = LaunchConfig {
        grid_dim: (seq.div_ceil(rows) as u32, heads as u32, windows as u32),
        block_dim: (32 * variant.warps, 1, 1),
        shared_mem_bytes: 0,
    };
    let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
    let group = (heads / kv_heads) as i32;
    launch!(gpu, name, cfg;
        q = qh, k = kh, v = vh, out = out, seq = rows_i32(seq, "seq")?,
        heads = heads as i32, group = group, scale_log2 = scale_log2)
}
