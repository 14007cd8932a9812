//! One GPU's share of the model: its layer range of every source checkpoint plus the
//! merged copy (the device weight store), the fused merge plans over them, and the
//! tables that tell the forward pass which tensor is which.

use std::collections::HashMap;

use ckmerge_common::DType;
use ckmerge_kernels::cuda::device::Gpu;
use ckmerge_kernels::cuda::merge::{FusedMerge, MergeTensor};
use ckmerge_kernels::cuda::ops::{ptr, Ptr};
use ckmerge_kernels::cuda::profile::span;
use ckmerge_kernels::cuda::GpuError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;

use crate::model::{Head, Layers, Part, TensorLookup};

/// One tensor on one GPU: every source and the merged copy, in one dtype.
pub(super) struct DevTensor {
    /// The checkpoint's name, for messages.
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub sources: Vec<CudaSlice<u8>>,
    pub merged: CudaSlice<u8>,
}

/// The tensors on one GPU, found by name.
#[derive(Default)]
pub(super) struct DevStore {
    pub tensors: Vec<DevTensor>,
    pub index: HashMap<String, usize>,
}

impl DevStore {
    pub fn push(&mut self, t: DevTensor) {
        self.index.insert(t.name.clone(), self.tensors.len());
        self.tensors.push(t);
    }
}

impl TensorLookup for DevStore {
    type Tensor = usize;
    fn find(&self, name: &str) -> Option<(usize, &[usize])> {
        self.index
            .get(name)
            .map(|&i| (i, self.tensors[i].shape.as_slice()))
    }
}

/// One GPU's share: a layer range, plus the embedding on the first and the head on the
/// last.
pub(super) struct Shard {
    pub gpu: Gpu,
    pub blas: CudaBlas,
    pub part: Part,
    pub store: DevStore,
    /// Per weight group (all tensors in one group without groups): one fused launch
    /// per dtype.
    pub plans: Vec<Vec<FusedMerge>>,
    pub group_of: Vec<usize>,
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
    /// `[hidden]` ones and zeros (f32), where the model's LayerNorms have no parameters
    /// (OLMo): the LayerNorm kernel with them computes the parameter-free norm.
    pub plain_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// Baichuan 2's NormHead on the shard with the head: `1 / ||row||` of each row of
    /// the merged head (`[vocab]` f32), recomputed after every merge, applied to the
    /// logits.
    pub head_scale: Option<CudaSlice<f32>>,
    /// ALiBi's per-head slopes (Baichuan 2 13B), `[heads]` f32.
    pub alibi: Option<CudaSlice<f32>>,
    /// The embedding (first shard of the first part), the final norm and head (last
    /// shard of the last part), and this shard's decoder layers, as tensor indices.
    pub embed: Option<usize>,
    pub head: Option<Head<usize>>,
    pub layers: Layers<usize>,
}

impl Shard {
    /// Plans the fused merge launches for `group_of` (one group per tensor, by index;
    /// None: keep the current assignment).
    pub fn plan_groups(&mut self, group_of: Option<&[usize]>) -> Result<(), GpuError> {
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
                .store
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

    pub fn tensor(&self, t: usize) -> &DevTensor {
        &self.store.tensors[t]
    }

    /// The merged copy of tensor `t`.
    pub fn p(&self, t: usize) -> Ptr {
        ptr(&self.gpu, &self.store.tensors[t].merged)
    }

    /// Activation scratch, uninitialised: every caller writes all of it before anything
    /// reads it (zeroing cost a pass over about 1.4 GB per layer of a 1B model at batch 8
    /// x 2048). Stream-ordered allocations from a pool that keeps freed memory (see
    /// `Gpu::open`), so a buffer per layer costs no driver round trip.
    pub fn f32_buf(&self, n: usize) -> Result<CudaSlice<f32>, GpuError> {
        span(&self.gpu, "allocate", || {
            // SAFETY: the contents are written before they are read (above).
            Ok(unsafe { self.gpu.stream.alloc::<f32>(n.max(1)) }?)
        })
    }

    pub fn c_buf(&self, dt: DType, n: usize) -> Result<CudaSlice<u8>, GpuError> {
        span(&self.gpu, "allocate", || {
            // SAFETY: as for `f32_buf`.
            Ok(unsafe { self.gpu.stream.alloc::<u8>((n * dt.size()).max(1)) }?)
        })
    }
}
