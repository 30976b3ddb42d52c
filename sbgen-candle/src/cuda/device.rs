//! What the GPU path keeps per CUDA stream: one sbgen [`Launcher`] (its backward workspace and
//! decode sync buffer persist between calls) and the kernels chosen so far.
//!
//! Kernel choice, per (spec, sequence length): the tuning cache's entry for the device's arch (the
//! file named by env `SBGEN_CACHE` when set at the first call, else the cache built into `sbgen`),
//! as PTX; without an entry, the spec's default schedule as CUDA source, which the launcher's module
//! store compiles with NVRTC at first use. Nothing is compiled when the user's crate builds.

use crate::error::SbCandleError;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::CudaDevice;
use sbgen::cache::TuningCache;
use sbgen::ir::{Arch, Kernel, Pass, Schedule};
use sbgen_runtime::launcher::{KernelBinary, Launcher};
use sbgen_runtime::spec::Spec;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// The launcher and chosen kernels of one stream.
pub struct StreamState {
    pub launcher: Launcher,
    arch: Arch,
    /// Kernels by name (cache entries) and by spec (default-schedule fallbacks).
    kernels: Mutex<HashMap<String, Arc<KernelBinary>>>,
}

/// The state of `device`'s stream, created at its first use. Keyed by the stream, which the state
/// keeps alive, so a key is never reused by another stream.
pub fn stream_state(device: &CudaDevice) -> candle_core::Result<Arc<StreamState>> {
    static STATES: OnceLock<Mutex<HashMap<usize, Arc<StreamState>>>> = OnceLock::new();
    let stream: Arc<CudaStream> = device.cuda_stream();
    let key = Arc::as_ptr(&stream) as usize;
    let mut states = STATES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = states.get(&key) {
        return Ok(s.clone());
    }
    let launcher = Launcher::new(stream).map_err(candle_core::Error::wrap)?;
    let (major, minor) = launcher.store().compute_capability();
    let arch = Arch::for_device(major, minor).ok_or_else(|| SbCandleError::Device {
        device: format!("a CUDA device of compute capability {major}.{minor}"),
        reason: "sbgen's kernels need compute capability 8.0 or newer (sm_80, sm_90)",
    })?;
    let state = Arc::new(StreamState { launcher, arch, kernels: Mutex::new(HashMap::new()) });
    states.insert(key, state.clone());
    Ok(state)
}

/// The tuning cache: env `SBGEN_CACHE` (read once), else the built-in default.
fn tuning_cache() -> Result<&'static TuningCache, SbCandleError> {
    static CACHE: OnceLock<Result<TuningCache, String>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| match std::env::var_os("SBGEN_CACHE").filter(|v| !v.is_empty()) {
        Some(path) => TuningCache::load(Path::new(&path)).map_err(|e| format!("env `SBGEN_CACHE`: {e}")),
        None => TuningCache::parse(sbgen::DEFAULT_CACHE, Path::new("<sbgen built-in default cache>"))
            .map_err(|e| e.to_string()),
    });
    cache.as_ref().map_err(|reason| SbCandleError::Kernel { reason: reason.clone() })
}

impl StreamState {
    /// The kernel for `spec` at sequence length `seq` on this stream's device.
    pub fn kernel(&self, spec: Spec, seq: usize) -> Result<Arc<KernelBinary>, SbCandleError> {
        spec.validate().map_err(|e| SbCandleError::Kernel { reason: e.to_string() })?;
        let cache = tuning_cache()?;
        if let Some(entry) = cache.lookup(self.arch, &spec, seq) {
            if let Some(k) = self.lock().get(&entry.kernel_name) {
                return Ok(k.clone());
            }
            entry.check_lowering().map_err(|reason| SbCandleError::Kernel { reason })?;
            let binary = Arc::new(KernelBinary::new(
                entry.manifest.clone(),
                vec![(self.arch.compile_target().to_string(), entry.ptx.clone())],
                None,
            ));
            self.lock().insert(entry.kernel_name.clone(), binary.clone());
            return Ok(binary);
        }
        let key = format!("default:{}", spec.slug());
        if let Some(k) = self.lock().get(&key) {
            return Ok(k.clone());
        }
        // The arch's default: on sm_90a the forward's Q K^T and P V on wgmma (docs/performance.md#wgmma).
        let schedule = Schedule::default_on(&spec, self.arch);
        let lowered = sbgen::lower::lower(&Kernel::new(spec, schedule, self.arch))
            .map_err(|e| SbCandleError::Kernel { reason: format!("lowering the default schedule: {e}") })?;
        let binary = Arc::new(KernelBinary::new(lowered.manifest, Vec::new(), Some(lowered.cuda_source)));
        self.lock().insert(key, binary.clone());
        Ok(binary)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<KernelBinary>>> {
        self.kernels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes `device`'s default memory pool keep freed memory for reuse (release threshold at the
/// maximum) instead of returning it to the driver at every synchronisation, the driver's default.
/// candle allocates every tensor from this pool, so with the default each step maps its buffers
/// afresh: on the H200 that cost 8-10% of an attention forward + backward at 2 x 16 x 8192 x 128
/// (BENCHMARKS.md). This is what a caching allocator does; memory freed stays reserved for the
/// process.
pub fn keep_memory_pool(device: &CudaDevice) -> candle_core::Result<()> {
    set_memory_pool_release_threshold(device, u64::MAX)
}

/// Sets the release threshold of `device`'s default memory pool: freed memory above `bytes` goes
/// back to the driver at each synchronisation (0, the driver's default: all of it).
pub fn set_memory_pool_release_threshold(device: &CudaDevice, bytes: u64) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = device.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool = std::ptr::null_mut();
    let mut threshold = bytes;
    // SAFETY: a valid device handle and out-pointer; the release threshold is a cuuint64_t.
    let (r1, r2) = unsafe {
        let r1 = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        let r2 = if r1 == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            )
        } else {
            r1
        };
        (r1, r2)
    };
    if r1 != sys::CUresult::CUDA_SUCCESS || r2 != sys::CUresult::CUDA_SUCCESS {
        return Err(SbCandleError::Device {
            device: format!("CUDA device {}", ctx.ordinal()),
            reason:
                "its default memory pool could not be configured (cuDeviceGetDefaultMemPool / cuMemPoolSetAttribute)",
        }
        .into());
    }
    Ok(())
}
