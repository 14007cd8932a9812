//! The GPU backend of the evaluator: the N source checkpoints and the merged copy held
//! on the worker's GPUs, split into contiguous layer ranges by memory; a trial is one
//! fused merge launch per dtype on each GPU and one forward pass, hidden states copied
//! from GPU to GPU between layer ranges. The forward pass mirrors `crate::model` (the
//! CPU reference), with the residual stream and every reduction in f32 and GEMM inputs
//! in the checkpoint's dtype (bf16: as transformers runs it, with f32 accumulation).

use std::collections::HashMap;
use std::ops::Range;

use ckmerge_common::{Checkpoint, DType};
use ckmerge_kernels::cuda::device::Gpu;
use ckmerge_kernels::cuda::merge::{dtype_name, FusedMerge, MergeTensor};
use ckmerge_kernels::cuda::ops::{self as g, ptr, Gemm, Operand, Ptr};
use ckmerge_kernels::cuda::profile::span;
use ckmerge_kernels::cuda::GpuError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;

use crate::eval::{Batch, StageOutput};
use crate::model::{Arch, ModelConfig, Part};

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

/// `CKMERGE_GPU_ATTENTION=scores` forces the materialised-scores attention (cuBLAS batched
/// GEMMs and a softmax kernel) where the flash kernel would run: for comparing the two on
/// a GPU. f32 models and head sizes without a flash kernel always use it.
fn materialise_scores() -> bool {
    static SCORES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SCORES.get_or_init(|| std::env::var("CKMERGE_GPU_ATTENTION").as_deref() == Ok("scores"))
}

/// Attention scores of one launch stay under this; bigger batches are done a window at
/// a time.
const SCORES_BYTES: usize = 1 << 30;
/// Rows per output-head GEMM (its f32 logits are `rows x vocab`).
const HEAD_ROWS: usize = 1024;
/// Memory kept free on each GPU for activations and cuBLAS workspace, beyond the
/// estimate from the batch shape.
const RESERVE_BYTES: u64 = 1 << 30;

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

/// One tensor on one GPU: every source and the merged copy, in one dtype.
struct DevTensor {
    dtype: DType,
    shape: Vec<usize>,
    sources: Vec<CudaSlice<u8>>,
    merged: CudaSlice<u8>,
}

/// One GPU's share: a layer range, plus the embedding on the first and the head on the
/// last.
struct Shard {
    gpu: Gpu,
    blas: CudaBlas,
    part: Part,
    tensors: Vec<DevTensor>,
    index: HashMap<String, usize>,
    /// Per weight group (all tensors in one group without groups): one fused launch
    /// per dtype.
    plans: Vec<Vec<FusedMerge>>,
    group_of: Vec<usize>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

/// The model held on the worker's GPUs.
pub struct GpuModel {
    config: ModelConfig,
    /// The part of the model this worker holds (whole, or a pipeline stage).
    pub part: Part,
    /// The dtype GEMM inputs are in: the embedding's.
    compute: DType,
    shards: Vec<Shard>,
    pub description: String,
    pub parameters: u64,
}

fn pos_tables(config: &ModelConfig, max_seq: usize) -> (Vec<f32>, Vec<f32>) {
    ckmerge_kernels::ops::rope_tables(&config.inv_freq(), max_seq)
}

impl GpuModel {
    /// Uploads the tensors of `part` from every checkpoint to GPUs `gpus`, split by
    /// layers, after checking they fit.
    pub fn load(
        ckpts: &[Checkpoint],
        config: &ModelConfig,
        part: &Part,
        gpus: &[usize],
        max_seq: usize,
        batch_rows: usize,
    ) -> Result<GpuModel, GpuError> {
        if gpus.is_empty() {
            return Err(GpuError::Request("no GPUs given".into()));
        }
        let devices = gpus
            .iter()
            .map(|&i| Gpu::open(i))
            .collect::<Result<Vec<_>, _>>()?;
        // After the devices (no driver: "no GPU" comes first), before any cuBLAS call:
        // cudarc would panic on the first one without the library.
        if !ckmerge_kernels::cuda::cublas_present() {
            return Err(GpuError::NoCublas);
        }
        let first = &ckpts[0];
        let names: Vec<&str> = first
            .tensors
            .iter()
            .filter(|t| part.needs(config, &t.name))
            .map(|t| t.name.as_str())
            .collect();
        let compute = first
            .tensor(embedding_name(config))
            .map(|t| t.dtype)
            .unwrap_or(DType::BF16);
        let n_src = ckpts.len() as u64;
        let layer_of = |name: &str| layer_index(config, name);
        let mut need = MemoryNeed {
            layers: vec![0; part.layers.len()],
            first_extra: 0,
            last_extra: 0,
            activations: activation_bytes(config, compute, batch_rows, max_seq),
        };
        for name in &names {
            let t = first.tensor(name).expect("listed from the checkpoint");
            let b = (n_src + 1) * t.nbytes() as u64;
            match layer_of(name) {
                Some(l) => need.layers[l - part.layers.start] += b,
                None if is_embedding(config, name) && part.first => need.first_extra += b,
                None => need.last_extra += b,
            }
        }
        let free = devices
            .iter()
            .map(|d| {
                d.mem_info()
                    .map(|(f, _)| (f as u64).saturating_sub(RESERVE_BYTES))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ranges = plan_layers(&need, &free).map_err(GpuError::Request)?;

        let mut shards = Vec::new();
        let k = ranges.len();
        let mut parameters = 0u64;
        for (i, (gpu, r)) in devices.into_iter().zip(ranges).enumerate() {
            let sub = Part {
                layers: part.layers.start + r.start..part.layers.start + r.end,
                first: part.first && i == 0,
                last: part.last && i + 1 == k,
            };
            let s = &gpu.stream;
            let mut tensors = Vec::new();
            let mut index = HashMap::new();
            for name in names.iter().filter(|n| sub.needs(config, n)) {
                let mut sources = Vec::with_capacity(ckpts.len());
                let t0 = first.tensor(name).expect("listed");
                for c in ckpts {
                    let t = c.tensor(name).expect("checked compatible");
                    if t.dtype != t0.dtype {
                        return Err(GpuError::Request(format!(
                            "tensor `{name}` is {} in {} but {} in {}: the GPU merge needs one dtype per tensor across sources",
                            t0.dtype,
                            first.dir.display(),
                            t.dtype,
                            c.dir.display()
                        )));
                    }
                    sources.push(s.clone_htod(c.bytes(t))?);
                }
                let merged = s.alloc_zeros::<u8>(t0.nbytes().max(1))?;
                parameters += t0.numel() as u64;
                index.insert(name.to_string(), tensors.len());
                tensors.push(DevTensor {
                    dtype: t0.dtype,
                    shape: t0.shape.clone(),
                    sources,
                    merged,
                });
            }
            let (cos, sin) = pos_tables(config, max_seq);
            let blas = CudaBlas::new(s.clone())?;
            let cos = s.clone_htod(&cos)?;
            let sin = s.clone_htod(&sin)?;
            let group_of = vec![0; tensors.len()];
            let mut shard = Shard {
                gpu,
                blas,
                part: sub,
                tensors,
                index,
                plans: Vec::new(),
                group_of,
                cos,
                sin,
            };
            shard.plan_groups(None)?;
            shards.push(shard);
        }
        let description = shards
            .iter()
            .map(|s| {
                format!(
                    "cuda:{} {} (layers {}..{})",
                    s.gpu.ordinal, s.gpu.name, s.part.layers.start, s.part.layers.end
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok(GpuModel {
            config: config.clone(),
            part: part.clone(),
            compute,
            shards,
            description,
            parameters,
        })
    }

    /// Tensor names on every GPU, in the order group assignments index them.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.shards {
            let mut names: Vec<(&String, &usize)> = s.index.iter().collect();
            names.sort_by_key(|(_, &i)| i);
            out.extend(names.into_iter().map(|(n, _)| n.clone()));
        }
        out
    }

    /// Per-group merge plans: `group_of` indexes [`GpuModel::tensor_names`].
    pub fn set_groups(&mut self, group_of: &[usize]) -> Result<(), GpuError> {
        let mut at = 0;
        for s in &mut self.shards {
            let n = s.tensors.len();
            s.plan_groups(Some(&group_of[at..at + n]))?;
            at += n;
        }
        Ok(())
    }

    /// Merges `weights[group]` into every merged tensor: one launch per group and dtype
    /// on each GPU, all GPUs at once.
    pub fn merge(&mut self, weights: &[Vec<f32>]) -> Result<(), GpuError> {
        for s in &mut self.shards {
            for (gi, plans) in s.plans.iter_mut().enumerate() {
                let w = weights
                    .get(gi)
                    .ok_or_else(|| GpuError::Request(format!("no weights for group {gi}")))?;
                for p in plans {
                    p.run(&s.gpu, w)?;
                }
            }
        }
        for s in &self.shards {
            s.gpu.synchronize()?;
        }
        Ok(())
    }

    /// This worker's part on one batch (see `Evaluator::stage_forward`).
    pub fn forward(
        &self,
        batch: &Batch,
        hidden: Option<Vec<f32>>,
    ) -> Result<StageOutput, GpuError> {
        let h = self.config.hidden;
        let rows = batch.tokens.len();
        let first = &self.shards[0];
        let s = &first.gpu.stream;
        let mut x: CudaSlice<f32> = match hidden {
            None => {
                let tokens = s.clone_htod(&batch.tokens)?;
                let x = s.alloc_zeros::<f32>(rows * h)?;
                let e = first.tensor(embedding_name(&self.config))?;
                g::embed(
                    &first.gpu,
                    e.dtype,
                    ptr(&first.gpu, &tokens),
                    ptr(&first.gpu, &e.merged),
                    ptr(&first.gpu, &x),
                    rows,
                    h,
                )?;
                x
            }
            Some(x) => s.clone_htod(&x)?,
        };
        for (i, shard) in self.shards.iter().enumerate() {
            if i > 0 {
                // Hidden states to the next GPU, through the host (no peer access needed).
                let host = self.shards[i - 1].gpu.stream.clone_dtoh(&x)?;
                x = shard.gpu.stream.clone_htod(&host)?;
            }
            for l in shard.part.layers.clone() {
                shard.layer(&self.config, self.compute, l, &x, batch.seq)?;
            }
        }
        let last = self.shards.last().expect("at least one GPU");
        if self.part.last {
            let nll = last.head_nll(&self.config, self.compute, &x, batch)?;
            Ok(StageOutput::Nll(nll))
        } else {
            Ok(StageOutput::Hidden(last.gpu.stream.clone_dtoh(&x)?))
        }
    }
}

fn layer_prefix(c: &ModelConfig) -> &'static str {
    match c.arch {
        Arch::Llama => "model.layers.",
        Arch::GptNeoX => "gpt_neox.layers.",
    }
}

fn layer_index(c: &ModelConfig, name: &str) -> Option<usize> {
    name.strip_prefix(layer_prefix(c))?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn embedding_name(c: &ModelConfig) -> &'static str {
    match c.arch {
        Arch::Llama => "model.embed_tokens.weight",
        Arch::GptNeoX => "gpt_neox.embed_in.weight",
    }
}

fn is_embedding(c: &ModelConfig, name: &str) -> bool {
    name == embedding_name(c)
}

/// A generous estimate of one batch's activations: the f32 residual stream and
/// projections, the widest intermediate, and one launch's attention scores where the
/// scores are materialised (the flash kernel keeps them on chip).
fn activation_bytes(c: &ModelConfig, compute: DType, rows: usize, seq: usize) -> u64 {
    let wide = (3 * c.hidden)
        .max(c.heads * c.head_dim * 3)
        .max(2 * c.intermediate);
    let per_row = 4 * (4 * c.hidden + 2 * wide) as u64;
    let scores = if g::flash_supported(compute, c.head_dim) && !materialise_scores() {
        0
    } else {
        (c.heads * seq * seq * 4 * 2).min(2 * SCORES_BYTES) as u64
    };
    rows as u64 * per_row + scores + (HEAD_ROWS * c.vocab * 4) as u64
}

impl Shard {
    fn plan_groups(&mut self, group_of: Option<&[usize]>) -> Result<(), GpuError> {
        if let Some(g) = group_of {
            if !self.plans.is_empty() && g == self.group_of.as_slice() {
                return Ok(()); // the same groups: keep the uploaded tables
            }
            self.group_of = g.to_vec();
        }
        let groups = self.group_of.iter().copied().max().map_or(1, |m| m + 1);
        let mut plans = Vec::with_capacity(groups);
        for gi in 0..groups {
            let list: Vec<MergeTensor> = self
                .tensors
                .iter()
                .zip(&self.group_of)
                .filter(|(_, &g)| g == gi)
                .map(|(t, _)| MergeTensor {
                    dtype: t.dtype,
                    dst: &t.merged,
                    srcs: t.sources.iter().collect(),
                })
                .collect();
            plans.push(FusedMerge::plan(&self.gpu, &list)?);
        }
        self.plans = plans;
        Ok(())
    }

    fn tensor(&self, name: &str) -> Result<&DevTensor, GpuError> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| {
                GpuError::Request(format!(
                    "tensor `{name}` is not on GPU {}",
                    self.gpu.ordinal
                ))
            })
    }

    fn p(&self, t: &DevTensor) -> Ptr {
        ptr(&self.gpu, &t.merged)
    }

    fn opt(&self, name: &str) -> Option<&DevTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Activation scratch, uninitialised: every caller writes all of it before anything
    /// reads it (zeroing cost a pass over about 1.4 GB per layer of a 1B model at batch 8
    /// x 2048). Stream-ordered allocations from a pool that keeps freed memory (see
    /// `Gpu::open`), so a buffer per layer costs no driver round trip.
    fn f32_buf(&self, n: usize) -> Result<CudaSlice<f32>, GpuError> {
        span(&self.gpu, "allocate", || {
            // SAFETY: the contents are written before they are read (above).
            Ok(unsafe { self.gpu.stream.alloc::<f32>(n.max(1)) }?)
        })
    }

    fn c_buf(&self, dt: DType, n: usize) -> Result<CudaSlice<u8>, GpuError> {
        span(&self.gpu, "allocate", || {
            // SAFETY: as for `f32_buf`.
            Ok(unsafe { self.gpu.stream.alloc::<u8>((n * dt.size()).max(1)) }?)
        })
    }

    /// `out[rows, n] = x[rows, k] W^T (+ b)`, `x` in the compute dtype.
    fn linear(
        &self,
        cd: DType,
        x: Ptr,
        rows: usize,
        prefix: &str,
        out: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.linear_into(cd, x, rows, prefix, out, false)
    }

    /// As `linear`, or with `accumulate` `out += x W^T (+ b)`: the residual add done by
    /// the GEMM's epilogue (beta = 1, one f32 rounding as in a separate add), saving a
    /// pass over the hidden states and a buffer per projection.
    fn linear_into(
        &self,
        cd: DType,
        x: Ptr,
        rows: usize,
        prefix: &str,
        out: &CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        if w.dtype != cd {
            return Err(GpuError::Request(format!(
                "`{prefix}.weight` is {} but the model computes in {cd}: mixed-dtype linear layers are not supported on the GPU",
                w.dtype
            )));
        }
        let (n, k) = (w.shape[0], w.shape[1]);
        let what = if prefix.contains(".mlp.") {
            "linear: MLP"
        } else {
            "linear: attention projections"
        };
        let gemm = Gemm {
            beta: if accumulate { 1.0 } else { 0.0 },
            ..Gemm::linear(rows, n, k, cd)
        };
        span(&self.gpu, what, || {
            gemm.run(&self.blas, x, self.p(w), ptr(&self.gpu, out), 1, 0, 0, 0)?;
            if let Some(b) = self.opt(&format!("{prefix}.bias")) {
                g::add_bias(&self.gpu, b.dtype, ptr(&self.gpu, out), self.p(b), rows, n)?;
            }
            Ok(())
        })
    }

    /// The MLP's tail: the activation of `x_in` (times `up`, 0 for none: SwiGLU vs GELU)
    /// into the compute dtype, then the output projection `down` added to the residual
    /// stream `x`.
    fn mlp_out(
        &self,
        c: &ModelConfig,
        cd: DType,
        (x_in, up): (Ptr, Ptr),
        down: &str,
        x: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let gpu = &self.gpu;
        let rows = x.len() / c.hidden;
        let n = rows * c.intermediate;
        let act = self.c_buf(cd, n)?;
        span(gpu, "activation", || {
            g::act_mul(gpu, cd, x_in, up, c.act, ptr(gpu, &act), n)
        })?;
        self.linear_into(cd, ptr(gpu, &act), rows, down, x, true)
    }

    fn norm(
        &self,
        c: &ModelConfig,
        cd: DType,
        prefix: &str,
        x: &CudaSlice<f32>,
        out: &CudaSlice<u8>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        let pair = (dtype_name(w.dtype), dtype_name(cd));
        if !ckmerge_kernels::cuda::NORM_PAIRS.contains(&pair) {
            return Err(GpuError::Request(format!(
                "`{prefix}.weight` is {} in a model computing in {cd}: this norm is not implemented on the GPU (use --gpus none)",
                w.dtype
            )));
        }
        let gpu = &self.gpu;
        span(gpu, "norm", || {
            match self
                .opt(&format!("{prefix}.bias"))
                .filter(|_| c.arch == Arch::GptNeoX)
            {
                Some(b) => g::layer_norm(
                    gpu,
                    w.dtype,
                    cd,
                    ptr(gpu, x),
                    self.p(w),
                    self.p(b),
                    c.norm_eps,
                    ptr(gpu, out),
                    rows,
                    c.hidden,
                ),
                None => g::rms_norm(
                    gpu,
                    w.dtype,
                    cd,
                    ptr(gpu, x),
                    self.p(w),
                    c.norm_eps,
                    ptr(gpu, out),
                    rows,
                    c.hidden,
                ),
            }
        })
    }

    /// Causal attention from projection rows `src` (operands `q`, `k`, `v`) into `out`
    /// (rows in the compute dtype), a window at a time when the scores would be large.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        c: &ModelConfig,
        cd: DType,
        src: (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        ops: (Operand, Operand, Operand),
        out: &CudaSlice<u8>,
        rows: usize,
        seq: usize,
    ) -> Result<(), GpuError> {
        let gpu = &self.gpu;
        let (heads, hd) = (c.heads, c.head_dim);
        let batch = rows / seq;
        let tables = (ptr(gpu, &self.cos), ptr(gpu, &self.sin));
        if g::flash_supported(cd, hd) && !materialise_scores() {
            let kv = ops.1.heads;
            let qh = self.c_buf(cd, rows * heads * hd)?;
            let (kh, vh) = (
                self.c_buf(cd, rows * kv * hd)?,
                self.c_buf(cd, rows * kv * hd)?,
            );
            return g::flash_causal_attention(
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
                heads,
                hd,
                c.rot_dim,
                tables,
            );
        }
        let per_window = heads * seq * seq * 4;
        let chunk = (SCORES_BYTES / per_window.max(1)).clamp(1, batch);
        let n = chunk * heads * seq * hd;
        let (qh, kh, vh) = (self.c_buf(cd, n)?, self.c_buf(cd, n)?, self.c_buf(cd, n)?);
        let scores = self.f32_buf(chunk * heads * seq * seq)?;
        let probs = self.c_buf(cd, chunk * heads * seq * seq)?;
        let out_h = self.f32_buf(n)?;
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
            let at = |s: &CudaSlice<f32>, op: Operand| {
                (ptr(gpu, s) + (row0 * op.row_stride * 4) as u64, op)
            };
            let dst = ptr(gpu, out) + (row0 * heads * hd * cd.size()) as u64;
            g::causal_attention(
                gpu,
                &self.blas,
                cd,
                [at(src.0, ops.0), at(src.1, ops.1), at(src.2, ops.2)],
                &scratch,
                dst,
                nb,
                seq,
                heads,
                hd,
                c.rot_dim,
                tables,
            )?;
            b0 += nb;
        }
        Ok(())
    }

    /// One decoder layer over `x` (f32 rows) in place.
    fn layer(
        &self,
        c: &ModelConfig,
        cd: DType,
        l: usize,
        x: &CudaSlice<f32>,
        seq: usize,
    ) -> Result<(), GpuError> {
        // cuBLAS calls use the calling thread's current context (kernel launches and
        // allocations bind it themselves); evaluations run on pool threads.
        self.gpu.ctx.bind_to_thread()?;
        let gpu = &self.gpu;
        let h = c.hidden;
        let rows = x.len() / h;
        let normed = self.c_buf(cd, rows * h)?;
        match c.arch {
            Arch::Llama => {
                let p = format!("model.layers.{l}");
                let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
                self.norm(c, cd, &format!("{p}.input_layernorm"), x, &normed, rows)?;
                let (q, k, v) = (
                    self.f32_buf(rows * qd)?,
                    self.f32_buf(rows * kvd)?,
                    self.f32_buf(rows * kvd)?,
                );
                self.linear(
                    cd,
                    ptr(gpu, &normed),
                    rows,
                    &format!("{p}.self_attn.q_proj"),
                    &q,
                )?;
                self.linear(
                    cd,
                    ptr(gpu, &normed),
                    rows,
                    &format!("{p}.self_attn.k_proj"),
                    &k,
                )?;
                self.linear(
                    cd,
                    ptr(gpu, &normed),
                    rows,
                    &format!("{p}.self_attn.v_proj"),
                    &v,
                )?;
                let opq = Operand {
                    row_stride: qd,
                    offset: 0,
                    head_stride: c.head_dim,
                    heads: c.heads,
                };
                let opkv = Operand {
                    row_stride: kvd,
                    offset: 0,
                    head_stride: c.head_dim,
                    heads: c.kv_heads,
                };
                let att = self.c_buf(cd, rows * qd)?;
                self.attention(c, cd, (&q, &k, &v), (opq, opkv, opkv), &att, rows, seq)?;
                self.linear_into(
                    cd,
                    ptr(gpu, &att),
                    rows,
                    &format!("{p}.self_attn.o_proj"),
                    x,
                    true,
                )?;
                self.norm(
                    c,
                    cd,
                    &format!("{p}.post_attention_layernorm"),
                    x,
                    &normed,
                    rows,
                )?;
                let (gate, up) = (
                    self.f32_buf(rows * c.intermediate)?,
                    self.f32_buf(rows * c.intermediate)?,
                );
                self.linear(
                    cd,
                    ptr(gpu, &normed),
                    rows,
                    &format!("{p}.mlp.gate_proj"),
                    &gate,
                )?;
                self.linear(
                    cd,
                    ptr(gpu, &normed),
                    rows,
                    &format!("{p}.mlp.up_proj"),
                    &up,
                )?;
                let (pg, pu) = (ptr(gpu, &gate), ptr(gpu, &up));
                self.mlp_out(c, cd, (pg, pu), &format!("{p}.mlp.down_proj"), x)?;
            }
            Arch::GptNeoX => {
                let p = format!("gpt_neox.layers.{l}");
                let hd = c.head_dim;
                self.norm(c, cd, &format!("{p}.input_layernorm"), x, &normed, rows)?;
                let qkv = self.f32_buf(rows * 3 * h)?;
                self.linear(
                    cd,
                    ptr(gpu, &normed),
                    rows,
                    &format!("{p}.attention.query_key_value"),
                    &qkv,
                )?;
                let op = |offset| Operand {
                    row_stride: 3 * h,
                    offset,
                    head_stride: 3 * hd,
                    heads: c.heads,
                };
                let att = self.c_buf(cd, rows * h)?;
                self.attention(
                    c,
                    cd,
                    (&qkv, &qkv, &qkv),
                    (op(0), op(hd), op(2 * hd)),
                    &att,
                    rows,
                    seq,
                )?;
                // Both residual adds are the projections' GEMM epilogues. With the
                // parallel residual the MLP's norm reads x before the attention is added
                // (`normed` is free again once the QKV projection has read it).
                let post_norm = |x: &CudaSlice<f32>| {
                    self.norm(
                        c,
                        cd,
                        &format!("{p}.post_attention_layernorm"),
                        x,
                        &normed,
                        rows,
                    )
                };
                if c.parallel_residual {
                    post_norm(x)?;
                }
                self.linear_into(
                    cd,
                    ptr(gpu, &att),
                    rows,
                    &format!("{p}.attention.dense"),
                    x,
                    true,
                )?;
                if !c.parallel_residual {
                    post_norm(x)?;
                }
                let mid = self.f32_buf(rows * c.intermediate)?;
                self.linear(
                    cd,
                    ptr(gpu, &normed),
                    rows,
                    &format!("{p}.mlp.dense_h_to_4h"),
                    &mid,
                )?;
                let pm = ptr(gpu, &mid);
                self.mlp_out(c, cd, (pm, 0), &format!("{p}.mlp.dense_4h_to_h"), x)?;
            }
        }
        Ok(())
    }

    /// Final norm, output head and cross-entropy of the scored rows, summed in row order
    /// on the host (per-row values in f64, as the CPU does).
    fn head_nll(
        &self,
        c: &ModelConfig,
        cd: DType,
        x: &CudaSlice<f32>,
        batch: &Batch,
    ) -> Result<f64, GpuError> {
        self.gpu.ctx.bind_to_thread()?;
        let gpu = &self.gpu;
        let h = c.hidden;
        let rows = batch.tokens.len();
        let normed = self.c_buf(cd, rows * h)?;
        let (norm, head) = match c.arch {
            Arch::Llama => (
                "model.norm",
                if c.tie_embeddings {
                    "model.embed_tokens.weight"
                } else {
                    "lm_head.weight"
                },
            ),
            Arch::GptNeoX => (
                "gpt_neox.final_layer_norm",
                if c.tie_embeddings {
                    "gpt_neox.embed_in.weight"
                } else {
                    "embed_out.weight"
                },
            ),
        };
        self.norm(c, cd, norm, x, &normed, rows)?;
        let (mut idx, mut targets) = (Vec::new(), Vec::new());
        for b in 0..rows / batch.seq {
            for t in batch.seq - 1 - batch.scored..batch.seq - 1 {
                let r = b * batch.seq + t;
                idx.push(r as u32);
                targets.push(batch.tokens[r + 1]);
            }
        }
        let s = &gpu.stream;
        let (didx, dtg) = (s.clone_htod(&idx)?, s.clone_htod(&targets)?);
        let picked = self.c_buf(cd, idx.len() * h)?;
        g::gather_rows(
            gpu,
            cd,
            ptr(gpu, &normed),
            ptr(gpu, &didx),
            ptr(gpu, &picked),
            idx.len(),
            h,
        )?;
        let w = self.tensor(head)?;
        let chunk = HEAD_ROWS.min(idx.len().max(1));
        let logits = self.f32_buf(chunk * c.vocab)?;
        let nll = s.alloc_zeros::<f64>(idx.len().max(1))?;
        let mut r0 = 0;
        while r0 < idx.len() {
            let m = chunk.min(idx.len() - r0);
            let a = ptr(gpu, &picked) + (r0 * h * cd.size()) as u64;
            span(gpu, "head: logits GEMM", || {
                Gemm::linear(m, c.vocab, h, cd).run(
                    &self.blas,
                    a,
                    self.p(w),
                    ptr(gpu, &logits),
                    1,
                    0,
                    0,
                    0,
                )
            })?;
            span(gpu, "head: log-softmax NLL", || {
                g::nll_rows(
                    gpu,
                    ptr(gpu, &logits),
                    ptr(gpu, &dtg) + (r0 * 4) as u64,
                    ptr(gpu, &nll) + (r0 * 8) as u64,
                    m,
                    c.vocab,
                )
            })?;
            r0 += m;
        }
        let per_row = s.clone_dtoh(&nll)?;
        Ok(per_row[..idx.len()].iter().sum())
    }
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
