//! The launch of a decode: one new token per sequence against a KV cache (docs/math.md#decode).
//! Checks every input ([`super::decode_plan`]), lays the chunk states out in the launcher's
//! workspace and points the kernel at the launcher's decode sync buffer (early-exit slots and unit
//! counters, zero between launches), then launches the one step with one [`DecodeParams`].

use super::binary::KernelBinary;
use super::decode_plan::{plan_decode, DecodeLens, DecodePlan, DecodeSplit};
use super::element::SbElement;
use super::error::{KernelContext, LaunchError};
use super::launch::{same_context, Launcher};
use super::plan::check_alignment;
use crate::kv_cache::KvCacheGeometry;
use crate::manifest::DecodeParams;
use crate::reference::DecodeShape;
use cudarc::driver::{
    CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, LaunchConfig, PushKernelArg,
};

// SAFETY: `DecodeParams` is `#[repr(C)]`, `Copy`, holds only integers and floats, and mirrors the C
// struct rendered from `DECODE_PARAM_FIELDS` (a test in `manifest` checks the offsets).
unsafe impl DeviceRepr for DecodeParams {}

/// A decode's tensors. q and o are `[B, H, D]` (the new token of each sequence), rem f32 `[B, H]`;
/// k_cache and v_cache hold `cache` (see [`KvCacheGeometry`]; their layout is the kernel's:
/// BHND/BNHD contiguous, or paged) with the new token's key and value already appended, so sequence
/// b's query is its token `seqlens_k[b] - 1`. `seqlens_k` (i32 `[B]`) and `block_table` (i32
/// `[B, max_pages]`, paged only) stay on the device: check host copies with
/// [`crate::kv_cache::check_kv_tables`] before uploading them (the kernels read a bad length as an
/// empty sequence and a bad page id as a page of no keys; they never read out of bounds).
pub struct DecodeArgs<'a, T> {
    pub q: CudaView<'a, T>,
    pub k_cache: CudaView<'a, T>,
    pub v_cache: CudaView<'a, T>,
    pub cache: KvCacheGeometry,
    pub seqlens_k: CudaView<'a, i32>,
    pub block_table: Option<CudaView<'a, i32>>,
    pub o: CudaViewMut<'a, T>,
    pub rem: CudaViewMut<'a, f32>,
}

impl Launcher {
    /// Runs a decode: `o` and `rem` of each sequence's newest token. `split` forces the split-K shape
    /// (`DecodeSplit::default()`: chosen from the device's SM count); `scale` defaults to
    /// 1/sqrt(head_dim). Asynchronous on the launcher's stream, and capturable in a CUDA graph (one
    /// launch, once a first call outside the capture has sized the workspace and sync buffer).
    /// Returns the plan it ran.
    pub fn decode<T: SbElement>(
        &self,
        kernel: &KernelBinary,
        shape: DecodeShape,
        mut args: DecodeArgs<'_, T>,
        split: DecodeSplit,
        scale: Option<f32>,
    ) -> Result<DecodePlan, LaunchError> {
        let lens = DecodeLens {
            q: args.q.len(),
            k_cache: args.k_cache.len(),
            v_cache: args.v_cache.len(),
            o: args.o.len(),
            rem: args.rem.len(),
            seqlens_k: args.seqlens_k.len(),
            block_table: args.block_table.as_ref().map(|t| t.len()),
        };
        let limits = self.device_limits()?;
        let plan = plan_decode(kernel.manifest(), T::DTYPE, shape, args.cache, &lens, split, limits, scale)?;
        let ctx = self.stream().context();
        same_context(ctx, "q", args.q.stream())?;
        same_context(ctx, "k_cache", args.k_cache.stream())?;
        same_context(ctx, "v_cache", args.v_cache.stream())?;
        same_context(ctx, "seqlens_k", args.seqlens_k.stream())?;
        if let Some(t) = &args.block_table {
            same_context(ctx, "block_table", t.stream())?;
        }
        same_context(ctx, "o", args.o.stream())?;
        same_context(ctx, "rem", args.rem.stream())?;
        let loaded = self.load(kernel)?;

        let s = &**self.stream();
        let (q, _q) = args.q.device_ptr(s);
        let (k, _k) = args.k_cache.device_ptr(s);
        let (v, _v) = args.v_cache.device_ptr(s);
        let (o, _o) = args.o.device_ptr_mut(s);
        let (rem, _rem) = args.rem.device_ptr_mut(s);
        let (seqlens_k, _seqlens_k) = args.seqlens_k.device_ptr(s);
        let table_ptr = args.block_table.as_ref().map(|t| t.device_ptr(s));
        let block_table = table_ptr.as_ref().map_or(0, |(p, _)| *p);
        let e = T::DTYPE.size_bytes() as u64;
        // o is written one element at a time; q, k and v are copied 16 bytes at a time.
        check_alignment(&[("q", q, e), ("k_cache", k, e), ("v_cache", v, e)])?;

        let name = &kernel.manifest().name;
        let mut workspace = self.workspace(name, plan.workspace_elements())?;
        let buffer = workspace.as_mut().expect("allocated by workspace()");
        let mut used = buffer.slice_mut(0..plan.workspace_elements());
        let (mut chunk_o, mut chunk_l) = used.split_at_mut(plan.chunk_o_elements);
        let (chunk_o, _chunk_o) = chunk_o.device_ptr_mut(s);
        let (chunk_l, _chunk_l) = chunk_l.device_ptr_mut(s);
        let mut sync = self.decode_sync(name, plan.sync_slots)?;
        let sync = sync.as_mut().expect("allocated by decode_sync()");
        let (exit_chunk, _sync) = sync.device_ptr_mut(s);
        let unit_done = exit_chunk + 4 * (plan.sync_slots / 2) as u64;
        let (num_pages, page_size, max_pages) = match args.cache {
            KvCacheGeometry::Paged { num_pages, page_size, max_pages } => (num_pages, page_size, max_pages),
            KvCacheGeometry::Contiguous { .. } => (0, 0, 0),
        };
        // `plan_decode` bounded every count below by i32::MAX, so the casts are exact.
        let params = DecodeParams {
            q,
            k,
            v,
            o,
            rem,
            seqlens_k,
            block_table,
            chunk_o,
            chunk_l,
            exit_chunk,
            unit_done,
            batch: shape.batch as i32,
            heads: shape.heads as i32,
            kv_heads: shape.kv_heads as i32,
            seq: args.cache.capacity() as i32,
            num_pages: num_pages as i32,
            page_size: page_size as i32,
            max_pages: max_pages as i32,
            chunk_keys: plan.chunk_keys as i32,
            max_chunks: plan.max_chunks as i32,
            scale_log2: plan.scale_log2,
        };
        let function = loaded.functions.first().ok_or_else(|| LaunchError::Manifest {
            kernel: name.clone(),
            reason: "the module has no entry point".into(),
        })?;
        let step = plan.step;
        let cfg = LaunchConfig {
            grid_dim: step.grid,
            block_dim: (step.threads, 1, 1),
            shared_mem_bytes: step.dynamic_smem_bytes,
        };
        let mut launch = s.launch_builder(function);
        launch.arg(&params);
        // SAFETY: a decode module's entry point takes one `DecodeParams` by value. `plan_decode`
        // checked each tensor's length against the shape and cache, the grid against CUDA's limits
        // and the workspace's size; the module store checked threads and shared memory against the
        // device. The pointer guards outlive this call.
        unsafe { launch.launch(cfg) }.kernel_ctx(&loaded.name, "launching")?;
        Ok(plan)
    }
}
