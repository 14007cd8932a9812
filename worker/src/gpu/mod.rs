//! The GPU backend of the evaluator: the N source checkpoints and the merged copy held
//! on the worker's GPUs, split into contiguous layer ranges by memory; a trial is one
//! fused merge launch per dtype on each GPU and one forward pass, hidden states copied
//! from GPU to GPU between layer ranges. The forward pass is the architectures' own
//! (`crate::model::{llama, neox}`) over the GPU operations of `forward`, which mirror
//! the CPU reference (`crate::model::cpu`).
//!
//! - `devices`: `--gpus` and the placement of layer ranges on GPUs;
//! - `shard`: one GPU's weight store (sources and merged copy) and merge plans;
//! - `forward`: the operations of a forward pass on one GPU.

pub mod devices;
mod forward;
mod shard;

use ckmerge_common::{Checkpoint, DType};
use ckmerge_kernels::cuda::device::Gpu;
use ckmerge_kernels::cuda::ops as g;
use ckmerge_kernels::cuda::GpuError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;

pub use devices::{
    model_type, plan_layers, resolve_gpus, resolve_gpus_for, unverified_on_gpu, MemoryNeed,
};
use forward::ShardOps;
use shard::{DevStore, DevTensor, Shard};

use crate::data::Batch;
use crate::model::{Layers, ModelConfig, Part, StageOutput};

/// `CKMERGE_GPU_ATTENTION=scores` forces the materialised-scores attention (cuBLAS batched
/// GEMMs and a softmax kernel) where the flash kernel would run: for comparing the two on
/// a GPU. f32 models and head sizes without a flash kernel always use it.
pub(crate) fn materialise_scores() -> bool {
    static SCORES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SCORES.get_or_init(|| std::env::var("CKMERGE_GPU_ATTENTION").as_deref() == Ok("scores"))
}

/// Attention scores of one launch stay under this; bigger batches are done a window at
/// a time.
pub(crate) const SCORES_BYTES: usize = 1 << 30;
/// Rows per output-head GEMM (its f32 logits are `rows x vocab`).
pub(crate) const HEAD_ROWS: usize = 1024;
/// Memory kept free on each GPU for activations and cuBLAS workspace, beyond the
/// estimate from the batch shape.
const RESERVE_BYTES: u64 = 1 << 30;

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
    /// The longest sequence the rotary tables cover.
    max_seq: usize,
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
            .tensor(config.arch.names().embed)
            .map(|t| t.dtype)
            .unwrap_or(DType::BF16);
        let n_src = ckpts.len() as u64;
        let arch = config.arch.names();
        let layer_of = |name: &str| arch.layer_of(name);
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
                None if *name == arch.embed && part.first => need.first_extra += b,
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
            let mut store = DevStore::default();
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
                store.push(DevTensor {
                    name: name.to_string(),
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
            // The architecture's tables over this GPU's tensors, shapes checked.
            let bad = |e| GpuError::Request(format!("{}: {e}", first.dir.display()));
            let embed = match sub.first {
                true => Some(arch.embedding(&store, config).map_err(bad)?),
                false => None,
            };
            let head = match sub.last {
                true => Some(arch.head(&store, config).map_err(bad)?),
                false => None,
            };
            let layers = Layers::load(&store, config, sub.layers.clone()).map_err(bad)?;
            let group_of = vec![0; store.tensors.len()];
            let plain_norm = match config.plain_norms {
                true => Some((
                    s.clone_htod(&vec![1.0f32; config.hidden])?,
                    s.clone_htod(&vec![0.0f32; config.hidden])?,
                )),
                false => None,
            };
            let head_scale = match (config.norm_head, &head) {
                (true, Some(_)) => Some(s.alloc_zeros::<f32>(config.vocab)?),
                _ => None,
            };
            let alibi = match &config.alibi {
                Some(slopes) => Some(s.clone_htod(slopes)?),
                None => None,
            };
            let mut shard = Shard {
                gpu,
                blas,
                part: sub,
                store,
                plans: Vec::new(),
                group_of,
                cos,
                sin,
                plain_norm,
                head_scale,
                alibi,
                embed,
                head,
                layers,
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
            max_seq,
        })
    }

    /// Tensor names on every GPU, in the order group assignments index them.
    pub fn tensor_names(&self) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| s.store.tensors.iter().map(|t| t.name.clone()))
            .collect()
    }

    /// Per-group merge plans: `group_of` indexes [`GpuModel::tensor_names`].
    pub fn set_groups(&mut self, group_of: &[usize]) -> Result<(), GpuError> {
        let mut at = 0;
        for s in &mut self.shards {
            let n = s.store.tensors.len();
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
            if let (Some(scale), Some(head)) = (&s.head_scale, &s.head) {
                let gpu = &s.gpu;
                let lm = s.tensor(head.lm_head);
                // SAFETY: the merged head is this shard's `[vocab, hidden]` tensor in its
                // dtype (checked at load), `scale` was allocated at load for `vocab` f32.
                unsafe {
                    g::row_inv_norm(
                        gpu,
                        lm.dtype,
                        s.p(head.lm_head),
                        g::ptr(gpu, scale),
                        self.config.vocab,
                        self.config.hidden,
                    )
                }?;
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
        let x = self.layers(&batch.tokens, hidden, batch.seq)?;
        let last = self.shards.last().expect("at least one GPU");
        if let (true, Some(head)) = (self.part.last, &last.head) {
            let nll = self.ops(last).head_nll(head, &x, batch)?;
            Ok(StageOutput::Nll(nll))
        } else {
            Ok(StageOutput::Hidden(last.gpu.stream.clone_dtoh(&x)?))
        }
    }

    /// The (log-likelihood, is-greedy) of each multiple-choice request (`input`,
    /// `targets`) under the merged weights, in one forward pass with every input
    /// right-padded to the longest: the GPU twin of `Model::continuation_logprobs`, exact
    /// for the same reasons (causal attention, positions keep their index). Whole model
    /// only; the longest input must be within [`GpuModel::max_seq`].
    pub fn continuation_logprobs(
        &self,
        rows: &[(&[u32], &[u32])],
    ) -> Result<Vec<(f64, bool)>, GpuError> {
        if !(self.part.first && self.part.last) {
            return Err(GpuError::Request(
                "multiple-choice requests need the whole model, not a pipeline stage".into(),
            ));
        }
        let (tokens, len) = crate::model::continuation_tokens(rows);
        let rows: Vec<(usize, &[u32])> = rows.iter().map(|(i, t)| (i.len(), *t)).collect();
        match self.choices(&tokens, len, None, &rows)? {
            StageOutput::LogProbs(v) => Ok(v),
            _ => unreachable!("the whole model ends with the head"),
        }
    }

    /// This worker's part on one group of multiple-choice rows (see
    /// `Evaluator::stage_forward_choices`): `tokens` holds one right-padded row of `seq`
    /// per entry of `rows` (`(input length, targets)`,
    /// [`crate::model::continuation_tokens`]); returns the hidden states for the next
    /// stage or, on the last, each row's (log-likelihood, is-greedy) in f64, summed in
    /// token order on the host as the CPU's `Model::continuation_head` does.
    pub fn choices(
        &self,
        tokens: &[u32],
        seq: usize,
        hidden: Option<Vec<f32>>,
        rows: &[(usize, &[u32])],
    ) -> Result<StageOutput, GpuError> {
        if seq > self.max_seq {
            return Err(GpuError::Request(format!(
                "a multiple-choice request of {seq} tokens is longer than the {} the GPU model holds rotary tables for",
                self.max_seq
            )));
        }
        assert_eq!(
            tokens.len(),
            rows.len() * seq,
            "one row of `seq` per request"
        );
        let x = self.layers(tokens, hidden, seq)?;
        let last = self.shards.last().expect("at least one GPU");
        let Some(head) = last.head.as_ref().filter(|_| self.part.last) else {
            return Ok(StageOutput::Hidden(last.gpu.stream.clone_dtoh(&x)?));
        };
        let (mut idx, mut targets) = (Vec::new(), Vec::new());
        for (r, &(n, tg)) in rows.iter().enumerate() {
            let m = tg.len();
            assert!(m >= 1 && m <= n && n <= seq, "bad continuation row");
            idx.extend((r * seq + n - m..r * seq + n).map(|i| i as u32));
            targets.extend_from_slice(tg);
        }
        let per_token = self
            .ops(last)
            .head_logprobs(head, &x, tokens.len(), &idx, &targets)?;
        let mut at = per_token.into_iter();
        Ok(StageOutput::LogProbs(
            rows.iter()
                .map(|(_, tg)| {
                    at.by_ref()
                        .take(tg.len())
                        .fold((0.0f64, true), |(ll, g), (lp, top)| (ll + lp, g && top))
                })
                .collect(),
        ))
    }

    /// The longest sequence the rotary tables cover.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Grows the rotary tables to cover `seq` positions (same values on the positions
    /// already covered): multiple-choice requests may be longer than the windows, and a
    /// pipeline's later stages, which read no data, learn the length from the batches,
    /// as the CPU's `Model::ensure_max_seq` does.
    pub fn ensure_max_seq(&mut self, seq: usize) -> Result<(), GpuError> {
        if seq <= self.max_seq {
            return Ok(());
        }
        let (cos, sin) = pos_tables(&self.config, seq);
        for s in &mut self.shards {
            s.cos = s.gpu.stream.clone_htod(&cos)?;
            s.sin = s.gpu.stream.clone_htod(&sin)?;
        }
        self.max_seq = seq;
        Ok(())
    }

    fn ops<'a>(&'a self, shard: &'a Shard) -> ShardOps<'a> {
        ShardOps {
            shard,
            c: &self.config,
            cd: self.compute,
        }
    }

    /// The hidden states after this worker's layers, on its last GPU: from `tokens`
    /// (`seq` per sequence) through the embedding, or from the previous stage's `hidden`.
    fn layers(
        &self,
        tokens: &[u32],
        hidden: Option<Vec<f32>>,
        seq: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let rows = tokens.len();
        let first = &self.shards[0];
        let mut x: CudaSlice<f32> = match (hidden, first.embed) {
            (None, Some(e)) => self.ops(first).embed(e, tokens)?,
            (Some(x), _) => first.gpu.stream.clone_htod(&x)?,
            (None, None) => {
                return Err(GpuError::Request(
                    "tokens sent to a part without the embedding".into(),
                ))
            }
        };
        for (i, shard) in self.shards.iter().enumerate() {
            if i > 0 {
                // Hidden states to the next GPU, through the host (no peer access needed).
                let host = self.shards[i - 1].gpu.stream.clone_dtoh(&x)?;
                x = shard.gpu.stream.clone_htod(&host)?;
            }
            // cuBLAS calls use the calling thread's current context (kernel launches and
            // allocations bind it themselves); evaluations run on pool threads.
            shard.gpu.ctx.bind_to_thread()?;
            shard.layers.forward(&self.ops(shard), &mut x, rows, seq)?;
        }
        Ok(x)
    }
}

/// Whether attention runs the flash kernel: it covers bf16/f16 at some head sizes and no
/// ALiBi (Baichuan 2 13B scores are materialised, with the slopes added in the softmax);
/// `CKMERGE_GPU_ATTENTION=scores` forces the materialised path.
pub(crate) fn flash(c: &ModelConfig, compute: DType) -> bool {
    g::flash_supported(compute, c.head_dim) && c.alibi.is_none() && !materialise_scores()
}

/// A generous estimate of one batch's activations: the f32 residual stream and
/// projections, the widest intermediate, and one launch's attention scores where the
/// scores are materialised (the flash kernel keeps them on chip).
fn activation_bytes(c: &ModelConfig, compute: DType, rows: usize, seq: usize) -> u64 {
    let wide = (3 * c.hidden)
        .max(c.heads * c.head_dim * 3)
        .max(2 * c.intermediate);
    let per_row = 4 * (4 * c.hidden + 2 * wide) as u64;
    let scores = if flash(c, compute) {
        0
    } else {
        (c.heads * seq * seq * 4 * 2).min(2 * SCORES_BYTES) as u64
    };
    rows as u64 * per_row + scores + (HEAD_ROWS * c.vocab * 4) as u64
}
