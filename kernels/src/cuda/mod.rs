//! The CUDA path: kernels as CUDA C source, compiled at run time by NVRTC and launched
//! through the driver API (cudarc with dynamic loading), so neither the build nor a
//! CPU-only run needs a CUDA toolkit, a driver or a GPU.
//!
//! Every kernel here has a CPU reference in this crate (named in the `.cu` source next to
//! it) and a parity test in `kernels/tests/gpu_parity.rs` that runs where a GPU is present
//! and skips, saying why, where it is not. Compilation needs only libnvrtc, which runs
//! without a GPU: `compiles_every_kernel_for_every_target` builds every module for every
//! architecture in [`TARGET_ARCHS`] wherever libnvrtc is found (CI installs it from PyPI),
//! so a kernel that does not compile never lands.
//!
//! cudarc's safe API panics when a library is missing instead of returning an error, so
//! every entry point here checks for the library first and returns [`GpuError`].

pub mod bench;
pub mod device;
pub mod merge;
pub mod ops;
pub mod profile;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{CompileOptions, Ptx};

const COMMON: &str = include_str!("common.cuh");

/// Architectures CI compiles every module for: Ampere (A100), Ada (L40S), Hopper
/// (H100/H200), Blackwell (B200). At run time a module is compiled for the device's own
/// compute capability.
pub const TARGET_ARCHS: [&str; 4] = ["compute_80", "compute_89", "compute_90", "compute_100"];

/// Why the GPU path cannot run. Never a panic: a machine without the driver gets
/// [`GpuError::NoDriver`].
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU: the CUDA driver library (libcuda.so.1) is not installed or not on the loader path"
    )]
    NoDriver,
    #[error("no GPU: {0}")]
    NoDevice(String),
    #[error("NVRTC (libnvrtc) for the CUDA version ckmerge was built for is not on the loader path; install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and add its lib directory to LD_LIBRARY_PATH, or rebuild ckmerge with CUDARC_CUDA_VERSION set to your CUDA version (see README); or run on the CPU with --gpus none")]
    NoNvrtc,
    #[error("cuBLAS (libcublas, libcublasLt) for the CUDA version ckmerge was built for is not on the loader path; install it (`pip install nvidia-cublas`) or rebuild with CUDARC_CUDA_VERSION (see README); or run on the CPU with --gpus none")]
    NoCublas,
    #[error("compiling CUDA module `{module}` for {arch}:\n{log}")]
    Compile {
        module: &'static str,
        arch: String,
        log: String,
    },
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    Request(String),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Cuda(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for GpuError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        GpuError::Cuda(format!("cuBLAS: {e:?}"))
    }
}

/// A CUDA C module: the shared header plus one `.cu` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    /// The fused multi-tensor weighted sum (`merge.cu`).
    Merge,
    /// Forward-pass kernels (`ops.cu`).
    Ops,
}

const DTYPE_NAMES: [&str; 3] = ["bf16", "f16", "f32"];

impl Module {
    pub const ALL: [Module; 2] = [Module::Merge, Module::Ops];

    pub fn name(self) -> &'static str {
        match self {
            Module::Merge => "merge",
            Module::Ops => "ops",
        }
    }

    pub fn source(self) -> String {
        match self {
            Module::Merge => format!("{COMMON}\n{}", include_str!("merge.cu")),
            Module::Ops => {
                // The forward pass's flash schedule, one definition for host and device.
                format!(
                    "{COMMON}\n#define FLASH_WARPS {}\n#define FLASH_ASYNC_MAX_D {}\n{}",
                    ops::FLASH_WARPS,
                    ops::FLASH_ASYNC_MAX_HEAD_DIM,
                    include_str!("ops.cu")
                )
            }
        }
    }

    /// Every kernel the host code launches from this module: the compile test checks
    /// each is an entry of the PTX, so host and source cannot drift apart.
    pub fn kernels(self) -> Vec<String> {
        match self {
            Module::Merge => DTYPE_NAMES.iter().map(|d| format!("merge_{d}")).collect(),
            Module::Ops => {
                let mut k = vec![
                    "nll_rows".to_string(),
                    "logprob_rows".to_string(),
                    "add_f32".to_string(),
                    "clamp_f32".to_string(),
                    "scale_cols_f32".to_string(),
                ];
                for d in DTYPE_NAMES {
                    for f in [
                        "embed",
                        "add_bias",
                        "to_compute",
                        "act_mul",
                        "gather_heads",
                        "scatter_heads",
                        "causal_softmax",
                        "gather_rows",
                        "row_inv_norm",
                        "causal_softmax_alibi",
                    ] {
                        k.push(format!("{f}_{d}"));
                    }
                }
                for d in ["bf16", "f16"] {
                    for hd in ops::FLASH_HEAD_DIMS {
                        k.push(format!("flash_attention_{d}_d{hd}"));
                    }
                }
                for v in ops::FlashVariant::BENCH {
                    k.push(v.kernel());
                }
                for (w, o) in NORM_PAIRS {
                    k.push(format!("rms_norm_{w}_{o}"));
                    k.push(format!("layer_norm_{w}_{o}"));
                }
                k
            }
        }
    }
}

/// (weight storage, output) type pairs the norm kernels are instantiated for.
pub const NORM_PAIRS: [(&str, &str); 6] = [
    ("bf16", "bf16"),
    ("bf16", "f32"),
    ("f16", "f16"),
    ("f16", "f32"),
    ("f32", "f32"),
    ("f32", "bf16"),
];

/// Whether libnvrtc can be loaded (it needs no GPU).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the candidate file names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS (and cuBLASLt, which it loads) can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Compiles `module` to PTX for `arch` (`compute_XY`). Results are cached per process.
pub fn compile(module: Module, arch: &str) -> Result<Ptx, GpuError> {
    static CACHE: OnceLock<Mutex<HashMap<(Module, String), String>>> = OnceLock::new();
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let cache = CACHE.get_or_init(Default::default);
    let key = (module, arch.to_string());
    if let Some(src) = cache.lock().expect("cache lock").get(&key) {
        return Ok(Ptx::from_src(src.clone()));
    }
    let opts = CompileOptions {
        arch: Some(static_arch(arch)),
        options: vec!["--std=c++17".into()],
        name: Some(format!("ckmerge_{}.cu", module.name())),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(module.source(), opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        GpuError::Compile {
            module: module.name(),
            arch: arch.to_string(),
            log,
        }
    })?;
    cache.lock().expect("cache lock").insert(key, ptx.to_src());
    Ok(ptx)
}

/// cudarc takes the architecture as `&'static str`; the set of architectures is tiny, so
/// each distinct one is leaked once.
fn static_arch(arch: &str) -> &'static str {
    static ARCHS: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let mut known = ARCHS
        .get_or_init(Default::default)
        .lock()
        .expect("arch lock");
    if let Some(a) = known.iter().find(|a| **a == arch) {
        return a;
    }
    let a: &'static str = Box::leak(arch.to_string().into_boxed_str());
    known.push(a);
    a
}

/// Entry names (`.entry NAME`) of a PTX text.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split('(').next()?.trim().to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module compiles for every target architecture, and every kernel the host
    /// code launches is in the PTX. Needs only libnvrtc: skipped with a message where it
    /// is absent, unless `CKMERGE_REQUIRE_NVRTC=1` (set by CI), where that is a failure.
    #[test]
    fn compiles_every_kernel_for_every_target() {
        if !nvrtc_present() {
            assert!(
                std::env::var("CKMERGE_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "CKMERGE_REQUIRE_NVRTC=1 but libnvrtc was not found: {}",
                GpuError::NoNvrtc
            );
            eprintln!("skipping: {}", GpuError::NoNvrtc);
            return;
        }
        for module in Module::ALL {
            for arch in TARGET_ARCHS {
                let ptx = compile(module, arch).unwrap_or_else(|e| panic!("{e}"));
                let entries = ptx_entries(&ptx.to_src());
                for k in module.kernels() {
                    assert!(
                        entries.contains(&k),
                        "{}: kernel {k} missing from the PTX for {arch} (entries: {entries:?})",
                        module.name()
                    );
                }
            }
        }
    }

    #[test]
    fn ptx_entries_are_parsed() {
        let ptx = ".version 8.0\n.visible .entry merge_bf16(\n .param .u64 a\n)\n.entry x (\n";
        assert_eq!(ptx_entries(ptx), vec!["merge_bf16", "x"]);
    }
}
