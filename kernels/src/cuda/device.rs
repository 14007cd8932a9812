//! One GPU: its context and stream, and every kernel of every module compiled for its
//! compute capability and loaded.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use super::{compile, driver_present, GpuError, Module};

/// A GPU with ckmerge's kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    /// `compute_XY`, what the modules were compiled for.
    pub arch: String,
    pub total_bytes: usize,
    funcs: HashMap<String, CudaFunction>,
}

/// Number of visible CUDA devices, or why there are none. Never panics.
pub fn device_count() -> Result<usize, GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    match CudaContext::device_count() {
        Ok(0) => Err(GpuError::NoDevice(
            "the CUDA driver sees no device (check CUDA_VISIBLE_DEVICES)".into(),
        )),
        Ok(n) => Ok(n as usize),
        Err(e) => Err(GpuError::NoDevice(format!("the CUDA driver failed: {e}"))),
    }
}

/// Stream-ordered allocations come from the device's default pool, which by default hands
/// freed memory back to the driver at every synchronisation; the forward pass frees and
/// re-allocates its activations every batch, so the pool keeps what it has instead.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), GpuError> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a live context's device, with valid out-pointers.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()?;
    }
    Ok(())
}

impl Gpu {
    /// Opens device `ordinal` and loads every module.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(GpuError::NoDevice(format!(
                "GPU {ordinal} asked for, {n} visible"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: all of ckmerge's work on a GPU goes through its one stream, in order, so
        // cudarc's cross-stream events (two created per allocation) order nothing.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = format!("compute_{major}{minor}");
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        for module in Module::ALL {
            let ptx = compile(module, &arch)?;
            let m = ctx.load_module(ptx)?;
            for k in module.kernels() {
                let f = m.load_function(&k)?;
                funcs.insert(k, f);
            }
        }
        Ok(Gpu {
            name: ctx.name()?,
            total_bytes: ctx.total_mem()?,
            ctx,
            stream,
            ordinal,
            arch,
            funcs,
        })
    }

    /// A loaded kernel; the names are [`Module::kernels`], so a miss is a bug.
    pub fn func(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not in any module"))
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        Ok(self.ctx.mem_get_info()?)
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }
}
