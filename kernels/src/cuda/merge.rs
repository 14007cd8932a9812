//! Host side of the fused merge (`merge.cu`): a table of every tensor's source and
//! destination pointers is uploaded once when a model is placed on the GPU; each trial
//! then uploads only the N weights and makes one launch per storage dtype, whatever the
//! number of tensors. Bit-identical to [`crate::weighted_sum`] (same fused-multiply-add
//! chain, same rounding), which the GPU parity test checks.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use ckmerge_common::DType;

use super::device::Gpu;
use super::GpuError;

/// Sources one launch can merge (`MAX_SOURCES` in merge.cu).
pub const MAX_SOURCES: usize = 16;
const THREADS: u32 = 256;
const STEPS: usize = 4;
/// u64 words per table entry: first_tile, len, dst, src[MAX_SOURCES].
const ENTRY_WORDS: usize = 3 + MAX_SOURCES;

/// Elements one thread block merges: 256 threads x one 16-byte vector x 4 steps.
pub fn tile_elems(dtype: DType) -> usize {
    THREADS as usize * (16 / dtype.size()) * STEPS
}

/// First tile of each tensor (a prefix sum of tiles per tensor) and the total: block `b`
/// merges tensor `i` where `first[i] <= b < first[i + 1]`. Empty tensors get no tiles
/// and must be left out of the table (the kernel's search assumes non-empty ranges).
pub fn tile_starts(lens: &[usize], dtype: DType) -> (Vec<u64>, u64) {
    let tile = tile_elems(dtype) as u64;
    let mut first = Vec::with_capacity(lens.len());
    let mut total = 0u64;
    for &n in lens {
        first.push(total);
        total += (n as u64).div_ceil(tile);
    }
    (first, total)
}

/// The tensor block `b` belongs to: the kernel's binary search, mirrored for tests.
pub fn tensor_of_tile(first: &[u64], b: u64) -> usize {
    let (mut lo, mut hi) = (0usize, first.len() - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if first[mid] <= b {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// One tensor of a fused merge: a destination and its N sources, raw bytes of one dtype
/// and the same length, all allocated on the GPU's stream.
pub struct MergeTensor<'a> {
    pub dtype: DType,
    pub dst: &'a CudaSlice<u8>,
    pub srcs: Vec<&'a CudaSlice<u8>>,
}

/// A prepared merge of many tensors of one dtype. It holds raw device pointers: the
/// buffers it was built from must outlive it and stay on the same stream (the owner keeps
/// both together; see the GPU evaluator).
pub struct FusedMerge {
    dtype: DType,
    table: CudaSlice<u64>,
    weights: CudaSlice<f32>,
    n_tensors: i32,
    n_tiles: u32,
    n_src: usize,
    pub bytes_per_run: u64,
}

impl FusedMerge {
    /// One plan per dtype present in `tensors`.
    pub fn plan(gpu: &Gpu, tensors: &[MergeTensor<'_>]) -> Result<Vec<FusedMerge>, GpuError> {
        let mut plans = Vec::new();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let of: Vec<&MergeTensor> = tensors.iter().filter(|t| t.dtype == dtype).collect();
            if !of.is_empty() {
                plans.push(FusedMerge::new(gpu, dtype, &of)?);
            }
        }
        Ok(plans)
    }

    fn new(gpu: &Gpu, dtype: DType, tensors: &[&MergeTensor<'_>]) -> Result<FusedMerge, GpuError> {
        let n_src = tensors[0].srcs.len();
        if n_src == 0 || n_src > MAX_SOURCES {
            return Err(GpuError::Request(format!(
                "the GPU merge takes 1 to {MAX_SOURCES} sources, got {n_src}"
            )));
        }
        let s = &gpu.stream;
        let mut lens = Vec::new();
        let mut rows = Vec::new();
        let mut bytes = 0u64;
        for (i, t) in tensors.iter().enumerate() {
            if t.srcs.len() != n_src {
                return Err(GpuError::Request(format!(
                    "tensor {i}: {} sources, expected {n_src}",
                    t.srcs.len()
                )));
            }
            let nbytes = t.dst.len();
            if nbytes % dtype.size() != 0 || t.srcs.iter().any(|x| x.len() != nbytes) {
                return Err(GpuError::Request(format!(
                    "tensor {i}: sources and destination differ in length"
                )));
            }
            if nbytes == 0 {
                continue;
            }
            let mut ptrs = vec![t.dst.device_ptr(s).0];
            ptrs.extend(t.srcs.iter().map(|x| x.device_ptr(s).0));
            if ptrs.iter().any(|p| p % 16 != 0) {
                return Err(GpuError::Request(format!(
                    "tensor {i}: device buffers must be 16-byte aligned for vector loads"
                )));
            }
            lens.push(nbytes / dtype.size());
            rows.push(ptrs);
            bytes += (n_src as u64 + 1) * nbytes as u64;
        }
        let (first, n_tiles) = tile_starts(&lens, dtype);
        if n_tiles > i32::MAX as u64 {
            return Err(GpuError::Request(format!(
                "{n_tiles} tiles exceed one launch's grid"
            )));
        }
        let mut table = vec![0u64; ENTRY_WORDS * rows.len().max(1)];
        for (k, ptrs) in rows.iter().enumerate() {
            let e = &mut table[k * ENTRY_WORDS..(k + 1) * ENTRY_WORDS];
            e[0] = first[k];
            e[1] = lens[k] as u64;
            e[2] = ptrs[0];
            e[3..3 + n_src].copy_from_slice(&ptrs[1..]);
        }
        Ok(FusedMerge {
            dtype,
            table: s.clone_htod(&table)?,
            weights: s.alloc_zeros::<f32>(n_src)?,
            n_tensors: rows.len() as i32,
            n_tiles: n_tiles as u32,
            n_src,
            bytes_per_run: bytes,
        })
    }

    /// Enqueues the merge with `weights` (one per source) on the GPU's stream.
    pub fn run(&mut self, gpu: &Gpu, weights: &[f32]) -> Result<(), GpuError> {
        if weights.len() != self.n_src {
            return Err(GpuError::Request(format!(
                "{} weights for {} sources",
                weights.len(),
                self.n_src
            )));
        }
        if self.n_tiles == 0 {
            return Ok(());
        }
        let s = &gpu.stream;
        s.memcpy_htod(weights, &mut self.weights)?;
        let f = gpu.func(&format!("merge_{}", dtype_name(self.dtype)));
        let cfg = LaunchConfig {
            grid_dim: (self.n_tiles, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n_src = self.n_src as i32;
        let mut l = s.launch_builder(f);
        l.arg(&self.table)
            .arg(&self.n_tensors)
            .arg(&self.weights)
            .arg(&n_src);
        // SAFETY: the table's pointers are live device buffers of the lengths recorded
        // (checked in `new`; the owner keeps them alive), the argument list matches
        // `merge_*(const MergeTile*, int, const float*, int)`.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }
}

/// The suffix of kernel names for a storage dtype.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tile_maps_to_its_tensor() {
        let lens = [1, 8192, 8193, 5, 100_000, 16384];
        let (first, total) = tile_starts(&lens, DType::BF16);
        let tile = tile_elems(DType::BF16);
        assert_eq!(tile, 8192);
        assert_eq!(first, vec![0, 1, 2, 4, 5, 18]);
        assert_eq!(total, 20);
        let mut covered = vec![0usize; lens.len()];
        for b in 0..total {
            let t = tensor_of_tile(&first, b);
            let start = (b - first[t]) as usize * tile;
            assert!(start < lens[t], "tile {b} starts past tensor {t}");
            covered[t] += tile.min(lens[t] - start);
        }
        assert_eq!(covered, lens.to_vec());
    }
}
