//! The module store: loads each kernel's module once per CUDA context (cached by kernel name, which
//! encodes the spec and the schedule hash), keeps its function handles, picks the PTX for the
//! device's compute capability (NVRTC-compiling the CUDA source when none fits) and raises the
//! dynamic shared-memory limit of functions that need more than the default 48 KiB.

use super::binary::{pick_ptx, KernelBinary, Target};
use super::error::{KernelContext, LaunchError};
use super::nvrtc::{self, NvrtcOptions};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Dynamic shared memory every function may use without opting in.
const DEFAULT_DYNAMIC_SMEM: u32 = 48 * 1024;

/// Where a loaded kernel's code came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeOrigin {
    /// PTX shipped with the binary, compiled for this target.
    Ptx { target: String },
    /// The CUDA source, compiled by NVRTC at load time for this target.
    Nvrtc { target: String },
}

/// A kernel's module and its entry points, in manifest order.
#[derive(Debug)]
pub struct LoadedKernel {
    pub name: String,
    pub origin: CodeOrigin,
    pub functions: Vec<CudaFunction>,
    _module: Arc<CudaModule>,
}

/// Loaded kernels by fingerprint, each with its name.
type LoadedByFingerprint = HashMap<u64, Vec<(String, Arc<LoadedKernel>)>>;

/// Loaded kernels of one CUDA context. Share one store (in an `Arc`) between launchers on the same
/// context so each module is loaded once.
#[derive(Debug)]
pub struct ModuleStore {
    ctx: Arc<CudaContext>,
    compute_capability: (u32, u32),
    max_dynamic_smem: u32,
    nvrtc: Mutex<NvrtcOptions>,
    /// Keyed by [`KernelBinary::fingerprint`] (which covers the name, in the manifest); the name is
    /// kept beside each kernel and compared, so even a hash collision cannot mix two kernels up.
    loaded: Mutex<LoadedByFingerprint>,
}

impl ModuleStore {
    pub fn new(ctx: Arc<CudaContext>) -> Result<Self, LaunchError> {
        let (major, minor) = ctx.compute_capability()?;
        let optin = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        Ok(ModuleStore {
            ctx,
            compute_capability: (major as u32, minor as u32),
            max_dynamic_smem: optin.max(0) as u32,
            nvrtc: Mutex::new(NvrtcOptions::from_env()),
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// The store of `ctx` shared by every launcher of this process on that context (created on
    /// first use, dropped with the last launcher that holds it).
    pub fn shared(ctx: &Arc<CudaContext>) -> Result<Arc<Self>, LaunchError> {
        static STORES: Mutex<Vec<(usize, Weak<ModuleStore>)>> = Mutex::new(Vec::new());
        let key = ctx.cu_ctx() as usize;
        let mut stores = lock(&STORES);
        stores.retain(|(_, w)| w.strong_count() > 0);
        if let Some(store) = stores.iter().filter(|(k, _)| *k == key).find_map(|(_, w)| w.upgrade()) {
            if **store.context() == **ctx {
                return Ok(store);
            }
        }
        let store = Arc::new(ModuleStore::new(ctx.clone())?);
        stores.push((key, Arc::downgrade(&store)));
        Ok(store)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }

    /// The device's arch as a target name, e.g. `sm_90a` (the fallback's NVRTC compiles for its virtual
    /// arch, `compute_90a`).
    pub fn device_target(&self) -> String {
        Target::for_device(self.compute_capability)
    }

    /// Largest dynamic shared memory a block may opt into on this device, in bytes.
    pub fn max_dynamic_smem(&self) -> u32 {
        self.max_dynamic_smem
    }

    pub fn set_nvrtc_options(&self, options: NvrtcOptions) {
        *lock(&self.nvrtc) = options;
    }

    /// Number of kernels loaded so far.
    pub fn len(&self) -> usize {
        lock(&self.loaded).values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kernel's module and functions, loaded on first use. The map is not locked while a
    /// module is compiled or JIT-loaded, so threads can load different kernels at once; when two
    /// load the same kernel, the first one stored is kept.
    pub fn load(&self, binary: &KernelBinary) -> Result<Arc<LoadedKernel>, LaunchError> {
        let key = binary.fingerprint();
        let name = binary.name();
        let find =
            |loaded: &LoadedByFingerprint| loaded.get(&key)?.iter().find(|(n, _)| n == name).map(|(_, k)| k.clone());
        if let Some(kernel) = find(&lock(&self.loaded)) {
            return Ok(kernel);
        }
        let kernel = Arc::new(self.load_new(binary)?);
        let mut loaded = lock(&self.loaded);
        if let Some(first) = find(&loaded) {
            return Ok(first);
        }
        loaded.entry(key).or_default().push((name.to_string(), kernel.clone()));
        Ok(kernel)
    }

    fn load_new(&self, binary: &KernelBinary) -> Result<LoadedKernel, LaunchError> {
        let name = binary.name();
        let cc = self.compute_capability;
        let (ptx, origin) = match pick_ptx(binary.ptx(), cc) {
            Some(i) => {
                let (target, text) = &binary.ptx()[i];
                (Ptx::from_src(text.clone()), CodeOrigin::Ptx { target: target.clone() })
            }
            None => {
                let target = Target::for_device(cc);
                let Some(source) = binary.cuda_source() else {
                    let available = binary.ptx().iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(", ");
                    return Err(LaunchError::NoKernelForArch {
                        kernel: name.to_string(),
                        device_arch: target,
                        available,
                    });
                };
                let ptx = self.compile(name, source, &target)?;
                (ptx, CodeOrigin::Nvrtc { target })
            }
        };
        let module = self.ctx.load_module(ptx).kernel_ctx(name, "loading the module")?;
        let mut functions = Vec::with_capacity(binary.manifest().steps.len());
        for step in &binary.manifest().steps {
            let function = module.load_function(&step.function).kernel_ctx(name, "finding an entry point")?;
            let max_threads = function.max_threads_per_block().kernel_ctx(name, "querying max threads")?;
            if step.threads as i64 > max_threads as i64 {
                return Err(LaunchError::DeviceLimit {
                    kernel: name.to_string(),
                    function: step.function.clone(),
                    what: "threads per block",
                    needed: step.threads as u64,
                    limit: max_threads.max(0) as u64,
                });
            }
            let static_smem = function.shared_size_bytes().kernel_ctx(name, "querying shared memory")?.max(0) as u32;
            let needed = step.dynamic_smem_bytes as u64 + static_smem as u64;
            if needed > self.max_dynamic_smem as u64 {
                return Err(LaunchError::DeviceLimit {
                    kernel: name.to_string(),
                    function: step.function.clone(),
                    what: "bytes of shared memory",
                    needed,
                    limit: self.max_dynamic_smem as u64,
                });
            }
            if step.dynamic_smem_bytes > DEFAULT_DYNAMIC_SMEM {
                function
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        step.dynamic_smem_bytes as i32,
                    )
                    .kernel_ctx(name, "raising the dynamic shared-memory limit")?;
            }
            functions.push(function);
        }
        Ok(LoadedKernel { name: name.to_string(), origin, functions, _module: module })
    }

    /// The fallback: the kernel's CUDA source through NVRTC for this device, with the options sbgen
    /// compiles its PTX with ([`nvrtc::compile_ptx`]).
    fn compile(&self, name: &str, source: &str, target: &str) -> Result<Ptx, LaunchError> {
        let options = lock(&self.nvrtc).clone();
        Ok(Ptx::from_src(nvrtc::compile_ptx(name, source, target, &options)?))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves the map consistent (a lookup or one insert).
    m.lock().unwrap_or_else(|e| e.into_inner())
}
