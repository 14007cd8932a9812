//! The GPU backend of the forward pass: the [`Backend`] operations on one shard, with the
//! residual stream and every reduction in f32 and GEMM inputs in the checkpoint's dtype
//! (bf16: as transformers runs it, with f32 accumulation); plus the embedding lookup and
//! the output head's NLL, which every architecture shares. The CPU reference is
//! `crate::model::cpu`.

use ckmerge_common::DType;
use ckmerge_kernels::cuda::merge::dtype_name;
use ckmerge_kernels::cuda::ops::{self as g, ptr, Gemm, Operand, Ptr};
use ckmerge_kernels::cuda::profile::span;
use ckmerge_kernels::cuda::GpuError;
use cudarc::driver::CudaSlice;

use super::shard::Shard;
use super::{flash, HEAD_ROWS, SCORES_BYTES};
use crate::data::Batch;
use crate::model::backend::{Backend, Head, Heads, Linear, Norm, Qkv};
use crate::model::ModelConfig;

/// The operations of one shard, for a model computing in `cd`.
pub(super) struct ShardOps<'a> {
    pub shard: &'a Shard,
    pub c: &'a ModelConfig,
    pub cd: DType,
}

fn operand(h: Heads) -> Operand {
    Operand {
        row_stride: h.row_stride,
        offset: h.offset,
        head_stride: h.head_stride,
        heads: h.heads,
    }
}

impl ShardOps<'_> {
    /// `out (+)= x W^T (+ b)`, `x` in the compute dtype; with `accumulate` the residual
    /// add is the GEMM's epilogue (beta = 1, one f32 rounding as in a separate add),
    /// saving a pass over the hidden states and a buffer per projection.
    fn linear_into(
        &self,
        x: Ptr,
        rows: usize,
        w: &Linear<usize>,
        out: &CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let s = self.shard;
        let (cd, wt) = (self.cd, s.tensor(w.weight));
        if wt.dtype != cd {
            return Err(GpuError::Request(format!(
                "`{}` is {} but the model computes in {cd}: mixed-dtype linear layers are not supported on the GPU",
                wt.name, wt.dtype
            )));
        }
        let (n, k) = (w.out, w.inp);
        let what = if wt.name.contains(".mlp.") {
            "linear: MLP"
        } else {
            "linear: attention projections"
        };
        let gemm = Gemm {
            beta: if accumulate { 1.0 } else { 0.0 },
            ..Gemm::linear(rows, n, k, cd)
        };
        span(&s.gpu, what, || {
            // SAFETY: `x` holds `rows x k` values in the compute dtype (the caller's
            // buffer, sized by the layer's shapes), the weight is a `[n, k]` tensor of this
            // shard checked at load, `out` holds `rows x n` f32; all on this GPU.
            unsafe { gemm.run(&s.blas, x, s.p(w.weight), ptr(&s.gpu, out), 1, 0, 0, 0) }?;
            if let Some(b) = w.bias {
                let bt = s.tensor(b);
                // SAFETY: the bias is an `[n]` tensor of this shard; `out` as above.
                unsafe { g::add_bias(&s.gpu, bt.dtype, ptr(&s.gpu, out), s.p(b), rows, n) }?;
            }
            Ok(())
        })
    }

    /// Hidden states `[tokens, hidden]` after the embedding lookup.
    pub fn embed(&self, embed: usize, tokens: &[u32]) -> Result<CudaSlice<f32>, GpuError> {
        let s = self.shard;
        let (rows, h) = (tokens.len(), self.c.hidden);
        let stream = &s.gpu.stream;
        let dt = stream.clone_htod(tokens)?;
        let x = stream.alloc_zeros::<f32>(rows * h)?;
        let e = s.tensor(embed);
        // SAFETY: `dt` holds the `rows` tokens (checked below the vocabulary by the
        // evaluator), the table is the `[vocab, h]` embedding checked at load, `x` was just
        // allocated for `rows x h` f32.
        unsafe {
            g::embed(
                &s.gpu,
                e.dtype,
                ptr(&s.gpu, &dt),
                ptr(&s.gpu, &e.merged),
                ptr(&s.gpu, &x),
                rows,
                h,
            )
        }?;
        Ok(x)
    }

    /// Final norm, output head and cross-entropy of the scored rows, summed in row order
    /// on the host (per-row values in f64, as the CPU does).
    pub fn head_nll(
        &self,
        head: &Head<usize>,
        x: &CudaSlice<f32>,
        batch: &Batch,
    ) -> Result<f64, GpuError> {
        let (mut idx, mut targets) = (Vec::new(), Vec::new());
        for b in 0..batch.tokens.len() / batch.seq {
            for t in batch.seq - 1 - batch.scored..batch.seq - 1 {
                let r = b * batch.seq + t;
                idx.push(r as u32);
                targets.push(batch.tokens[r + 1]);
            }
        }
        let gpu = &self.shard.gpu;
        let dtg = gpu.stream.clone_htod(&targets)?;
        let nll = gpu.stream.alloc_zeros::<f64>(idx.len().max(1))?;
        self.head_rows(head, x, batch.tokens.len(), &idx, |r0, m, logits| {
            // SAFETY: `logits` holds `m` rows of `vocab` f32 (see `head_rows`); `dtg` and
            // `nll` hold one target and one f64 per picked row, `r0 + m <= idx.len()`.
            span(gpu, "head: log-softmax NLL", || unsafe {
                g::nll_rows(
                    gpu,
                    logits,
                    ptr(gpu, &dtg) + (r0 * 4) as u64,
                    ptr(gpu, &nll) + (r0 * 8) as u64,
                    m,
                    self.c.vocab,
                )
            })
        })?;
        let per_row = gpu.stream.clone_dtoh(&nll)?;
        Ok(per_row[..idx.len()].iter().sum())
    }

    /// The log-probability of `targets[i]` at row `idx[i]` of `x` (`rows` rows), and
    /// whether it is that row's first maximum: multiple-choice continuations, as
    /// `ops::target_logprob` on the CPU.
    pub fn head_logprobs(
        &self,
        head: &Head<usize>,
        x: &CudaSlice<f32>,
        rows: usize,
        idx: &[u32],
        targets: &[u32],
    ) -> Result<Vec<(f64, bool)>, GpuError> {
        assert_eq!(idx.len(), targets.len());
        let gpu = &self.shard.gpu;
        let n = idx.len().max(1);
        let dtg = gpu.stream.clone_htod(targets)?;
        let lp = gpu.stream.alloc_zeros::<f64>(n)?;
        let top = gpu.stream.alloc_zeros::<u8>(n)?;
        self.head_rows(head, x, rows, idx, |r0, m, logits| {
            // SAFETY: `logits` holds `m` rows of `vocab` f32 (see `head_rows`); `dtg`, `lp`
            // and `top` hold one u32, f64 and byte per picked row, `r0 + m <= idx.len()`.
            span(gpu, "head: log-probabilities", || unsafe {
                g::logprob_rows(
                    gpu,
                    logits,
                    ptr(gpu, &dtg) + (r0 * 4) as u64,
                    ptr(gpu, &lp) + (r0 * 8) as u64,
                    ptr(gpu, &top) + r0 as u64,
                    m,
                    self.c.vocab,
                )
            })
        })?;
        let (lp, top) = (gpu.stream.clone_dtoh(&lp)?, gpu.stream.clone_dtoh(&top)?);
        Ok(lp
            .into_iter()
            .zip(top)
            .take(idx.len())
            .map(|(l, t)| (l, t == 1))
            .collect())
    }

    /// Final norm and output head of rows `idx` of `x` (`rows x hidden` f32), at most
    /// `HEAD_ROWS` rows per logits GEMM; `each(r0, m, logits)` runs after the GEMM of
    /// picked rows `r0..r0 + m`, with `logits` a device pointer to their `m x vocab` f32.
    fn head_rows(
        &self,
        head: &Head<usize>,
        x: &CudaSlice<f32>,
        rows: usize,
        idx: &[u32],
        mut each: impl FnMut(usize, usize, Ptr) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let s = self.shard;
        s.gpu.ctx.bind_to_thread()?;
        let (c, cd, gpu) = (self.c, self.cd, &s.gpu);
        let h = c.hidden;
        assert!(
            idx.iter().all(|&i| (i as usize) < rows),
            "row index out of range"
        );
        let mut normed = s.c_buf(cd, rows * h)?;
        self.norm(x, &head.norm, &mut normed, rows)?;
        let stream = &gpu.stream;
        let didx = stream.clone_htod(idx)?;
        let picked = s.c_buf(cd, idx.len().max(1) * h)?;
        // SAFETY: `normed` holds `rows x h` values in `cd`, every index is below `rows`
        // (asserted above), `picked` was just allocated for `idx.len() x h` values in `cd`.
        unsafe {
            g::gather_rows(
                gpu,
                cd,
                ptr(gpu, &normed),
                ptr(gpu, &didx),
                ptr(gpu, &picked),
                idx.len(),
                h,
            )
        }?;
        let chunk = HEAD_ROWS.min(idx.len().max(1));
        let logits = s.f32_buf(chunk * c.vocab)?;
        let mut r0 = 0;
        while r0 < idx.len() {
            let m = chunk.min(idx.len() - r0);
            let a = ptr(gpu, &picked) + (r0 * h * cd.size()) as u64;
            // SAFETY: rows `r0..r0 + m` of `picked` (`h` values in `cd` each), the
            // `[vocab, h]` head checked at load, `logits` sized for `chunk >= m` rows of
            // `vocab` f32.
            span(gpu, "head: logits GEMM", || unsafe {
                Gemm::linear(m, c.vocab, h, cd).run(
                    &s.blas,
                    a,
                    s.p(head.lm_head),
                    ptr(gpu, &logits),
                    1,
                    0,
                    0,
                    0,
                )
            })?;
            if let Some(scale) = &s.head_scale {
                // SAFETY: `logits` holds `m` rows of `vocab` f32, `scale` `vocab` f32.
                span(gpu, "head: NormHead scale", || unsafe {
                    g::scale_cols(gpu, ptr(gpu, &logits), ptr(gpu, scale), m, c.vocab)
                })?;
            }
            each(r0, m, ptr(gpu, &logits))?;
            r0 += m;
        }
        Ok(())
    }
}

/// Refuses a norm whose weight dtype and output dtype have no kernel instance
/// (`NORM_PAIRS`), naming `what` (a tensor, or the norm) and its dtype.
fn norm_pair(what: &str, wd: DType, od: DType) -> Result<(), GpuError> {
    match ckmerge_kernels::cuda::NORM_PAIRS.contains(&(dtype_name(wd), dtype_name(od))) {
        true => Ok(()),
        false => Err(GpuError::Request(format!(
            "{what} is {wd} in a model computing in {od}: this norm is not implemented on the GPU (use --gpus none)"
        ))),
    }
}

/// The error for an operation with a CPU reference but no GPU kernel yet.
fn not_on_gpu(what: &str) -> GpuError {
    GpuError::Request(format!(
        "{what}: not implemented on the GPU yet; evaluate on the CPU with --gpus none"
    ))
}

impl Backend for ShardOps<'_> {
    type Tensor = usize;
    type Rows = CudaSlice<f32>;
    type Input = CudaSlice<u8>;
    type Error = GpuError;

    fn config(&self) -> &ModelConfig {
        self.c
    }

    fn rows(&self, n: usize) -> Result<CudaSlice<f32>, GpuError> {
        self.shard.f32_buf(n)
    }

    fn input(&self, n: usize) -> Result<CudaSlice<u8>, GpuError> {
        self.shard.c_buf(self.cd, n)
    }

    fn norm(
        &self,
        x: &CudaSlice<f32>,
        w: &Norm<usize>,
        out: &mut CudaSlice<u8>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let (s, c, cd) = (self.shard, self.c, self.cd);
        let gpu = &s.gpu;
        let Some(weight) = w.weight else {
            // OLMo's LayerNorm without parameters: the LayerNorm kernel with weight 1 and
            // bias 0 (exact: `1 * v + 0` is `v`).
            let Some((ones, zeros)) = &s.plain_norm else {
                return Err(not_on_gpu("a LayerNorm without parameters in this model"));
            };
            norm_pair("a parameter-free LayerNorm", DType::F32, cd)?;
            // SAFETY: `x` holds `rows x hidden` f32 and `out` as many values in `cd` (the
            // caller's buffers); `ones` and `zeros` are `[hidden]` f32 allocated at load.
            return span(gpu, "norm", || unsafe {
                g::layer_norm(
                    gpu,
                    DType::F32,
                    cd,
                    ptr(gpu, x),
                    ptr(gpu, ones),
                    ptr(gpu, zeros),
                    c.norm_eps,
                    ptr(gpu, out),
                    rows,
                    c.hidden,
                )
            });
        };
        let wt = s.tensor(weight);
        norm_pair(&format!("`{}`", wt.name), wt.dtype, cd)?;
        // SAFETY: `x` holds `rows x hidden` f32 and `out` as many values in `cd` (the
        // caller's buffers, sized by the layer's shapes); the norm's tensors are `[hidden]`
        // tensors of this shard checked at load.
        span(gpu, "norm", || unsafe {
            match w.bias {
                Some(b) => g::layer_norm(
                    gpu,
                    wt.dtype,
                    cd,
                    ptr(gpu, x),
                    s.p(weight),
                    s.p(b),
                    c.norm_eps,
                    ptr(gpu, out),
                    rows,
                    c.hidden,
                ),
                None => g::rms_norm(
                    gpu,
                    wt.dtype,
                    cd,
                    ptr(gpu, x),
                    s.p(weight),
                    c.norm_eps,
                    ptr(gpu, out),
                    rows,
                    c.hidden,
                ),
            }
        })
    }

    fn linear(
        &self,
        x: &CudaSlice<u8>,
        w: &Linear<usize>,
        out: &mut CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        self.linear_into(ptr(&self.shard.gpu, x), rows, w, out, false)
    }

    fn linear_add(
        &self,
        x: &CudaSlice<u8>,
        w: &Linear<usize>,
        residual: &mut CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        self.linear_into(ptr(&self.shard.gpu, x), rows, w, residual, true)
    }

    /// Causal attention from the projection rows into `out` (rows in the compute dtype),
    /// rotary positions applied as the heads are gathered; a window at a time when
    /// materialised scores would be large.
    fn attention(
        &self,
        qkv: Qkv<'_, CudaSlice<f32>>,
        heads: [Heads; 3],
        rope: bool,
        out: &mut CudaSlice<u8>,
        rows: usize,
        seq: usize,
    ) -> Result<(), GpuError> {
        let (s, c, cd) = (self.shard, self.c, self.cd);
        // The heads are gathered with the rotary embedding on their first `rot_dim`
        // dimensions: none for a layer without RoPE (SmolLM3's NoPE layers, and ALiBi's,
        // whose slopes the softmax adds).
        let rot_dim = if rope { c.rot_dim } else { 0 };
        let gpu = &s.gpu;
        let src: (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>) = match qkv {
            Qkv::Separate { q, k, v } => (q, k, v),
            Qkv::Fused(x) => (x, x, x),
        };
        let ops = (operand(heads[0]), operand(heads[1]), operand(heads[2]));
        let (nh, hd) = (c.heads, c.head_dim);
        let batch = rows / seq;
        let tables = (ptr(gpu, &s.cos), ptr(gpu, &s.sin));
        if flash(c, cd) {
            let kv = ops.1.heads;
            let qh = s.c_buf(cd, rows * nh * hd)?;
            let (kh, vh) = (s.c_buf(cd, rows * kv * hd)?, s.c_buf(cd, rows * kv * hd)?);
            // SAFETY: the projections hold `rows` rows of the layouts in `ops` (f32, sized
            // by the architecture from the same config), the gathered heads were just
            // allocated for `rows` rows of their heads, `out` holds `rows x heads x hd`
            // values in `cd`, the rotary tables cover `seq` positions (`seq <= max_seq`).
            return unsafe {
                g::flash_causal_attention(
                    gpu,
                    cd,
                    [
                        (ptr(gpu, src.0), ops.0),
                        (ptr(gpu, src.1), ops.1),
                        (ptr(gpu, src.2), ops.2),
                    ],
                    (ptr(gpu, &qh), ptr(gpu, &kh), ptr(gpu, &vh)),
                    ptr(gpu, out),
                    batch,
                    seq,
                    nh,
                    hd,
                    rot_dim,
                    tables,
                )
            };
        }
        let per_window = nh * seq * seq * 4;
        let chunk = (SCORES_BYTES / per_window.max(1)).clamp(1, batch);
        let n = chunk * nh * seq * hd;
        let (qh, kh, vh) = (s.c_buf(cd, n)?, s.c_buf(cd, n)?, s.c_buf(cd, n)?);
        let scores = s.f32_buf(chunk * nh * seq * seq)?;
        let probs = s.c_buf(cd, chunk * nh * seq * seq)?;
        let out_h = s.f32_buf(n)?;
        let scratch = g::AttentionScratch {
            qh: ptr(gpu, &qh),
            kh: ptr(gpu, &kh),
            vh: ptr(gpu, &vh),
            scores: ptr(gpu, &scores),
            probs: ptr(gpu, &probs),
            out_h: ptr(gpu, &out_h),
        };
        let mut b0 = 0;
        while b0 < batch {
            let nb = chunk.min(batch - b0);
            let row0 = b0 * seq;
            // This chunk's first row in each operand (f32 rows) and in `out`.
            let at = |x: &CudaSlice<f32>, op: Operand| {
                (ptr(gpu, x) + (row0 * op.row_stride * 4) as u64, op)
            };
            let dst = ptr(gpu, out) + (row0 * nh * hd * cd.size()) as u64;
            // SAFETY: as for the flash path, for windows `b0..b0 + nb`; the scratch was
            // allocated above for `chunk >= nb` windows.
            unsafe {
                g::causal_attention(
                    gpu,
                    &s.blas,
                    cd,
                    [at(src.0, ops.0), at(src.1, ops.1), at(src.2, ops.2)],
                    &scratch,
                    dst,
                    nb,
                    seq,
                    nh,
                    hd,
                    rot_dim,
                    tables,
                    s.alibi.as_ref().map(|a| ptr(gpu, a)),
                )
            }?;
            b0 += nb;
        }
        Ok(())
    }

    /// The residual stream in the compute dtype (OLMo 2's projections read it unnormed).
    fn to_input(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<u8>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let (gpu, n) = (&self.shard.gpu, rows * self.c.hidden);
        // SAFETY: `x` holds `rows x hidden` f32 and `out` as many values in `cd` (the
        // caller's buffers, sized by the layer's shapes).
        span(gpu, "to compute dtype", || unsafe {
            g::to_compute(gpu, self.cd, ptr(gpu, x), ptr(gpu, out), n)
        })
    }

    /// `residual += rms_norm(x)` (OLMo 2's output norms): the RMSNorm kernel into f32
    /// scratch, then the residual add, as the CPU's two steps.
    fn norm_add(
        &self,
        x: &CudaSlice<f32>,
        w: &Norm<usize>,
        residual: &mut CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let (s, c) = (self.shard, self.c);
        let Some(weight) = w.weight.filter(|_| w.bias.is_none()) else {
            return Err(not_on_gpu(
                "an output norm that is not an RMSNorm with weights",
            ));
        };
        let wt = s.tensor(weight);
        norm_pair(&format!("`{}`", wt.name), wt.dtype, DType::F32)?;
        let gpu = &s.gpu;
        let n = rows * c.hidden;
        let normed = s.f32_buf(n)?;
        // SAFETY: `x` and `residual` hold `rows x hidden` f32 (the caller's buffers),
        // `normed` was just allocated for as many; the weight is this shard's `[hidden]`
        // tensor checked at load.
        span(gpu, "output norm + residual", || unsafe {
            g::rms_norm(
                gpu,
                wt.dtype,
                DType::F32,
                ptr(gpu, x),
                s.p(weight),
                c.norm_eps,
                ptr(gpu, &normed),
                rows,
                c.hidden,
            )?;
            g::add(gpu, ptr(gpu, residual), ptr(gpu, &normed), n)
        })
    }

    /// OLMo's `clip_qkv`, in place.
    fn clamp(&self, x: &mut CudaSlice<f32>, limit: f32) -> Result<(), GpuError> {
        let gpu = &self.shard.gpu;
        let n = x.len();
        let p = ptr(gpu, x);
        // SAFETY: `x` is the caller's buffer of `n` f32.
        span(gpu, "clip_qkv", || unsafe { g::clamp(gpu, p, limit, n) })
    }

    fn zero(&self, x: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        Ok(self.shard.gpu.stream.memset_zeros(x)?)
    }

    /// The RMSNorm kernel in place, each group of `width` values a row of its own: the
    /// kernel reads a row's values before the block's sum and writes each value after
    /// reading it in the same thread, so `out` may be `x` (f32 out, as the CPU's).
    fn group_norm(
        &self,
        x: &mut CudaSlice<f32>,
        w: &Norm<usize>,
        width: usize,
        _rows: usize,
    ) -> Result<(), GpuError> {
        let (s, c) = (self.shard, self.c);
        let Some(weight) = w.weight.filter(|_| w.bias.is_none()) else {
            return Err(not_on_gpu("a q/k norm that is not an RMSNorm with weights"));
        };
        let wt = s.tensor(weight);
        norm_pair(&format!("`{}`", wt.name), wt.dtype, DType::F32)?;
        // Activation buffers are allocated at their exact size (`Shard::f32_buf`).
        let groups = x.len() / width;
        assert_eq!(groups * width, x.len(), "q/k norm groups of {width}");
        assert_eq!(wt.shape, [width], "q/k norm weight");
        let gpu = &s.gpu;
        let p = ptr(gpu, x);
        // SAFETY: `x` holds `groups x width` f32 (asserted), read and written in place as
        // the kernel allows (above); the weight is this shard's `[width]` tensor.
        span(gpu, "q/k norm", || unsafe {
            g::rms_norm(
                gpu,
                wt.dtype,
                DType::F32,
                p,
                s.p(weight),
                c.norm_eps,
                p,
                groups,
                width,
            )
        })
    }

    /// The activation of `gate` (times `up`: SwiGLU; alone: GELU) into the compute
    /// dtype, then the output projection added to the residual stream.
    fn mlp_out(
        &self,
        gate: &mut CudaSlice<f32>,
        up: Option<&CudaSlice<f32>>,
        down: &Linear<usize>,
        residual: &mut CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let (s, c, cd) = (self.shard, self.c, self.cd);
        let gpu = &s.gpu;
        let n = rows * c.intermediate;
        let act = s.c_buf(cd, n)?;
        let (x_in, up) = (ptr(gpu, gate), up.map_or(0, |u| ptr(gpu, u)));
        // SAFETY: `gate` (and `up`, or null) hold `rows x intermediate` f32, `act` was just
        // allocated for as many values in `cd`.
        span(gpu, "activation", || unsafe {
            g::act_mul(gpu, cd, x_in, up, c.act, ptr(gpu, &act), n)
        })?;
        self.linear_into(ptr(gpu, &act), rows, down, residual, true)
    }
}
