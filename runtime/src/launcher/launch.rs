//! The launch of a forward or backward pass: checks every input (see [`super::plan`]), loads the
//! kernel through the module store, prepares the backward's workspace and launches each step of the
//! manifest with one [`SbParams`] by value.

use super::binary::KernelBinary;
use super::decode_plan::DeviceLimits;
use super::element::SbElement;
use super::error::{KernelContext, LaunchError};
use super::modules::{LoadedKernel, ModuleStore};
use super::plan::{check_alignment, plan_backward, plan_forward, BackwardLens, ForwardLens, LaunchPlan};
use super::tensor_map::{self, TensorMap};
use super::Shape;
use crate::manifest::{KernelManifest, LaunchStep, SbParams};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    DriverError, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

// SAFETY: `SbParams` is `#[repr(C)]`, `Copy`, holds only integers and floats, and mirrors the C
// struct rendered from `PARAM_FIELDS` (a test in `manifest` checks the offsets).
unsafe impl DeviceRepr for SbParams {}

/// A packed variable-length batch (THD layout): `cu_seqlens` (i32, `batch + 1` offsets, device
/// memory) and the token count of the packed tensors. The launcher does not read `cu_seqlens` back
/// (that would synchronise the stream): check a host copy with [`crate::varlen::check_cu_seqlens`]
/// before uploading it. The kernels skip a sequence whose bounds are out of range, so a bad device
/// `cu_seqlens` cannot make them access memory out of bounds.
#[derive(Clone, Copy)]
pub struct Varlen<'a> {
    pub cu_seqlens: &'a CudaView<'a, i32>,
    pub total_tokens: usize,
}

/// The forward's tensors, in the kernel's layout (BHND, BNHD or THD as the spec says), contiguous.
/// q and o have `shape.heads` heads, k and v `shape.kv_heads`. `rem` and `log2_rem` are f32
/// `[batch, heads, seq]` (THD: `[heads, total_tokens]`). When a backward will follow, pass `o_saved`
/// (f32, same shape and layout as `o`: o before the fused remainder) and keep it and `log2_rem` for
/// the backward; inference passes `None` and saves the f32 write.
pub struct ForwardArgs<'a, T> {
    pub q: CudaView<'a, T>,
    pub k: CudaView<'a, T>,
    pub v: CudaView<'a, T>,
    pub o: CudaViewMut<'a, T>,
    pub rem: CudaViewMut<'a, f32>,
    pub log2_rem: CudaViewMut<'a, f32>,
    pub o_saved: Option<CudaViewMut<'a, f32>>,
    /// `Some` exactly for a THD kernel; then `shape.batch` is the number of sequences and
    /// `shape.seq` the longest (max_seqlen).
    pub varlen: Option<Varlen<'a>>,
}

/// The backward's tensors. `o` is the forward's output (fused when the spec fuses the remainder),
/// `o_saved` and `log2_rem` the forward's saved f32 values, `d_rem` the gradient flowing into rem
/// (`None`: none). dk and dv have `shape.kv_heads` heads: each sums its group's query heads.
pub struct BackwardArgs<'a, T> {
    pub q: CudaView<'a, T>,
    pub k: CudaView<'a, T>,
    pub v: CudaView<'a, T>,
    pub o: CudaView<'a, T>,
    pub o_saved: CudaView<'a, f32>,
    pub d_o: CudaView<'a, T>,
    pub d_rem: Option<CudaView<'a, f32>>,
    pub log2_rem: CudaView<'a, f32>,
    pub dq: CudaViewMut<'a, T>,
    pub dk: CudaViewMut<'a, T>,
    pub dv: CudaViewMut<'a, T>,
    /// As in [`ForwardArgs::varlen`].
    pub varlen: Option<Varlen<'a>>,
}

/// Launches sbgen kernels on one stream. Cheap to keep: it owns a reference to the module store and
/// the backward's f32 workspace, which grows to the largest problem seen.
#[derive(Debug)]
pub struct Launcher {
    stream: Arc<CudaStream>,
    store: Arc<ModuleStore>,
    workspace: Mutex<Option<CudaSlice<f32>>>,
    /// The decode's early-exit slots and unit counters: zeroed when allocated, and every decode
    /// kernel leaves the slots it used at zero (docs/math.md#decode), so a step needs no memset.
    decode_sync: Mutex<Option<CudaSlice<i32>>>,
    /// The device's SM count, read at the first decode.
    limits: OnceLock<DeviceLimits>,
}

impl Launcher {
    /// A launcher on `stream`, sharing the module store of the stream's context with every other
    /// launcher on it (each module is loaded once per context).
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, LaunchError> {
        let store = ModuleStore::shared(stream.context())?;
        Self::with_store(stream, store)
    }

    /// A launcher sharing `store` (which must belong to the stream's context).
    pub fn with_store(stream: Arc<CudaStream>, store: Arc<ModuleStore>) -> Result<Self, LaunchError> {
        if **store.context() != **stream.context() {
            return Err(LaunchError::WrongContext {
                tensor: "module store",
                expected: stream.context().ordinal(),
                got: store.context().ordinal(),
            });
        }
        Ok(Launcher {
            stream,
            store,
            workspace: Mutex::new(None),
            decode_sync: Mutex::new(None),
            limits: OnceLock::new(),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn store(&self) -> &Arc<ModuleStore> {
        &self.store
    }

    /// Loads (or finds) the kernel's module ahead of the first launch.
    pub fn load(&self, kernel: &KernelBinary) -> Result<Arc<LoadedKernel>, LaunchError> {
        self.store.load(kernel)
    }

    /// Runs the forward: `o`, `rem` and `log2_rem` from `q`, `k`, `v`. `scale` defaults to
    /// 1/sqrt(head_dim). Asynchronous on the launcher's stream.
    pub fn forward<T: SbElement>(
        &self,
        kernel: &KernelBinary,
        shape: Shape,
        mut args: ForwardArgs<'_, T>,
        scale: Option<f32>,
    ) -> Result<(), LaunchError> {
        let lens = ForwardLens {
            q: args.q.len(),
            k: args.k.len(),
            v: args.v.len(),
            o: args.o.len(),
            rem: args.rem.len(),
            log2_rem: args.log2_rem.len(),
            o_saved: args.o_saved.as_ref().map(|x| x.len()),
            cu_seqlens: args.varlen.map(|v| v.cu_seqlens.len()),
        };
        let total_tokens = args.varlen.map(|v| v.total_tokens);
        let plan = plan_forward(kernel.manifest(), T::DTYPE, shape, total_tokens, &lens, scale)?;
        let ctx = self.stream.context();
        same_context(ctx, "q", args.q.stream())?;
        same_context(ctx, "k", args.k.stream())?;
        same_context(ctx, "v", args.v.stream())?;
        same_context(ctx, "o", args.o.stream())?;
        same_context(ctx, "rem", args.rem.stream())?;
        same_context(ctx, "log2_rem", args.log2_rem.stream())?;
        if let Some(o_saved) = &args.o_saved {
            same_context(ctx, "o_saved", o_saved.stream())?;
        }
        if let Some(v) = &args.varlen {
            same_context(ctx, "cu_seqlens", v.cu_seqlens.stream())?;
        }
        let loaded = self.store.load(kernel)?;

        let s = &*self.stream;
        let (q, _q) = args.q.device_ptr(s);
        let (k, _k) = args.k.device_ptr(s);
        let (v, _v) = args.v.device_ptr(s);
        let (o, _o) = args.o.device_ptr_mut(s);
        let (rem, _rem) = args.rem.device_ptr_mut(s);
        let (log2_rem, _log2_rem) = args.log2_rem.device_ptr_mut(s);
        let o_saved_ptr = args.o_saved.as_mut().map(|x| x.device_ptr_mut(s));
        let o_saved = o_saved_ptr.as_ref().map_or(0, |(p, _)| *p);
        let cu_ptr = args.varlen.map(|x| x.cu_seqlens.device_ptr(s));
        let cu_seqlens = cu_ptr.as_ref().map_or(0, |(p, _)| *p);
        let e = T::DTYPE.size_bytes() as u64;
        check_alignment(&[("q", q, e), ("k", k, e), ("v", v, e), ("o", o, e), ("o_saved", o_saved, 4)])?;
        let d = dims(shape, total_tokens);
        let manifest = kernel.manifest();
        let maps = kv_tensor_maps(manifest, shape, &plan, k, v)?;
        // Every field is named (no `..`), so a field added to the ABI fails to compile here.
        let params = SbParams {
            q,
            k,
            v,
            o,
            rem,
            log2_rem,
            o_saved,
            d_o: 0,
            d_rem: 0,
            dq: 0,
            dk: 0,
            dv: 0,
            dk_accum: 0,
            dv_accum: 0,
            cu_seqlens,
            locks: 0,
            batch: d.batch,
            heads: d.heads,
            kv_heads: d.kv_heads,
            seq: d.seq,
            total_tokens: d.total_tokens,
            scale_log2: plan.scale_log2,
        };
        self.launch_steps(&loaded, &manifest.steps, &plan, &params, maps.as_ref())
        // The guards drop here, after the launches: later work on other streams waits for them.
    }

    /// Runs the backward: `dq`, `dk`, `dv`. Zeroes the f32 workspace, then launches the main step and
    /// the finishing step. Asynchronous on the launcher's stream.
    pub fn backward<T: SbElement>(
        &self,
        kernel: &KernelBinary,
        shape: Shape,
        mut args: BackwardArgs<'_, T>,
        scale: Option<f32>,
    ) -> Result<(), LaunchError> {
        let lens = BackwardLens {
            q: args.q.len(),
            k: args.k.len(),
            v: args.v.len(),
            o: args.o.len(),
            o_saved: args.o_saved.len(),
            d_o: args.d_o.len(),
            d_rem: args.d_rem.as_ref().map(|d| d.len()),
            log2_rem: args.log2_rem.len(),
            dq: args.dq.len(),
            dk: args.dk.len(),
            dv: args.dv.len(),
            cu_seqlens: args.varlen.map(|v| v.cu_seqlens.len()),
        };
        let total_tokens = args.varlen.map(|v| v.total_tokens);
        let plan = plan_backward(kernel.manifest(), T::DTYPE, shape, total_tokens, &lens, scale)?;
        let ctx = self.stream.context();
        same_context(ctx, "q", args.q.stream())?;
        same_context(ctx, "k", args.k.stream())?;
        same_context(ctx, "v", args.v.stream())?;
        same_context(ctx, "o", args.o.stream())?;
        same_context(ctx, "o_saved", args.o_saved.stream())?;
        same_context(ctx, "d_o", args.d_o.stream())?;
        if let Some(d_rem) = &args.d_rem {
            same_context(ctx, "d_rem", d_rem.stream())?;
        }
        same_context(ctx, "log2_rem", args.log2_rem.stream())?;
        same_context(ctx, "dq", args.dq.stream())?;
        same_context(ctx, "dk", args.dk.stream())?;
        same_context(ctx, "dv", args.dv.stream())?;
        if let Some(v) = &args.varlen {
            same_context(ctx, "cu_seqlens", v.cu_seqlens.stream())?;
        }
        let loaded = self.store.load(kernel)?;

        // Pointers first: a misaligned view is refused before the workspace is touched.
        let s = &*self.stream;
        let (q, _q) = args.q.device_ptr(s);
        let (k, _k) = args.k.device_ptr(s);
        let (v, _v) = args.v.device_ptr(s);
        let (o, _o) = args.o.device_ptr(s);
        let (o_saved, _o_saved) = args.o_saved.device_ptr(s);
        let (d_o, _d_o) = args.d_o.device_ptr(s);
        let d_rem_ptr = args.d_rem.as_ref().map(|d| d.device_ptr(s));
        let d_rem = d_rem_ptr.as_ref().map_or(0, |(p, _)| *p);
        let (log2_rem, _log2_rem) = args.log2_rem.device_ptr(s);
        let (dq, _dq) = args.dq.device_ptr_mut(s);
        let (dk, _dk) = args.dk.device_ptr_mut(s);
        let (dv, _dv) = args.dv.device_ptr_mut(s);
        let cu_ptr = args.varlen.map(|x| x.cu_seqlens.device_ptr(s));
        let cu_seqlens = cu_ptr.as_ref().map_or(0, |(p, _)| *p);
        let e = T::DTYPE.size_bytes() as u64;
        check_alignment(&[
            ("q", q, e),
            ("k", k, e),
            ("v", v, e),
            ("o", o, e),
            ("o_saved", o_saved, 4),
            ("d_o", d_o, e),
            ("dq", dq, e),
            ("dk", dk, e),
            ("dv", dv, e),
        ])?;

        let name = &kernel.manifest().name;
        let needed = 2 * plan.accum_elements + plan.lock_count;
        let mut workspace = self.workspace(name, needed)?;
        let buffer = workspace.as_mut().expect("allocated by workspace()");
        let mut used = buffer.slice_mut(0..needed);
        self.stream.memset_zeros(&mut used).kernel_ctx(name, "zeroing the backward workspace")?;
        let (dk_accum, mut rest) = used.split_at_mut(plan.accum_elements);
        let (dv_accum, locks) = rest.split_at_mut(plan.accum_elements);
        let (dk_accum, _dk_accum) = dk_accum.view_ptr_mut(s);
        let (dv_accum, _dv_accum) = dv_accum.view_ptr_mut(s);
        // The counters are i32 in f32 slots: zeroed f32 bits are integer 0.
        let (locks, _locks) = locks.view_ptr_mut(s);
        let locks = if plan.lock_count > 0 { locks } else { 0 };
        let d = dims(shape, total_tokens);
        let params = SbParams {
            q,
            k,
            v,
            o,
            rem: 0,
            log2_rem,
            o_saved,
            d_o,
            d_rem,
            dq,
            dk,
            dv,
            dk_accum,
            dv_accum,
            cu_seqlens,
            locks,
            batch: d.batch,
            heads: d.heads,
            kv_heads: d.kv_heads,
            seq: d.seq,
            total_tokens: d.total_tokens,
            scale_log2: plan.scale_log2,
        };
        let maps = kv_tensor_maps(kernel.manifest(), shape, &plan, k, v)?;
        self.launch_steps(&loaded, &kernel.manifest().steps, &plan, &params, maps.as_ref())
    }

    /// The f32 workspace, grown to at least `needed` elements (its contents are undefined).
    pub(super) fn workspace(
        &self,
        kernel: &str,
        needed: usize,
    ) -> Result<MutexGuard<'_, Option<CudaSlice<f32>>>, LaunchError> {
        // SAFETY: every caller initialises the part it uses before a kernel reads it.
        grown(&self.workspace, kernel, needed, |n| unsafe { self.stream.alloc::<f32>(n) })
    }

    /// The decode sync buffer, grown to at least `needed` slots: all zero whenever no decode is
    /// running on the stream (a new buffer is zeroed on the stream before any kernel uses it).
    pub(super) fn decode_sync(
        &self,
        kernel: &str,
        needed: usize,
    ) -> Result<MutexGuard<'_, Option<CudaSlice<i32>>>, LaunchError> {
        grown(&self.decode_sync, kernel, needed, |n| self.stream.alloc_zeros::<i32>(n))
    }

    /// The device's SM count (read once).
    pub(super) fn device_limits(&self) -> Result<DeviceLimits, LaunchError> {
        if let Some(limits) = self.limits.get() {
            return Ok(*limits);
        }
        use cudarc::driver::sys::CUdevice_attribute as A;
        let ctx = self.stream.context();
        let sm_count = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let limits = DeviceLimits { sm_count: sm_count.max(1) as usize };
        Ok(*self.limits.get_or_init(|| limits))
    }

    /// Launches each step with `params`, and the K and V tensor maps (`maps`) after them for a step
    /// whose manifest entry says it takes them.
    fn launch_steps(
        &self,
        loaded: &LoadedKernel,
        entries: &[LaunchStep],
        plan: &LaunchPlan,
        params: &SbParams,
        maps: Option<&[TensorMap; 2]>,
    ) -> Result<(), LaunchError> {
        for ((function, step), entry) in loaded.functions.iter().zip(&plan.steps).zip(entries) {
            let cfg = LaunchConfig {
                grid_dim: step.grid,
                block_dim: (step.threads, 1, 1),
                shared_mem_bytes: step.dynamic_smem_bytes,
            };
            let mut launch = self.stream.launch_builder(function);
            launch.arg(params);
            if entry.kv_tensor_maps {
                let [k, v] = maps.ok_or_else(|| LaunchError::Manifest {
                    kernel: loaded.name.clone(),
                    reason: format!("step `{}` takes tensor maps, which this launch did not make", entry.function),
                })?;
                launch.arg(k);
                launch.arg(v);
            }
            // SAFETY: every entry point of an sbgen module takes one `SbParams` by value (the C
            // struct is rendered from the same field table), then the two tensor maps when its
            // manifest entry says so (`kv_tensor_maps`, encoded over k and v). `plan_*` checked that each
            // non-null pointer addresses a live allocation on this context with at least the
            // elements the shape needs, that the grid is within CUDA's limits, and the module
            // store checked threads and shared memory against the device and raised the
            // dynamic shared-memory limit. The pointer guards outlive this call.
            unsafe { launch.launch(cfg) }.kernel_ctx(&loaded.name, "launching")?;
        }
        Ok(())
    }
}

/// The TMA loads' maps of K (at `k`) and V (at `v`), when a step of the kernel copies by TMA.
fn kv_tensor_maps(
    manifest: &KernelManifest,
    shape: Shape,
    plan: &LaunchPlan,
    k: u64,
    v: u64,
) -> Result<Option<[TensorMap; 2]>, LaunchError> {
    if !manifest.steps.iter().any(|step| step.kv_tensor_maps) {
        return Ok(None);
    }
    let map =
        tensor_map::kv_tile_map(&manifest.name, &manifest.spec, shape.kv_heads, plan.kv_elements, manifest.block_n)?;
    Ok(Some([
        tensor_map::encode(&manifest.name, "k", &manifest.spec, &map, k)?,
        tensor_map::encode(&manifest.name, "v", &manifest.spec, &map, v)?,
    ]))
}

/// The integer fields of the parameter block.
struct Dims {
    batch: i32,
    heads: i32,
    kv_heads: i32,
    seq: i32,
    total_tokens: i32,
}

fn dims(shape: Shape, total_tokens: Option<usize>) -> Dims {
    // `plan_*` refused batch, kv_heads > 65535 and heads, seq, total_tokens > i32::MAX, so these
    // casts are exact.
    Dims {
        batch: shape.batch as i32,
        heads: shape.heads as i32,
        kv_heads: shape.kv_heads as i32,
        seq: shape.seq as i32,
        total_tokens: total_tokens.unwrap_or(0) as i32,
    }
}

/// The buffer in `slot`, replaced by a fresh one from `alloc` when it holds fewer than `needed`
/// elements (the smaller one is freed first).
fn grown<'a, T>(
    slot: &'a Mutex<Option<CudaSlice<T>>>,
    kernel: &str,
    needed: usize,
    alloc: impl FnOnce(usize) -> Result<CudaSlice<T>, DriverError>,
) -> Result<MutexGuard<'a, Option<CudaSlice<T>>>, LaunchError> {
    let mut buffer = slot.lock().unwrap_or_else(|e| e.into_inner());
    if !matches!(buffer.as_ref(), Some(b) if b.len() >= needed) {
        *buffer = None;
        let bytes = needed * std::mem::size_of::<T>();
        *buffer = Some(alloc(needed.max(1)).map_err(|source| LaunchError::Workspace {
            kernel: kernel.to_string(),
            bytes,
            source,
        })?);
    }
    Ok(buffer)
}

pub(super) fn same_context(
    ctx: &Arc<CudaContext>,
    tensor: &'static str,
    stream: &Arc<CudaStream>,
) -> Result<(), LaunchError> {
    if **stream.context() != **ctx {
        return Err(LaunchError::WrongContext { tensor, expected: ctx.ordinal(), got: stream.context().ordinal() });
    }
    Ok(())
}
